"""Attention shared by every model: scaled_dot_product_attention, kept in fp32 on CPU.

CPU autocast runs scaled_dot_product_attention in bf16, and torch's CPU attention kernels are
much slower in bf16 than in fp32 at these models' shapes (fwd+bwd, 1 thread, AMD EPYC Zen 5
with avx512_bf16, torch 2.13: B=64, 4 heads, T=16, head dim 16: 2.7 ms vs 0.6 ms; T=80, head
dim 32: 44 ms vs 12 ms), while the same CPU runs bf16 matmuls ~4x faster than fp32 ones. So on
CPU a bf16 attention casts its inputs up and its output back: attention is a few per cent of
these models' FLOPs, and fp32 is also the more accurate of the two. GPUs keep bf16 attention
(flash kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, attn_mask), in fp32 for bf16 inputs on CPU.

    q: (B, heads, Tq, d), k and v: (B, heads, Tk, d) -> (B, heads, Tq, d) in q's dtype; under
    CPU autocast q, k and v arrive in bf16 from their linear layer.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
