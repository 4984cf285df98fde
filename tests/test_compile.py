"""torch.compile paths (compute.compile), kept out of `make test-kernels`: under its forced
ATEN_CPU_CAPABILITY=default inductor's generated C++ does not build (at::vec is missing), and
under a forced ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU compiled code with inductor's
fallback_random drops the wrong elements (a p = 0.3 mask dropped 13.7%; on the CPU's own
capability, and with DNNL_MAX_CPU_ISA=AVX2, it matches eager exactly): limits of the forced
settings, which make ATen and inductor disagree on the instruction set, not of a CPU."""

from __future__ import annotations

import torch
from numerics import assert_rounding_close

from latentforge.models.layers import Dropout, Linear


class _DropoutNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = Linear(16, 32), Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.fc(x)) + 1.0)  # >= 1: zeros come from dropout only


def test_compiled_dropout_draws_the_masks_eager_draws() -> None:
    """training.compile_in_place has inductor draw with torch's own kernels: a compiled run
    drops what the eager run drops (and inductor's CPU generator cost a tiny maskgit step
    ~8 ms of masks)."""
    import torch._dynamo

    from latentforge.training import compile_in_place

    torch.manual_seed(0)
    net, x = _DropoutNet(), torch.randn(64, 16)
    torch.manual_seed(1)
    eager = net(x)
    torch._dynamo.reset()
    try:
        compile_in_place(net)
        torch.manual_seed(1)
        compiled = net(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled == 0, eager == 0)  # the same elements dropped
    assert_rounding_close(compiled, eager, what="compiled dropout output")
