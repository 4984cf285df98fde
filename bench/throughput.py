"""Training throughput of every model and size, against this machine's matmul rate, in one run.

For each model (tokenizer, flow generator, maskgit token generator), size (the params.yaml
default and "small") and precision (fp32, bf16 autocast), the real training update
(`latentforge.training.train_step`: the stage's loss, backward, clipping, fused AdamW, EMA) on
a random batch of the stage's batch size prints images/s, the FLOPs of one update (torch's
FlopCounterMode, with the CPU flash-attention kernels it does not know registered here), the
achieved FLOP/s and its ratio to a plain 2048^2 fp32 and bf16 matmul measured in the same
process at the same thread count. The fp32 matmul is timed twice: torch.mm (the BLAS, MKL) and
oneDNN's linear kernel, which models/layers.py uses for fp32 Linear layers where it pays (MKL
runs AVX2 kernels on non-Intel CPUs, so on an AVX-512 AMD CPU oneDNN's rate is ~2x torch.mm's,
and nearer the hardware's). "Linear alone" times the model's fp32 Linear layers by themselves,
forward and backward at the shapes a step gives them: the rate a step could reach if everything
else (attention, norms, activations, loss, optimizer) were free, and their share of the step;
"Linear alone bf16 vs fp32" times them again under bf16 autocast (fp32 inputs, so autocast's
casts count): how much of a speed-up bf16 has to offer a model at its own shapes. Matmul
blocks and training blocks alternate over `--rounds` rounds and every figure is a median, so a
neighbour's load drifts through all of them alike.

The default size trains the params.yaml tokenizer on the prepare resolution and channels, and
the params.yaml generator on its latents (K x D); "small" is the registry's small size (width
128, depth 4), the tokenizer on `--small-resolution` RGB images.

`--cpu-time` times with the process's CPU time instead of the wall clock: on a shared machine
(other processes competing for the cores) it counts only the time this process ran, so the
ratios say what the code does rather than how busy the machine was. `--compile` adds
torch.compile variants and prints their compile time (compute.compile).

`--overhead` then runs the default pipeline in a fresh clone (bench/overhead.py): its wall time
against the stages' own work, and a no-op `latentforge run` against `dvc status`.

    python bench/throughput.py [--threads 1] [--rounds 5] [--steps 3] [--cpu-time] [--compile]
        [--models tokenizer,generator,maskgit] [--sizes default,small] [--precisions fp32,bf16]
        [--overhead]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from latentforge.config import Params, TrainConfig, load_params
from latentforge.malloc import tune_malloc
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.models.layers import fp32_linear, fp32_linear_backend
from latentforge.models.token_generator import TokenTransformer, token_generator_config
from latentforge.models.tokenizer import Tokenizer
from latentforge.precision import machine_key
from latentforge.tasks.generator import generator_loss, token_generator_loss
from latentforge.tasks.tokenizer import model_config, tokenizer_loss
from latentforge.training import (
    EMA,
    Batch,
    LossFn,
    build_optimizer,
    compile_in_place,
    train_step,
)

MATMUL_N = 2048
NUM_CLASSES = 10


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode counts the CUDA attention kernels only; count the CPU ones alike."""
    try:
        @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
        def _forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                     out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                      *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    except (RuntimeError, ValueError):  # a torch that counts them itself
        pass


@dataclass
class Workload:
    """One model at one size, as its stage trains it."""

    model: str
    size: str
    shape: str  # what one example is, for the table
    cfg: TrainConfig
    build: Callable[[], nn.Module]
    loss_fn: LossFn
    batch: Callable[[], Batch]


