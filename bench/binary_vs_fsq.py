"""Binary (LFQ) tokens against fsq at the same bit budget: reconstruction on the default digits.

Trains the tokenizer stage with params.yaml (embedded digits, 16x16, K = 16 tokens, default
steps) in a temporary folder, after prepare and judge (the stage needs the judge for rFD): fsq
with the default levels [8, 5, 5, 5] (log2(1000) = 9.97 bits per token, token_dim 4), binary
with token_dim 10 (10 bits per token) and the default entropy_weight (null: 0.1 for binary),
and binary without the entropy term (entropy_weight 0). Prints val PSNR, SSIM, rFD-judge, code usage and training time of each,
and each minus fsq. The target: binary within 2 dB of fsq.

Extra binary variants: `--binary NAME:KEY=VALUE,...` (tokenizer keys, e.g.
`--binary ew0.3:entropy_weight=0.3`); `-S KEY=VALUE` overrides params.yaml for every run.

    python bench/binary_vs_fsq.py [--steps 1500] [--binary NAME:KEY=VALUE,...] [-S KEY=VALUE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from latentforge.config import build_params, load_params
from latentforge.tasks import judge, prepare, tokenizer

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> tokenizer overrides
    "fsq [8,5,5,5]": {"quantizer": "fsq", "token_dim": 4, "fsq_levels": [8, 5, 5, 5]},
    "binary D=10": {"quantizer": "binary", "token_dim": 10},
    "binary D=10 ew0": {"quantizer": "binary", "token_dim": 10, "entropy_weight": 0.0},
}
COLUMNS = ("val_psnr", "val_ssim", "rfd_judge", "codebook_usage", "codebook_perplexity")


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (NAME, binary D=10's overrides updated by the pairs)."""
    name, _, pairs = text.partition(":")
    extra = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        extra[key] = yaml.safe_load(value)
    return name, {**VARIANTS["binary D=10"], **extra}


def train_tokenizer(raw: dict, overrides: dict, index: int) -> dict[str, float]:
    """The tokenizer stage with `overrides`, in a sub-folder of the current (temporary) one:
    each variant keeps its checkpoints under its own .latentforge/ (in one folder, every
    variant would find the last one's checkpoints and log that it starts afresh)."""
    raw = {**raw, "tokenizer": {**raw["tokenizer"], **overrides}}
    params = build_params(raw)
    home = Path.cwd()
    folder = home / f"variant{index}"
    folder.mkdir()
    started = time.perf_counter()
    os.chdir(folder)
    try:
        result = tokenizer.run(params, out_dir="tokenizer", prepared_dir=home / "prepared",
                               judge_dir=home / "judge", plot_file="prefix.csv")
    finally:
        os.chdir(home)
    return {**result.metrics, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="tokenizer.steps (default: "
                        "params.yaml's)")
    parser.add_argument("--binary", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra binary variant")
    parser.add_argument("--only-fsq", action="store_true",
                        help="of the built-in variants only fsq (with --binary: yours against it)")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.only_fsq:
        variants = {"fsq [8,5,5,5]": variants["fsq [8,5,5,5]"]}
    variants.update(parse_variant(v) for v in args.binary)
    raw = load_params(REPO / "params.yaml", args.overrides).to_dict()
    if args.steps is not None:
        raw["tokenizer"]["steps"] = args.steps
    results: dict[str, dict[str, float]] = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # checkpoints go under .latentforge/ in each variant's folder
        try:
            params = build_params(raw)
            started = time.perf_counter()
            prepare.run(params.prepare, out_dir="prepared")
            judge.run(params, out_dir="judge", prepared_dir="prepared")
            print(f"prepare + judge {time.perf_counter() - started:.0f} s; tokenizer "
                  f"{params.tokenizer.steps} steps, K = {params.tokenizer.num_tokens}, "
                  f"{os.cpu_count()} CPUs", flush=True)
            for index, (name, overrides) in enumerate(variants.items()):
                results[name] = train_tokenizer(raw, overrides, index)
                print(f"  {name}: done in {results[name]['seconds']:.0f} s", flush=True)
        finally:
            os.chdir(cwd)
    fsq = results["fsq [8,5,5,5]"]
    print(f"\n{'variant':24s} {'PSNR dB':>8s} {'SSIM':>7s} {'rFD-judge':>10s} {'usage':>7s} "
          f"{'perplex.':>9s} {'train s':>8s} {'dPSNR':>7s} {'dSSIM':>7s} {'drFD':>8s}")
    for name, m in results.items():
        print(f"{name:24s} {m['val_psnr']:8.2f} {m['val_ssim']:7.4f} {m['rfd_judge']:10.3f} "
              f"{m['codebook_usage']:7.3f} {m['codebook_perplexity']:9.1f} {m['seconds']:8.0f} "
              f"{m['val_psnr'] - fsq['val_psnr']:+7.2f} {m['val_ssim'] - fsq['val_ssim']:+7.4f} "
              f"{m['rfd_judge'] - fsq['rfd_judge']:+8.3f}")
    print("(d* = variant minus fsq; target: binary PSNR within 2 dB of fsq)")


if __name__ == "__main__":
    main()
