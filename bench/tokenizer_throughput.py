"""Tokenizer training throughput on this machine, against what the hardware can do.

Prints, from one run: images/s of tokenizer training steps (forward + backward + AdamW) for
the default params.yaml tokenizer on the prepared digits resolution, the FLOPs of one step
(counted by torch's FlopCounterMode), the achieved FLOP/s, a plain 2048x2048 fp32 matmul's
FLOP/s measured in the same process, and their ratio; then the same with bf16 autocast.

    python bench/tokenizer_throughput.py [--steps 30] [--batch 64] [--resolution 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from latentforge.config import load_params
from latentforge.models.tokenizer import Tokenizer
from latentforge.tasks.tokenizer import model_config


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def train_step(model: Tokenizer, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        recon, enc = model(x)
        loss = F.mse_loss(recon.float(), x) + enc.aux_loss.float()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(bf16: bool, args: argparse.Namespace) -> dict[str, float]:
    params = load_params("params.yaml")
    torch.manual_seed(0)
    model = Tokenizer(model_config(params.tokenizer, args.resolution, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 1, args.resolution, args.resolution) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, x, bf16)
    flops_per_step = counter.get_total_flops()
    for _ in range(3):
        train_step(model, opt, x, bf16)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, x, bf16)
    seconds = time.perf_counter() - start
    return {"images_per_s": args.steps * args.batch / seconds,
            "flops_per_step": flops_per_step,
            "achieved_flops": flops_per_step * args.steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.resolution}x{args.resolution}")
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        peak = matmul_flops(dtype)
        r = measure(bf16, args)
        name = "bf16 autocast" if bf16 else "fp32"
        print(f"{name:14s} {r['images_per_s']:8.0f} images/s  {r['flops_per_step'] / 1e9:6.2f} "
              f"GFLOP/step  achieved {r['achieved_flops'] / 1e9:6.1f} GFLOP/s  matmul "
              f"{peak / 1e9:6.1f} GFLOP/s  ratio {r['achieved_flops'] / peak:.3f}")


if __name__ == "__main__":
    main()
