"""1D tokens vs the 2D patch grid, at matched generator size (the FlowTok/TiTok claim).

Speed (always): for each layout, a generator of the same size over that layout's latent
shape; prints generator training step time (forward + backward + AdamW, batch 64), ODE
sampling throughput (Heun, 25 steps, CFG) with decoding, and the ratios to the 2D baseline
next to the ratio of token counts.

Quality (--quality): trains tokenizer + cache + generator per layout with the stage code on
the embedded digits in a temporary folder and prints gFD-eval and judge accuracy (minutes).

    python bench/latent_layouts.py [--size small] [--resolution 16] [--quality]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from latentforge import flow
from latentforge.config import build_params
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.models.tokenizer import Tokenizer
from latentforge.tasks.tokenizer import model_config

LAYOUTS = {  # name -> tokenizer overrides
    "1d K=16": {"layout": "1d", "num_tokens": 16, "patch_size": 4},
    "1d K=8": {"layout": "1d", "num_tokens": 8, "patch_size": 4},
    "2d patch 2": {"layout": "2d", "patch_size": 2},
}


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def measure_layout(over: dict, size: str, resolution: int) -> dict[str, float]:
    params = build_params({"tokenizer": over})
    tok = Tokenizer(model_config(params.tokenizer, resolution, 1)).eval()
    k, d = tok.num_tokens, tok.token_dim
    gen = FlowTransformer(generator_config(size, num_tokens=k, token_dim=d, num_classes=10))
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4)
    x, y = torch.randn(64, k, d), torch.randint(0, 10, (64,))
    labels = torch.arange(64) % 10

    def step() -> None:
        loss, _ = flow.flow_matching_loss(gen, x, y, class_dropout=0.1, time_sampling="uniform",
                                          null_class=10)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample() -> None:
        z, _ = flow.ode_sample(lambda xt, t: gen.forward_with_cfg(xt, t, labels, 2.0),
                               torch.randn(64, k, d), 25, "heun")
        tok.decode(z)

    return {"tokens": k, "step_s": timed(step, 10), "sample_s": timed(sample, 2)}


def speed(size: str, resolution: int) -> dict[str, dict[str, float]]:
    return {name: measure_layout(over, size, resolution) for name, over in LAYOUTS.items()}


def quality(layout: dict, root: str) -> dict[str, float]:
    from latentforge.tasks import cache, generator, judge, prepare, tokenizer

    os.chdir(root)
    params = build_params({"tokenizer": {**layout, "steps": 800},
                           "generator": {"size": "tiny", "steps": 1500, "batch_size": 64,
                                         "final_per_class": 30}})
    prepare.run(params.prepare, out_dir="prepared")
    judge.run(params, out_dir="judge", prepared_dir="prepared")
    tokenizer.run(params, out_dir="tok", prepared_dir="prepared", judge_dir="judge",
                  plot_file="prefix.csv")
    cache.run(params, out_dir="cache", prepared_dir="prepared", tokenizer_dir="tok")
    started = time.perf_counter()
    r = generator.run(params, out_dir="gen", cache_dir="cache", tokenizer_dir="tok",
                      evaluator_dir="evaluator", prepared_dir="prepared")
    return {**r.metrics, "generator_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--quality", action="store_true")
    args = parser.parse_args()
    res = speed(args.size, args.resolution)
    base = res["2d patch 2"]
    print(f"generator size {args.size}, {args.resolution}x{args.resolution}, "
          f"{torch.get_num_threads()} threads")
    for name, r in res.items():
        print(f"{name:11s} tokens {r['tokens']:3d}  train step {1e3 * r['step_s']:7.1f} ms "
              f"(x{base['step_s'] / r['step_s']:.2f} vs 2d)  sampling "
              f"{64 / r['sample_s']:7.1f} images/s (x{base['sample_s'] / r['sample_s']:.2f})  "
              f"token ratio x{base['tokens'] / r['tokens']:.2f}")
    if args.quality:
        import ray

        for name in ("1d K=16", "2d patch 2"):
            with tempfile.TemporaryDirectory() as tmp:
                q = quality(LAYOUTS[name], tmp)
                # The local Ray instance (cache stage) started in this folder; its workers
                # cannot start once the folder is gone, so stop it before removing it.
                ray.shutdown()
                os.chdir(tempfile.gettempdir())
            print(f"{name:11s} gFD-eval {q['gfd_eval']:.3f} (held-out real {q['real_fd_eval']:.3f})"
                  f"  judge accuracy {q['eval_accuracy']:.3f}  generator stage "
                  f"{q['generator_seconds']:.0f} s")


if __name__ == "__main__":
    main()