def workloads(params: Params, args: argparse.Namespace) -> list[Workload]:
    tok, gen = params.tokenizer, params.generator
    res, ch = params.prepare.resolution, params.prepare.channels
    default_tok = model_config(tok, res, ch)
    k, d = default_tok.latent_tokens, default_tok.token_dim
    vocab = math.prod(tok.fsq_levels)
    out = []
    for size in args.sizes:
        tok_cfg = tok if size == "default" else dataclasses.replace(tok, size=size)
        tok_res, tok_ch = (res, ch) if size == "default" else (args.small_resolution, 3)
        gen_size = gen.size if size == "default" else size
        tok_size = tok.size if size == "default" else size

        def images(b: int = tok.batch_size, c: int = tok_ch, r: int = tok_res) -> Batch:
            return {"images": torch.rand(b, c, r, r) * 2 - 1}

        def latents(b: int = gen.batch_size) -> Batch:
            return {"latents": torch.randn(b, k, d), "labels": torch.randint(0, NUM_CLASSES, (b,))}

        def codes(b: int = gen.batch_size) -> Batch:
            return {"codes": torch.randint(0, vocab, (b, k)),
                    "labels": torch.randint(0, NUM_CLASSES, (b,))}

        if "tokenizer" in args.models:
            mcfg = model_config(tok_cfg, tok_res, tok_ch)
            out.append(Workload("tokenizer", tok_size, f"{tok_ch}x{tok_res}x{tok_res}", tok_cfg,
                                functools.partial(Tokenizer, mcfg),
                                functools.partial(tokenizer_loss, cfg=tok_cfg), images))
        if "generator" in args.models:
            gcfg = generator_config(gen_size, num_tokens=k, token_dim=d, num_classes=NUM_CLASSES)
            loss = functools.partial(generator_loss, shift=torch.zeros(d), scale=torch.ones(d),
                                     class_dropout=gen.class_dropout,
                                     time_sampling=gen.time_sampling, null_class=NUM_CLASSES)
            out.append(Workload("flow generator", gen_size, f"{k}x{d} latents", gen,
                                functools.partial(FlowTransformer, gcfg), loss, latents))
        if "maskgit" in args.models:
            mcfg_t = token_generator_config(gen_size, kind="maskgit", num_tokens=k,
                                            vocab_size=vocab, num_classes=NUM_CLASSES,
                                            dropout=gen.dropout)
            loss = functools.partial(token_generator_loss, kind="maskgit",
                                     class_dropout=gen.class_dropout,
                                     label_smoothing=gen.label_smoothing,
                                     null_class=NUM_CLASSES, mask_code=vocab)
            out.append(Workload("maskgit generator", gen_size, f"{k} codes of {vocab}", gen,
                                functools.partial(TokenTransformer, mcfg_t), loss, codes))
    return out


class Clock:
    """Wall clock, or this process's CPU time (`--cpu-time`)."""

    def __init__(self, cpu_time: bool) -> None:
        self.now = time.process_time if cpu_time else time.perf_counter


def matmul_block(dtype: torch.dtype, onednn: bool = False) -> Callable[[], None]:
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    if onednn:  # the kernel models/layers.py's Linear uses for fp32 where it pays
        return lambda: (torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), None)[1]
    return lambda: (a @ b, None)[1]


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    compile_seconds: float = 0.0


def make_variant(w: Workload, bf16: bool, compiled: bool) -> Variant:
    torch.manual_seed(0)
    model = w.build()
    if compiled:
        compile_in_place(model)
    cfg = dataclasses.replace(w.cfg, bf16=bf16)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay)
    batch = w.batch()
    model.train()

    def step() -> None:
        train_step(model, optimizer, ema, w.loss_fn, batch, cfg.warmup_steps + 1, cfg)

    # Wall clock whatever --cpu-time says: inductor compiles in worker processes.
    start = time.perf_counter()
    step()  # warm-up (and compilation)
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    name = ("bf16" if bf16 else "fp32") + ("+compile" if compiled else "")
    return Variant(name, step, max(first - second, 0.0) if compiled else 0.0)


def count_flops(w: Workload) -> int:
    torch.manual_seed(0)
    model = w.build()
    optimizer = build_optimizer(model, w.cfg)
    # aten's matmuls, which FlopCounterMode counts: oneDNN's linear op is not among them
    with fp32_linear("blas"), FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, None, w.loss_fn, w.batch(), 1, w.cfg)
    return counter.get_total_flops()


