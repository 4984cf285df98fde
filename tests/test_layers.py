"""models/layers.py: attention under CPU bf16 autocast runs in fp32 (CPU's bf16 attention
kernels are several times slower), returns bf16 and passes gradients, and without autocast is
scaled_dot_product_attention itself; Dropout draws nn.Dropout's distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentforge.models.layers import Dropout, attention

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_each_element_with_probability_1_minus_p_scaled(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    drop = Dropout(0.25)
    x = (torch.rand(200, 500) + 0.5).to(dtype).requires_grad_()
    y = drop(x)
    assert y.dtype == dtype
    kept = y != 0
    # 100k Bernoulli(0.75) draws: the fraction is within 4 standard deviations (0.0055).
    assert abs(float(kept.float().mean()) - 0.75) < 0.0055
    torch.testing.assert_close(y[kept], (x[kept].float() / 0.75).to(dtype))
    y.float().sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad.float(), kept.float() / 0.75, rtol=2 ** -7, atol=0)
    # Masks differ between calls and follow the global seed.
    torch.manual_seed(1)
    a = drop(x.detach()) != 0
    torch.manual_seed(1)
    assert torch.equal(drop(x.detach()) != 0, a) and not torch.equal(a, kept)


def test_dropout_is_the_identity_in_eval_or_at_zero_and_checks_p() -> None:
    x = torch.randn(4, 5)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0)(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
