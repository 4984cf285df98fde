"""The "own data" check: a 10,000-image 28x28 digit set through the whole pipeline.

Builds an MNIST-like npz from the embedded digits (each 8x8 digit upscaled to 20x20 and
placed at a random offset in a 28x28 canvas), then, in a fresh clone of this repository
(a temporary folder), runs `latentforge run --params presets/digits28.yaml` and prints the
wall time, each stage's seconds and the numbers that say whether it worked: judge and
evaluator accuracy, tokenizer PSNR, the generator's evaluator accuracy at its CFG scale with
its interval, gFD-eval and KID against an equal number of real held-out images.
`--quick` runs only prepare -> judge -> tokenizer in-process (the tokenizer's numbers).

    python bench/digits28.py [--images 10000] [--quick] [-S tokenizer.steps=3000 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from latentforge.config import load_params
from latentforge.tasks import judge, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]


def build_digits28(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(digits.images), n)
    out = np.zeros((n, 28, 28), np.uint8)
    for i, j in enumerate(pick):
        small = Image.fromarray(np.uint8(digits.images[j] * (255 / 16)))
        big = np.asarray(small.resize((20, 20), Image.Resampling.BICUBIC))
        dy, dx = rng.integers(0, 9, 2)
        out[i, dy:dy + 20, dx:dx + 20] = big
    return out, digits.target[pick].astype(np.int64)


def quick(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        images, labels = build_digits28(args.images)
        np.savez("digits28.npz", images=images, labels=labels)
        params = load_params(REPO / "presets/digits28.yaml", args.overrides)
        started = time.perf_counter()
        prepare.run(params.prepare, out_dir="prepared")
        t_prep = time.perf_counter()
        j = judge.run(params, out_dir="judge", prepared_dir="prepared")
        t_judge = time.perf_counter()
        t = tokenizer.run(params, out_dir="tok", prepared_dir="prepared", judge_dir="judge",
                          plot_file="prefix.csv")
        done = time.perf_counter()
    print(f"{args.images} images 28x28: prepare {t_prep - started:.0f} s, judge "
          f"{t_judge - t_prep:.0f} s (val acc {j.metrics['val_accuracy']:.4f}), tokenizer "
          f"{done - t_judge:.0f} s ({t.timings['train_images_per_s']:.0f} train images/s)")
    print("tokenizer metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in t.metrics.items()))
    print(f"total {done - started:.0f} s of wall time on {os.cpu_count()} CPUs")


def ci(m: dict[str, float], key: str) -> str:
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{m[key]:.4g}" + (f" [{low:.4g}, {high:.4g}]" if low is not None else "")


def full(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from overhead import fresh_clone, stage_table

    with tempfile.TemporaryDirectory() as tmp:
        root = fresh_clone(Path(args.keep) if args.keep else Path(tmp) / "project")
        images, labels = build_digits28(args.images)
        np.savez(root / "digits28.npz", images=images, labels=labels)
        cmd = ["latentforge", "run", "--params", "presets/digits28.yaml"]
        cmd += [x for o in args.overrides for x in ("-S", o)]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}", "PYTHONSAFEPATH": "1"}
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"latentforge run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        table = stage_table(proc.stdout)
        m = {s: json.loads((root / f"metrics/{s}.json").read_text()) for s in table}
    cfg = load_params(REPO / "presets/digits28.yaml", args.overrides).generator.cfg_scale
    j, t, g, e = m["judge"], m["tokenizer"], m["generator"], m["evaluate"]
    sweep = f"sweep_base.cfg{str(cfg).replace('.', '_').removesuffix('_0')}"
    print(f"{args.images} images 28x28, {os.cpu_count()} CPUs, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}: pipeline {wall / 60:.1f} min")
    print("stages (s): " + ", ".join(f"{s} {sec:.0f}" for s, (_, sec) in table.items()))
    print(f"judge val accuracy {j['val_accuracy']:.4f}, evaluator {j['evaluator_val_accuracy']:.4f}; "
          f"tokenizer val PSNR {t['val_psnr']:.2f} dB, rFD-judge {t['rfd_judge']:.3g}")
    print(f"generator at CFG {cfg} ({int(g['real_count'])} samples vs as many real held-out): "
          f"evaluator accuracy {g['eval_accuracy']:.4f}, gFD-eval {g['gfd_eval_at_real_count']:.3g}"
          f" vs real {g['real_fd_eval']:.3g} ({g['gfd_ratio_to_real']:.2f}x), KID "
          f"{g['kid_eval']:.3g} +- {g['kid_eval_std']:.3g}")
    if f"{sweep}_eval_accuracy" in e:
        print(f"evaluate, base at CFG {cfg} (equal counts, 95% intervals): evaluator accuracy "
              f"{ci(e, f'{sweep}_eval_accuracy')}, gFD-eval {ci(e, f'{sweep}_gfd_eval')}; real "
              f"held-out FD at that count {e['real.fd_at_n']:.3g}")
    print(f"evaluate, RL vs base at CFG 1: accuracy {ci(e, 'rl.eval_accuracy')} vs "
          f"{ci(e, 'base.eval_accuracy')}, gFD-eval {ci(e, 'rl.gfd_eval')} vs "
          f"{ci(e, 'base.gfd_eval')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="prepare -> judge -> tokenizer only, in-process")
    parser.add_argument("--keep", default=None, help="run in this (new) folder and keep it")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    (quick if args.quick else full)(args)


if __name__ == "__main__":
    main()