def linear_block(w: Workload, bf16: bool = False) -> tuple[Callable[[], None], int]:
    """The model's fp32 Linear layers alone, forward and backward, at the shapes one training
    step gives them (recorded by forward hooks), on the kernels the model uses: what the step
    would cost if attention, norms, activations, the loss and the optimizer were free. Returns
    the block and its FLOPs (2 x rows x in x out per matmul; the input's gradient only where
    the step needs it). `bf16`: the same layers under bf16 autocast, fp32 inputs (autocast's
    casts of inputs, weights and gradients included, as in a bf16 step)."""
    torch.manual_seed(0)
    model = w.build()
    optimizer = build_optimizer(model, w.cfg)
    seen: list[tuple[nn.Linear, torch.Size, bool]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        assert isinstance(module, nn.Linear)
        seen.append((module, inputs[0].shape, inputs[0].requires_grad))

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, nn.Linear)]
    train_step(model, optimizer, None, w.loss_fn, w.batch(), 1, w.cfg)
    for hook in hooks:
        hook.remove()
    calls, flops = [], 0
    for module, shape, input_grad in seen:
        x = torch.randn(shape).requires_grad_(input_grad)
        grad = torch.randn(*shape[:-1], module.out_features,
                           dtype=torch.bfloat16 if bf16 else torch.float32)
        calls.append((module, x, grad))
        flops += 2 * math.prod(shape) * module.out_features * (2 + input_grad)

    def block() -> None:
        for module, x, grad in calls:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(x)
            out.backward(grad)

    return block, flops


