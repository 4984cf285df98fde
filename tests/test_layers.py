"""models/layers.py: attention under CPU bf16 autocast runs in fp32 (CPU's bf16 attention
kernels are several times slower), returns bf16 and passes gradients, and without autocast is
scaled_dot_product_attention itself; Dropout draws nn.Dropout's distribution; Linear on oneDNN
computes F.linear's values and gradients within fp32 rounding, keeps nn.Linear's parameters,
leaves autocast alone, and the backend is chosen by the environment or the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rounding_close

from latentforge.models import layers
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.models.layers import Dropout, Linear, attention, fp32_linear

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


def linear_case(rows: int, fan_in: int, fan_out: int, bias: bool, backend: str, seed: int = 0
                ) -> list[torch.Tensor]:
    """Output and gradients (input, weight, bias) of one Linear on (2, rows/2, fan_in) inputs."""
    torch.manual_seed(seed)
    layer = Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(2, rows // 2, fan_in, requires_grad=True)
    grad = torch.randn(2, rows // 2, fan_out)
    with fp32_linear(backend):
        out = layer(x)
        out.backward(grad)
    return [out, x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])


@pytest.mark.parametrize(("rows", "fan_in", "fan_out", "bias"), [
    (64, 24, 40, True),     # few rows: the weight gradient in the BLAS
    (512, 24, 40, True),    # oneDNN weight gradient, the input transposed (the narrower)
    (512, 40, 24, False),   # ... the output gradient transposed
    (300, 33, 33, True),    # odd sizes
])
def test_onednn_linear_equals_f_linear_within_rounding(rows, fan_in, fan_out, bias) -> None:
    blas = linear_case(rows, fan_in, fan_out, bias, "blas")
    onednn = linear_case(rows, fan_in, fan_out, bias, "onednn")
    for what, a, b in zip(("output", "input grad", "weight grad", "bias grad"), onednn, blas,
                          strict=False):
        assert_rounding_close(a, b, what=what)
    # not a copy of the same numbers: another seed moves them far beyond rounding
    other = linear_case(rows, fan_in, fan_out, bias, "onednn", seed=1)
    assert (other[0] - blas[0]).abs().max() > 0.1


def test_linear_is_nn_linear_and_leaves_autocast_and_frozen_inputs_alone() -> None:
    layer = Linear(16, 8)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == set(torch.nn.Linear(16, 8).state_dict())
    x = torch.randn(5, 16)
    with fp32_linear("onednn"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)  # autocast's own bf16 linear
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    with fp32_linear("onednn"), torch.no_grad():  # inference: forward only
        assert_rounding_close(layer(x), F.linear(x, layer.weight, layer.bias))
        batched = torch.randn(3, 5, 16).transpose(0, 1)  # (5, 3, 16), not contiguous
        without_grad = layer(batched)
    with fp32_linear("onednn"):  # the autograd path's forward: the very same kernel call
        with_grad = layer(batched)
    assert with_grad.requires_grad and not without_grad.requires_grad
    assert without_grad.shape == (5, 3, 8) and torch.equal(without_grad, with_grad.detach())
    frozen = Linear(16, 8).requires_grad_(False)  # no parameter gradients wanted
    x.requires_grad_()
    with fp32_linear("onednn"):
        frozen(x).sum().backward()
    assert frozen.weight.grad is None and x.grad is not None


def test_a_flow_transformer_step_agrees_across_backends() -> None:
    grads = {}
    for backend in ("blas", "onednn"):
        torch.manual_seed(0)
        model = FlowTransformer(generator_config("tiny", num_tokens=16, token_dim=8,
                                                 num_classes=10))
        for p in model.parameters():  # adaLN-zero starts at zero: give every path a gradient
            torch.nn.init.normal_(p, std=0.05)
        gen = torch.Generator().manual_seed(1)
        x, t = torch.randn(64, 16, 8, generator=gen), torch.rand(64, generator=gen)
        y = torch.randint(0, 10, (64,), generator=gen)
        with fp32_linear(backend):
            model(x, t, y).square().mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["blas"].items():
        assert_rounding_close(grads["onednn"][name], grad, what=name)


@pytest.mark.parametrize(("vendor", "flags", "expected"), [
    ("AuthenticAMD", {"avx2", "avx512f"}, "onednn"),  # MKL would run AVX2 kernels
    ("AuthenticAMD", {"avx2"}, "blas"),
    ("GenuineIntel", {"avx2", "avx512f"}, "blas"),    # MKL's own AVX-512 kernels
    ("", set(), "blas"),                              # unknown CPU
])
def test_auto_takes_onednn_on_non_intel_avx512_cpus(monkeypatch, vendor, flags, expected) -> None:
    monkeypatch.setattr(layers, "_cpu_flags", lambda: (vendor, flags))
    with fp32_linear("auto"):
        assert layers.fp32_linear_backend() == expected


def test_the_environment_decides_and_a_bad_value_is_named(monkeypatch) -> None:
    monkeypatch.setattr(layers, "_backend", None)
    monkeypatch.setenv(layers.FP32_LINEAR_ENV, "BLAS")
    assert layers.fp32_linear_backend() == "blas"
    monkeypatch.setattr(layers, "_backend", None)
    monkeypatch.setenv(layers.FP32_LINEAR_ENV, "mkl")
    with pytest.raises(ValueError, match="LATENTFORGE_FP32_LINEAR='mkl'.*blas, onednn, auto"):
        layers.fp32_linear_backend()

