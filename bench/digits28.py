"""The "own data" check: a 10,000-image 28x28 digit set through prepare -> judge -> tokenizer.

Builds an MNIST-like npz from the embedded digits (each 8x8 digit upscaled to 20x20 and
placed at a random offset in a 28x28 canvas), then runs the real stages with
presets/digits28.yaml in a temporary folder and prints wall time and the tokenizer metrics.

    python bench/digits28.py [--images 10000] [-S tokenizer.steps=3000 ...]
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