def measure(w: Workload, args: argparse.Namespace, clock: Clock) -> list[dict[str, Any]]:
    flops = count_flops(w)
    variants = [make_variant(w, p == "bf16", False) for p in args.precisions]
    if args.compile:
        variants += [make_variant(w, p == "bf16", True) for p in args.precisions]
    mm = {"fp32": matmul_block(torch.float32), "bf16": matmul_block(torch.bfloat16),
          "fp32_onednn": matmul_block(torch.float32, onednn=True)}
    linears, linear_flops = linear_block(w)
    linears_bf16, _ = linear_block(w, bf16=True)
    for f in [*mm.values(), linears, linears_bf16]:
        f()
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    mm_seconds: dict[str, list[float]] = {k: [] for k in mm}
    linear_seconds: list[float] = []
    linear_bf16_seconds: list[float] = []
    for _ in range(args.rounds):
        for key, f in mm.items():
            start = clock.now()
            f()
            mm_seconds[key].append(clock.now() - start)
        start = clock.now()
        for _ in range(args.steps):
            linears()
        linear_seconds.append((clock.now() - start) / args.steps)
        start = clock.now()
        for _ in range(args.steps):
            linears_bf16()
        linear_bf16_seconds.append((clock.now() - start) / args.steps)
        for v in variants:
            start = clock.now()
            for _ in range(args.steps):
                v.step()
            seconds[v.name].append((clock.now() - start) / args.steps)
    mm_rate = {k: 2 * MATMUL_N**3 / statistics.median(s) for k, s in mm_seconds.items()}
    batch_size = w.cfg.batch_size
    fp32_step = statistics.median(seconds["fp32"]) if "fp32" in seconds else None
    linear_s = statistics.median(linear_seconds)
    linear_rate = linear_flops / linear_s
    linear_bf16_s = statistics.median(linear_bf16_seconds)
    rows = []
    for v in variants:
        step_s = statistics.median(seconds[v.name])
        rate = flops / step_s
        rows.append({"model": w.model, "size": w.size, "shape": w.shape, "batch": batch_size,
                     "variant": v.name, "images_per_s": batch_size / step_s,
                     "gflop_per_step": flops / 1e9, "gflop_per_s": rate / 1e9,
                     "vs_fp32_matmul": rate / mm_rate["fp32"],
                     "vs_bf16_matmul": rate / mm_rate["bf16"],
                     "vs_onednn_matmul": rate / mm_rate["fp32_onednn"],
                     "vs_fp32_step": (fp32_step / step_s) if fp32_step else float("nan"),
                     "compile_s": v.compile_seconds,
                     # the fp32 Linear layers alone: their rate, and their share of the step
                     "linear_vs_onednn": linear_rate / mm_rate["fp32_onednn"],
                     "linear_vs_fp32": linear_rate / mm_rate["fp32"],
                     "linear_share": (linear_s / fp32_step) if fp32_step else float("nan"),
                     "linear_bf16_speedup": linear_s / linear_bf16_s,
                     "fp32_matmul_gflops": mm_rate["fp32"] / 1e9,
                     "onednn_matmul_gflops": mm_rate["fp32_onednn"] / 1e9,
                     "bf16_matmul_gflops": mm_rate["bf16"] / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    parser.add_argument("--models", default="tokenizer,generator,maskgit")
    parser.add_argument("--sizes", default="default,small")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--small-resolution", type=int, default=32)
    parser.add_argument("--cpu-time", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--overhead", action="store_true",
                        help="also time a default `latentforge run` (minutes; bench/overhead.py)")
    args = parser.parse_args()
    for key in ("models", "sizes", "precisions"):
        setattr(args, key, getattr(args, key).split(","))
    tune_malloc()  # as the CLI does before a stage trains (latentforge/malloc.py)
    torch.set_num_threads(args.threads)
    _register_cpu_attention_flops()
    clock = Clock(args.cpu_time)
    params = load_params(args.params)

    print(f"# {machine_key(torch.device('cpu'))}; {os.cpu_count()} CPUs; "
          f"{'CPU time' if args.cpu_time else 'wall clock'}; "
          f"load average {os.getloadavg()[0]:.2f}; {datetime.date.today()}; "
          f"fp32 Linear layers on {fp32_linear_backend()} (models/layers.py)")
    print("| model | size | example | batch | precision | img/s | GFLOP/step | GFLOP/s | "
          "/ fp32 matmul | / oneDNN fp32 matmul | / bf16 matmul | vs fp32 step | "
          "matmul fp32, oneDNN fp32, bf16 GFLOP/s | Linear alone / fp32, oneDNN matmul | "
          "Linear alone / fp32 step | Linear alone bf16 vs fp32 |"
          + (" compile s |" if args.compile else ""))
    print("|---" * (16 + args.compile) + "|")
    for w in workloads(params, args):
        for r in measure(w, args, clock):
            print(f"| {r['model']} | {r['size']} | {r['shape']} | {r['batch']} | {r['variant']} | "
                  f"{r['images_per_s']:.0f} | {r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} | "
                  f"{r['vs_fp32_matmul']:.2f} | {r['vs_onednn_matmul']:.2f} | "
                  f"{r['vs_bf16_matmul']:.2f} | {r['vs_fp32_step']:.2f}x | "
                  f"{r['fp32_matmul_gflops']:.0f}, {r['onednn_matmul_gflops']:.0f}, "
                  f"{r['bf16_matmul_gflops']:.0f} | "
                  f"{r['linear_vs_fp32']:.2f}, {r['linear_vs_onednn']:.2f} | "
                  f"{r['linear_share']:.2f} | {r['linear_bf16_speedup']:.2f}x |"
                  + (f" {r['compile_s']:.1f} |" if args.compile else ""), flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    if args.overhead:
        import sys
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from overhead import fresh_clone, report
        from overhead import measure as measure_overhead

        with tempfile.TemporaryDirectory() as tmp:
            print("# orchestration of a default run (bench/overhead.py)")
            print(report(measure_overhead(fresh_clone(Path(tmp) / "project"))), flush=True)


if __name__ == "__main__":
    main()
