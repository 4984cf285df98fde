"""models/attention.py: attention under CPU bf16 autocast runs in fp32 (CPU's bf16 attention
kernels are several times slower), returns bf16 and passes gradients; without autocast it is
scaled_dot_product_attention itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentforge.models.attention import attention

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def qkv(t: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, t, 8, generator=g) * 2 for _ in range(3)]


def test_fp32_inputs_are_plain_sdpa() -> None:
    q, k, v = qkv()
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))


def test_under_cpu_autocast_it_computes_in_fp32_and_returns_bf16() -> None:
    q, k, v = (x.bfloat16().requires_grad_() for x in qkv())
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask)
    # The fp32 result rounded once to bf16 (same kernel and shapes in one process: equal) ...
    assert torch.equal(out, exact.bfloat16())
    # ... where bf16 attention itself is further off than that.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = F.scaled_dot_product_attention(q, k, v, mask)
    assert (in_bf16.float() - exact).abs().max() > (out.float() - exact).abs().max()
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    assert all(x.grad is not None and torch.isfinite(x.grad.float()).all() for x in (q, k, v))
