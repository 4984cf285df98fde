"""Layers shared by the models, written for the speed of CPU training.

Attention: scaled_dot_product_attention, kept in fp32 on CPU. CPU autocast runs it in bf16,
and torch's CPU attention kernels are much slower in bf16 than in fp32 at these models' shapes
(fwd+bwd, 1 thread, AMD EPYC Zen 5 with avx512_bf16, torch 2.13: B=64, 4 heads, T=16, head
dim 16: 2.7 ms vs 0.6 ms; T=80, head dim 32: 44 ms vs 12 ms), while the same CPU runs bf16
matmuls ~4x faster than fp32 ones. So on CPU a bf16 attention casts its inputs up and its
output back: attention is a few per cent of these models' FLOPs, and fp32 is also the more
accurate of the two. GPUs keep bf16 attention (flash kernels).

Linear: nn.Linear whose fp32 matmuls on CPU may go to oneDNN instead of the BLAS (MKL). MKL
runs its AVX2 kernels on non-Intel CPUs, oneDNN picks kernels by instruction set: on a 2-core
AMD EPYC Zen 5 (AVX-512), 1 thread, the models' linear shapes ran 101-109 GFLOP/s in MKL and
180-250 in oneDNN (forward and input gradient; the weight gradient, which needs a transposed
copy, 1.1-2.1x MKL's speed at 1024+ rows). `fp32_linear_backend()` says which is used: $LATENTFORGE_FP32_LINEAR
(blas | onednn | auto) decides, and auto (the default) takes oneDNN on CPUs that are not
Intel's and have AVX-512; elsewhere the BLAS stays. Both compute in fp32 (not bitwise alike:
another summation order); bf16 autocast, GPUs and torch.compile keep F.linear. On a Zen 4
oneDNN is no faster than MKL in training (0.92-1.08x) and slower on a few hundred rows (a
default RL update 0.70x); auto takes it there too, because oneDNN on an EPYC and MKL on a Xeon
trained the default pipeline to the same numbers, to every printed digit (2026-12-06), where
MKL's AVX2 kernels send it down another path.

Dropout: the mask from torch.rand, which ATen vectorises; nn.Dropout draws it with
bernoulli_, one element at a time on CPU (64 x 17 x 64 fp32, fwd+bwd, 1 thread, Zen 5: 0.18
vs 0.35 ms; four dropouts are ~6% of a tiny maskgit step). The same distribution: each
element kept with probability 1 - p and scaled by 1 / (1 - p).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FP32_LINEAR_ENV = "LATENTFORGE_FP32_LINEAR"
FP32_LINEAR_BACKENDS = ("blas", "onednn", "auto")
# Below this many rows the weight gradient stays with the BLAS: oneDNN's needs a transposed
# copy of the output gradient, which costs more than it saves on a few rows (measured: 64 rows
# x 64 -> 384, 86 vs 98 GFLOP/s; 1024 rows, 111-190 vs 99-104).
ONEDNN_WEIGHT_GRAD_MIN_ROWS = 256


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


def _cpu_flags() -> tuple[str, set[str]]:
    """(vendor, instruction-set flags) of this Linux CPU; ('', set()) where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    vendor, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


_backend: str | None = None  # this process's choice, made on first use


def fp32_linear_backend() -> str:
    """'onednn' or 'blas': where fp32 Linear layers on CPU run their matmuls in this process
    (the module docstring says why and how it is chosen)."""
    global _backend
    if _backend is None:
        _backend = _resolve(os.environ.get(FP32_LINEAR_ENV, "auto"))
    return _backend


def _resolve(choice: str) -> str:
    choice = choice.strip().lower() or "auto"
    if choice not in FP32_LINEAR_BACKENDS:
        raise ValueError(f"{FP32_LINEAR_ENV}={choice!r}: expected one of "
                         f"{', '.join(FP32_LINEAR_BACKENDS)}")
    if choice == "onednn" or (choice == "auto" and _onednn_pays()):
        return "onednn" if torch.backends.mkldnn.is_available() else "blas"
    return "blas"


def matmuls_compile_per_shape(device: torch.device) -> bool:
    """Whether Linear matmuls on `device` run in oneDNN here (CPU bf16 autocast, or fp32 on
    the oneDNN backend), which compiles a kernel for each new shape (a ~1400 x 64 x 1000 bf16
    linear on a Xeon with AMX: 13.2 ms the first time, 2.2 ms after) and caches 1024: callers
    whose row count changes from call to call pad it to a few sizes. The BLAS and CUDA need no
    such padding."""
    return device.type == "cpu" and (torch.is_autocast_enabled("cpu")
                                     or fp32_linear_backend() == "onednn")


@contextlib.contextmanager
def fp32_linear(backend: str) -> Iterator[None]:
    """Run the body with fp32 Linear matmuls on `backend` (blas | onednn | auto)."""
    global _backend
    before, _backend = _backend, _resolve(backend)
    try:
        yield
    finally:
        _backend = before


def _onednn_pays() -> bool:
    vendor, flags = _cpu_flags()
    return vendor not in ("", "GenuineIntel") and "avx512f" in flags


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (rows, K), contiguous: the layout oneDNN's matmul takes."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """a @ b_t.T (+ bias) in oneDNN: a (M, K) contiguous, b_t (N, K) of any strides."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on fp32 CPU tensors with oneDNN matmuls forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _rows(x)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight = ctx.saved_tensors
        g2 = _rows(grad)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(g2, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            # g2.T @ x2 reduces over rows, so oneDNN needs one operand transposed and
            # contiguous: the narrower one (1024 rows, 64 -> 256: 178 us, against 242 us
            # copying the wider and 339 us in MKL).
            if g2.shape[0] < ONEDNN_WEIGHT_GRAD_MIN_ROWS:
                grad_w = g2.t() @ x2
            elif x2.shape[1] < g2.shape[1]:
                grad_w = _onednn_mm(x2.t().contiguous(), g2.t()).t().contiguous()
            else:
                grad_w = _onednn_mm(g2.t().contiguous(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose fp32 CPU matmuls go where
    `fp32_linear_backend()` says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and fp32_linear_backend() == "onednn"):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _OneDNNLinear.apply(x, self.weight, self.bias)
            # No gradient wanted (sampling, rollouts): the same kernel without the autograd
            # Function's per-call cost, which at RL's rollout sizes (~500 rows) is ~6% of one.
            return _onednn_mm(_rows(x), self.weight, self.bias).view(*x.shape[:-1],
                                                                     self.out_features)
        return F.linear(x, self.weight, self.bias)


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
