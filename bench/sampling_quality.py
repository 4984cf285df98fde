"""Sample quality of a trained generator at several sampling settings, over several sample seeds.

For each setting (a CFG scale and, for maskgit and ar, overrides of the generator's
`sampling` options: temperature, choice_temperature, top_k, top_p), draws the generator
stage's evaluation set (`--per-class` samples of each class) with sample seeds 0..N-1 and
prints the evaluator's accuracy, gFD-eval against the train split, and the ratio of gFD at
the held-out set's count and class composition to the held-out images' own FD (the generator
stage's `gfd_ratio_to_real`, "x floor"): the mean over the seeds and their range. It reads the
pipeline's outputs (or a workspace given by --root) and writes nothing.

    python bench/sampling_quality.py [--root .] [--seeds 5] \\
        [--variants '[{"cfg": 1.5}, {"cfg": 2.0, "sampling": {"temperature": 1.0}}]']
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from latentforge import flow, paths
from latentforge.data import load_prepared
from latentforge.tasks.generator import at_real_count, grade_features, load_generator
from latentforge.tasks.judge import load_judge

SAMPLING_KEYS = {"temperature", "choice_temperature", "top_k", "top_p"}


def parse_variants(text: str) -> list[dict]:
    variants = json.loads(text)
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "cfg" in v
                                                 for v in variants):
        raise SystemExit(f"--variants must be a JSON list of objects with a 'cfg' key, got {text}")
    for v in variants:
        unknown = set(v.get("sampling", {})) - SAMPLING_KEYS
        if unknown:
            raise SystemExit(f"--variants: unknown sampling option(s) {sorted(unknown)}; "
                             f"choose from {sorted(SAMPLING_KEYS)}")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="workspace holding the pipeline's outputs")
    parser.add_argument("--variants", default='[{"cfg": 1.5}]')
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25, help="flow: ODE steps")
    parser.add_argument("--sampler", default="heun", help="flow: ODE sampler")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = parse_variants(args.variants)
    torch.set_num_threads(args.threads)
    root = args.root
    if not (root / paths.GENERATOR).is_dir():
        raise SystemExit(f"no trained generator at {root / paths.GENERATOR}: run `latentforge run` "
                         "there first, or pass --root WORKSPACE")
    handle = load_generator(root / paths.GENERATOR, root / paths.TOKENIZER)
    evaluator = load_judge(root / paths.EVALUATOR)
    prepared = load_prepared(root / paths.PREPARED)
    train_x, train_y = prepared.split("train")
    val_x, val_y = prepared.split("val")
    ref, _ = evaluator.score(train_x)
    val, _ = evaluator.score(val_x)
    labels = flow.balanced_labels(prepared.num_classes, args.per_class).numpy()
    own = dict(handle.meta.get("sampling", {}))
    if handle.kind == "flow" and any(v.get("sampling") for v in variants):
        raise SystemExit("--variants: 'sampling' options are for maskgit and ar generators; this "
                         "one is a flow generator (use --steps and --sampler)")
    print(f"# {handle.kind} generator, {len(labels)} samples per seed, seeds 0-{args.seeds - 1}"
          f", {len(val_y)} held-out real images")
    print("| cfg | sampling | evaluator accuracy | gFD-eval [range] | x floor [range] |")
    print("|---|---|---|---|---|")
    for v in variants:
        if handle.kind != "flow":
            handle.meta["sampling"] = {**own, **v.get("sampling", {})}
        rows = []
        for seed in range(args.seeds):
            latents, _ = handle.sample_latents(labels, seed=seed, steps=args.steps,
                                               cfg_scale=float(v["cfg"]), sampler=args.sampler)
            feats, logp = evaluator.score(handle.tokenizer.decode(latents))
            graded = grade_features(feats, logp, labels, ref)
            generated, real = at_real_count(ref, feats, labels, val, val_y, ref_labels=train_y)
            rows.append((graded["eval_accuracy"], graded["gfd_eval"],
                         generated["fd_at_n"] / max(real["fd_at_n"], 1e-9)))
        a = np.array(rows)
        print(f"| {v['cfg']:g} | {json.dumps(v.get('sampling', {}))} | {a[:, 0].mean():.3f} | "
              f"{a[:, 1].mean():.2f} [{a[:, 1].min():.2f}, {a[:, 1].max():.2f}] | "
              f"{a[:, 2].mean():.2f} [{a[:, 2].min():.2f}, {a[:, 2].max():.2f}] |", flush=True)


if __name__ == "__main__":
    main()
