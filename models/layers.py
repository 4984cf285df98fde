"""Layers shared by the models, written for the speed of CPU training.

Attention: scaled_dot_product_attention, kept in fp32 on CPU. CPU autocast runs it in bf16,
and torch's CPU attention kernels are much slower in bf16 than in fp32 at these models' shapes
(fwd+bwd, 1 thread, AMD EPYC Zen 5 with avx512_bf16, torch 2.13: B=64, 4 heads, T=16, head
dim 16: 2.7 ms vs 0.6 ms; T=80, head dim 32: 44 ms vs 12 ms), while the same CPU runs bf16
matmuls ~4x faster than fp32 ones. So on CPU a bf16 attention casts its inputs up and its
output back: attention is a few per cent of these models' FLOPs, and fp32 is also the more
accurate of the two. GPUs keep bf16 attention (flash kernels).

Dropout: the mask from torch.rand, which ATen vectorises; nn.Dropout draws it with
bernoulli_, one element at a time on CPU (64 x 17 x 64 fp32, fwd+bwd, 1 thread, Zen 5: 0.18
vs 0.35 ms; four dropouts are ~6% of a tiny maskgit step). The same distribution: each
element kept with probability 1 - p and scaled by 1 / (1 - p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class Dropout(nn.Module):
    """nn.Dropout(p) with a vectorised mask (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, device=x.device).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
