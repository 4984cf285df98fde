"""Caching throughput through the Ray Data actor pool against a bare encoder loop.

Self-contained: prepares the embedded digits at `--resolution`, tiled to `--images` images,
trains the default tokenizer config for a few steps (throughput does not depend on the
weights) in a temporary folder, then measures in one process:

- bare: a plain loop over the same images, same batch size, same torch threads
  (uint8 -> float conversion + encoder forward), the ceiling for caching;
- cache: the cache stage's Ray Data pipeline (actor start-up included, Ray start-up not),
  its images/s, the ratio to bare, and the share of actor time spent outside the encoder.

    .venv/bin/python bench/cache_throughput.py [--images 20000] [--workers 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.cache_throughput")


def make_tokenizer(root: Path, resolution: int, images: int, steps: int) -> tuple[Path, Path]:
    """prepared/ (digits tiled to `images`) and tokenizer/ (default config, `steps` steps)."""
    from latentforge.config import PrepareConfig, build_params
    from latentforge.sources import read_source
    from latentforge.tasks import judge, prepare, tokenizer

    digits = read_source(PrepareConfig(resolution=resolution))
    reps = -(-images // len(digits.labels))
    npz = root / "digits_tiled.npz"
    np.savez(npz, images=np.tile(digits.images, (reps, 1, 1, 1))[:images],
             labels=np.tile(digits.labels, reps)[:images])
    params = build_params({
        "prepare": {"source": "npz", "path": str(npz), "resolution": resolution},
        "judge": {"steps": 1, "warmup_steps": 0, "save_every": 1},
        "tokenizer": {"steps": steps, "warmup_steps": 0, "save_every": steps},
    })
    prepare.run(params.prepare, out_dir=root / "prepared")
    judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
    tokenizer.run(params, out_dir=root / "tokenizer", prepared_dir=root / "prepared",
                  judge_dir=root / "judge", plot_file=root / "prefix.csv")
    return root / "prepared", root / "tokenizer"


def bare_encoder(prepared_dir: Path, tokenizer_dir: Path, batch_size: int,
                 threads: int) -> tuple[int, float]:
    """(images, seconds) of a plain encode loop over both splits, data already in memory."""
    import torch

    from latentforge.data import load_prepared
    from latentforge.tasks.judge import images_to_tensor
    from latentforge.tasks.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    prepared = load_prepared(prepared_dir)
    images = np.concatenate([np.asarray(prepared.split(s)[0]) for s in ("train", "val")])
    model = load_tokenizer(tokenizer_dir).model
    with torch.no_grad():
        model.encode(images_to_tensor(images[:batch_size]))  # warm-up (allocator, kernels)
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model.encode(images_to_tensor(images[start:start + batch_size]))
        seconds = time.perf_counter() - started
    return len(images), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1, help="Ray Data actors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--tokenizer-steps", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--root", type=Path, default=None,
                        help="keep prepared data and tokenizer here and reuse them next time "
                             "(default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from latentforge.config import build_params
    from latentforge.raycluster import init_ray
    from latentforge.tasks import cache

    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        root = args.root.resolve() if args.root else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.chdir(root)  # the stages' scratch folders (.latentforge/) go here
        if (root / "tokenizer").exists():
            prepared_dir, tokenizer_dir = root / "prepared", root / "tokenizer"
        else:
            prepared_dir, tokenizer_dir = make_tokenizer(root, args.resolution, args.images,
                                                         args.tokenizer_steps)
        params = build_params({
            "cache": {"batch_size": args.batch_size, "shard_size": args.shard_size},
            "compute": {"num_workers": args.workers, "cpus_per_worker": args.threads,
                        "use_gpu": args.gpu}})
        started = time.perf_counter()
        init_ray(params.compute)
        ray_start = time.perf_counter() - started

        # Bare loop before and after the pipeline, the faster one counts: a shared machine's
        # noise should not flatter the ratio.
        n_bare, before_s = bare_encoder(prepared_dir, tokenizer_dir, args.batch_size,
                                        args.threads)
        started = time.perf_counter()
        result = cache.run(params, out_dir=root / "cache", prepared_dir=prepared_dir,
                           tokenizer_dir=tokenizer_dir)
        stage_s = time.perf_counter() - started
        _, after_s = bare_encoder(prepared_dir, tokenizer_dir, args.batch_size, args.threads)

    t = result.timings
    bare = n_bare / min(before_s, after_s)
    cached = t["cache_images_per_s"]
    wall, workers = t["cache_seconds"], args.workers
    in_calls = t["actor_call_seconds"] / workers
    encoder = t["encoder_seconds"] / workers
    print(f"\n{n_bare} images {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{workers} actor(s) x {args.threads} thread(s)")
    print(f"bare encoder loop   : {bare:8.0f} images/s  (best of {before_s:.2f} s before, "
          f"{after_s:.2f} s after the pipeline)")
    print(f"cache via Ray Data  : {cached:8.0f} images/s  ({wall:.2f} s pipeline wall)")
    print(f"ratio cache / bare  : {cached / bare:8.1%}" + (
        f"  ({workers} actors against one bare process)" if workers > 1 else ""))
    print(f"outside the encoder : {t['outside_encoder_share']:8.1%}  of actor time")
    print(f"  per actor, of {wall:.2f} s: encoder forward {encoder:.2f} s, reading + conversion "
          f"{in_calls - encoder:.2f} s, outside calls (start-up, scheduling, transfer) "
          f"{wall - in_calls:.2f} s")
    inside = n_bare / in_calls / workers
    print(f"inside actor calls  : {inside:8.0f} images/s  ({inside / bare:.1%} of bare: what the "
          f"pipeline approaches once its actors are up)")
    print(f"not counted         : Ray start {ray_start:.1f} s; whole stage {stage_s:.1f} s "
          f"(with load, decode check, assembly)")


if __name__ == "__main__":
    main()
