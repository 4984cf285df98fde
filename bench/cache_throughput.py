"""Caching throughput through the Ray Data actor pool against a bare encoder loop.

Self-contained: prepares the embedded digits at `--resolution`, tiled to `--images` images,
trains a tokenizer of `--size` for a few steps (throughput does not depend on the weights) in
a temporary folder, then measures in one process, `--repeats` times, alternating:

- bare: a plain loop over the same images, same batch size, same torch threads
  (uint8 -> float conversion + encoder forward), data in memory, model loaded and warmed up:
  the ceiling for caching;
- cache: the cache stage's Ray Data pipeline (Ray's own start not counted), split into
  start-up (actor process, torch import, model load, warm-up batch: a fixed cost) and steady
  state (reading from the memory-mapped shards, conversion, forward, transfers, scheduling,
  and the driver committing shards).

The steady-state ratio compares like with like: the bare loop's number excludes its own
imports, model load and warm-up too. The end-to-end ratio, start-up included, is printed with
the data size from which it passes 90%. A shared 2-core machine varies by 10-20% from run to
run, so the bench reports medians over the repeats, and each repeat's pipeline against the
bare loop measured next to it (which one goes first alternates).

With one worker and no cluster the stage encodes in-process, and so does the bench; `--ray`
measures the Ray Data actor pool instead, on the cluster path (the driver ships the images
through the object store; several local workers without a cluster read the shards themselves).

    .venv/bin/python bench/cache_throughput.py [--images 20000] [--size tiny] [--repeats 3]
        [--ray]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.cache_throughput")


def make_tokenizer(root: Path, resolution: int, images: int, steps: int,
                   size: str) -> tuple[Path, Path]:
    """prepared/ (digits tiled to `images`) and tokenizer/ (`size`, `steps` steps)."""
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
        "tokenizer": {"size": size, "steps": steps, "warmup_steps": 0, "save_every": steps},
    })
    prepare.run(params.prepare, out_dir=root / "prepared")
    judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
    tokenizer.run(params, out_dir=root / "tokenizer", prepared_dir=root / "prepared",
                  judge_dir=root / "judge", plot_file=root / "prefix.csv")
    return root / "prepared", root / "tokenizer"


def bare_encoder(prepared_dir: Path, tokenizer_dir: Path, batch_size: int, threads: int,
                 gpu: bool = False) -> tuple[int, float]:
    """(images, seconds) of a plain encode loop over both splits, data already in memory.

    On the GPU (`gpu`) each batch is converted on the CPU and copied over, as in the actors.
    """
    import torch

    from latentforge.data import load_prepared
    from latentforge.tasks.judge import images_to_tensor
    from latentforge.tasks.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")
    prepared = load_prepared(prepared_dir)
    images = np.concatenate([np.asarray(prepared.split(s)[0]) for s in ("train", "val")])
    model = load_tokenizer(tokenizer_dir).model.to(device).eval()
    with torch.no_grad():
        # Warm-up (allocator, kernels), as the actors do in their constructor.
        model.encode(images_to_tensor(images[:batch_size]).to(device))
        if gpu:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(images), batch_size):
            model.encode(images_to_tensor(images[start:start + batch_size]).to(device))
        if gpu:  # the forward passes only, not copying the encodings back: a higher ceiling
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return len(images), seconds


def images_for_ratio(target: float, bare: float, steady: float, startup: float) -> float:
    """Images from which end-to-end throughput, start-up included, reaches target x bare."""
    if steady <= target * bare:
        return float("inf")
    return target * bare * startup / (1.0 - target * bare / steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", default="tiny", help="tokenizer size from the registry")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=1, help="Ray Data actors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--repeats", type=int, default=3, help="bare/pipeline pairs; medians")
    parser.add_argument("--tokenizer-steps", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--ray", action="store_true",
                        help="measure the Ray Data actor pool even with one worker, on the "
                             "cluster path (the local instance is named as a cluster, so the "
                             "driver ships the images through the object store); without it "
                             "one worker encodes in-process, as the stage does by default")
    parser.add_argument("--root", type=Path, default=None,
                        help="keep prepared data and tokenizer here and reuse them next time "
                             "(default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from latentforge.malloc import tune_malloc

    # As in every LatentForge process (the CLI, the actors): the bare loop gets the same
    # allocator settings as the pipeline it is compared with.
    tune_malloc()
    from latentforge.config import build_params
    from latentforge.raycluster import init_ray, use_ray
    from latentforge.tasks import cache

    bare_runs: list[float] = []
    runs: list[dict[str, float]] = []
    n_images = 0
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        root = args.root.resolve() if args.root else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        os.chdir(root)  # the stages' scratch folders (.latentforge/) go here
        if (root / "tokenizer").exists():
            prepared_dir, tokenizer_dir = root / "prepared", root / "tokenizer"
        else:
            prepared_dir, tokenizer_dir = make_tokenizer(root, args.resolution, args.images,
                                                         args.tokenizer_steps, args.size)
        params = build_params({
            "cache": {"batch_size": args.batch_size, "shard_size": args.shard_size},
            "compute": {"num_workers": args.workers, "cpus_per_worker": args.threads,
                        "use_gpu": args.gpu}})
        started = time.perf_counter()
        init_ray(params.compute)
        ray_start = time.perf_counter() - started
        if args.ray:  # the local instance named as a cluster: the stage takes the Ray path
            import ray

            params = build_params({
                "cache": {"batch_size": args.batch_size, "shard_size": args.shard_size},
                "compute": {"num_workers": args.workers, "cpus_per_worker": args.threads,
                            "use_gpu": args.gpu,
                            "ray_address": ray.get_runtime_context().gcs_address}})
        path = "Ray Data actor pool" if use_ray(params.compute) else "in-process"

        def bare_once() -> None:
            nonlocal n_images
            n_images, seconds = bare_encoder(prepared_dir, tokenizer_dir, args.batch_size,
                                             args.threads, args.gpu)
            bare_runs.append(n_images / seconds)

        def cache_once() -> None:
            started = time.perf_counter()
            result = cache.run(params, out_dir=root / "cache", prepared_dir=prepared_dir,
                               tokenizer_dir=tokenizer_dir)
            runs.append({**result.timings, "stage_seconds": time.perf_counter() - started})

        for i in range(args.repeats):
            # Alternating which goes first cancels a machine that speeds up or slows down.
            for measure in (bare_once, cache_once) if i % 2 == 0 else (cache_once, bare_once):
                measure()
            log.info("repeat %d/%d: bare %.0f images/s, cache %.0f images/s end to end, "
                     "%.0f steady", i + 1, args.repeats, bare_runs[-1],
                     runs[-1]["cache_images_per_s"], runs[-1]["cache_steady_images_per_s"])

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    bare, workers = statistics.median(bare_runs), args.workers
    cached, steady = median("cache_images_per_s"), median("cache_steady_images_per_s")
    startup, wall = median("cache_startup_seconds"), median("cache_seconds")
    encoder = median("encoder_seconds") / workers
    in_calls = median("actor_call_seconds") / workers
    vs = f"  ({workers} actors against one bare process)" if workers > 1 else ""
    # Each repeat's pipeline against the bare loop measured right next to it: the machine's
    # drift (10-20% over minutes here) cancels within a pair, not across medians.
    ratios = sorted(r["cache_steady_images_per_s"] / b for b, r in zip(bare_runs, runs,
                                                                         strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    spread = ", ".join(f"{b:.0f}/{r['cache_steady_images_per_s']:.0f}"
                       for b, r in zip(bare_runs, runs, strict=True))
    print(f"\n{n_images} images {args.resolution}x{args.resolution}, {args.size} tokenizer, "
          f"batch {args.batch_size}, {path}, {workers} actor(s) x {args.threads} thread(s), "
          f"median of "
          f"{args.repeats} (bare/steady per repeat: {spread})")
    print(f"bare encoder loop     : {bare:8.0f} images/s")
    print(f"cache, steady state   : {steady:8.0f} images/s  = {steady / bare:6.1%} of bare{vs}")
    print(f"  per repeat, steady / the bare loop next to it: median "
          f"{statistics.median(ratios):.1%}, middle half {quartiles[0]:.1%}-{quartiles[2]:.1%}, "
          f"{sum(r >= 0.9 for r in ratios)} of {len(ratios)} repeats >= 90%")
    forward = statistics.median(n_images / r["encoder_seconds"] * workers for r in runs)
    print(f"  the actor's forward passes alone: {forward:8.0f} images/s = {forward / bare:6.1%} of "
          f"the bare loop (which also converts uint8 to float)")
    print(f"cache, end to end     : {cached:8.0f} images/s  = {cached / bare:6.1%} of bare "
          f"({wall:.2f} s, of which start-up {startup:.2f} s)")
    need = images_for_ratio(0.9, bare, steady, startup)
    print(f"end to end >= 90%     : from ~{need:,.0f} images at this model size "
          f"(start-up {startup:.1f} s is a fixed cost)" if need != float("inf") else
          "end to end >= 90%     : never (steady state is below 90%)")
    print(f"outside the encoder   : {median('outside_encoder_share'):8.1%} of actor time, "
          f"{median('steady_outside_encoder_share'):.1%} after start-up")
    print(f"outside actor calls   : {median('steady_outside_calls_share'):8.1%} of steady-state "
          f"actor time (scheduling, the first call's wait, the last block's transfer and commit)")
    print(f"  per actor, of {wall:.2f} s: encoder forward {encoder:.2f} s, reading + conversion "
          f"{in_calls - encoder:.2f} s, outside calls (start-up, scheduling, transfer) "
          f"{wall - in_calls:.2f} s")
    print(f"not counted           : Ray start {ray_start:.1f} s; whole stage "
          f"{median('stage_seconds'):.1f} s (with load, decode check, assembly)")


if __name__ == "__main__":
    main()
