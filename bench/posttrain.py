"""Decoder post-training on the default digits: does it pay? gFD before/after, with intervals.

Runs prepare -> judge -> tokenizer -> cache -> generator once with params.yaml (plus `-S`
overrides, e.g. `-S tokenizer.quantizer=fsq -S tokenizer.token_dim=4 -S generator.kind=maskgit`)
in a folder (default: a temporary one; `--root DIR` keeps it and reuses its inputs on the next
call), then the posttrain stage once per variant (`--variant NAME:KEY=VALUE,...` of posttrain
keys; default: the stage's defaults and a longer, faster-learning run). Prints, per variant,
gFD-eval against the train split and against the held-out val split, before -> after with the
paired 95% interval of after - before, evaluator accuracy, and val PSNR through both decoders.

    python bench/posttrain.py [--root DIR] [-S KEY=VALUE ...] [--variant NAME:KEY=VALUE,...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from latentforge.config import build_params, load_params
from latentforge.intervals import with_interval
from latentforge.tasks import cache, generator, judge, posttrain, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"defaults": {}, "2000 steps, lr 1e-3": {"steps": 2000, "lr": 1e-3, "save_every": 1000}}


def parse_pairs(pairs: str) -> dict[str, Any]:
    out = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def params_with(overrides: list[str], posttrain_keys: dict[str, Any]) -> Any:
    raw = load_params(REPO / "params.yaml").to_dict()
    for item in overrides:
        dotted, _, value = item.partition("=")
        section, _, key = dotted.partition(".")
        raw[section][key] = yaml.safe_load(value)
    raw["posttrain"].update({"enabled": True, **posttrain_keys})
    return build_params(raw)


def inputs(root: Path, overrides: list[str]) -> None:
    if (root / "generator" / "generator.json").is_file():
        print(f"reusing the inputs in {root}", flush=True)
        return
    params = params_with(overrides, {})
    started = time.perf_counter()
    prepare.run(params.prepare, out_dir=root / "prepared")
    judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
    tokenizer.run(params, out_dir=root / "tokenizer", prepared_dir=root / "prepared",
                  judge_dir=root / "judge", plot_file=root / "prefix.csv")
    cache.run(params, out_dir=root / "cache", prepared_dir=root / "prepared",
              tokenizer_dir=root / "tokenizer")
    generator.run(params, out_dir=root / "generator", cache_dir=root / "cache",
                  tokenizer_dir=root / "tokenizer", evaluator_dir=root / "evaluator",
                  prepared_dir=root / "prepared")
    print(f"inputs trained in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[])
    args = ap.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        variants = {}
        for text in args.variant:
            name, _, pairs = text.partition(":")
            variants[name] = parse_pairs(pairs)
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp:
        root = (args.root or Path(tmp)).resolve()  # absolute: the folder changes below
        root.mkdir(parents=True, exist_ok=True)
        os.chdir(root)  # the stages' checkpoints land here
        inputs(root, args.overrides)
        rows = []
        for i, (name, keys) in enumerate(variants.items()):
            started = time.perf_counter()
            # Each variant's checkpoints in a folder of its own: in one, a variant finds the
            # previous one's and logs that they belong to another configuration.
            # Emptied first: with --root, a previous call's would be resumed, not retrained.
            shutil.rmtree(root / f"variant{i}", ignore_errors=True)
            (root / f"variant{i}").mkdir()
            os.chdir(root / f"variant{i}")
            result = posttrain.run(params_with(args.overrides, keys), out_dir=root / f"decoder{i}",
                                   generator_dir=root / "generator",
                                   tokenizer_dir=root / "tokenizer",
                                   evaluator_dir=root / "evaluator",
                                   prepared_dir=root / "prepared")
            rows.append((name, result.metrics, time.perf_counter() - started))
            print(f"{name}: {rows[-1][2]:.0f} s", flush=True)
    print(f"\noverrides: {' '.join(args.overrides) or '(params.yaml)'}; "
          f"{int(rows[0][1]['samples'])} samples, the same latents through both decoders\n")
    print("| variant | gFD-eval, train ref: before -> after | after - before | gFD-eval, "
          "held-out ref: before -> after | after - before | accuracy | val PSNR (dB) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, seconds in rows:
        print(f"| {name} | {m['gfd_eval_before']:.3f} -> {m['gfd_eval_after']:.3f} | "
              f"{with_interval(m, 'gfd_eval_diff', sign=True)} | {m['gfd_val_before']:.3f} -> "
              f"{m['gfd_val_after']:.3f} | {with_interval(m, 'gfd_val_diff', sign=True)} | "
              f"{m['eval_accuracy_before']:.3f} -> {m['eval_accuracy_after']:.3f} | "
              f"{m['val_psnr_before']:.2f} -> {m['val_psnr_after']:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
