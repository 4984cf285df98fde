"""Does pFD rank tokenizers by their generators' gFD better than rFD does? (RobustTok's claim)

The pipeline itself answers: the project is copied (as the tests copy it, tests/conftest.py)
into a temporary git + DVC repository, one DVC experiment per tokenizer variant is queued with
`dvc exp run generator --queue -S ...` (the generator stage and everything upstream of it;
prepare and judge, the same for every variant, run once in the copy before the queue, so each
experiment trains tokenizer, cache and generator), the queue runs them one at a time, and each
experiment's metrics come back from `dvc exp show --json`. Printed: a table of rFD-judge,
pFD-judge, gFD-eval and gFD-eval at the val set's count per variant, and the Spearman rank
correlations of rFD vs gFD and of pFD vs gFD over the variants.

A handful of variants gives a very noisy rank correlation (with 5 points one swapped pair
moves Spearman's rho by 0.1, and |rho| = 1 happens by chance 1 time in 60): the numbers check
the wiring and show a direction, they do not settle the claim.

    python bench/robusttok_study.py [--tiny | --preset FILE] [-S KEY=VALUE ...] [--only NAME ...]

`--tiny` (presets/tiny.yaml) checks the wiring in a few minutes; the default preset is the
shipped params.yaml. `-S` overrides apply to every variant (e.g. `-S tokenizer.steps=500`).
Child processes run with OMP_NUM_THREADS=1. Tracking (MLflow) is off in the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# name -> tokenizer overrides. `{half}` is half the preset's num_tokens.
VARIANTS: dict[str, dict[str, object]] = {
    "kl": {},
    "kl pert0.3": {"latent_perturbation": 0.3},
    "kl robusttok": {"latent_perturbation": 1.0, "perturbation_images": 0.1,
                     "perturbation_anneal": "linear", "perturbation_final": 0.5},
    "fsq": {"quantizer": "fsq", "token_dim": 4, "fsq_levels": [8, 5, 5, 5]},
    "kl K/2": {"num_tokens": "{half}"},
}
COLUMNS = (("rFD-judge", "tokenizer", "rfd_judge"), ("pFD-judge", "tokenizer", "pfd_judge"),
           ("gFD-eval", "generator", "gfd_eval"),
           ("gFD@real", "generator", "gfd_eval_at_real_count"),
           ("PSNR", "tokenizer", "val_psnr"))


def child_env() -> dict[str, str]:
    """The environment of every child: one thread each, no analytics, a git identity."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DVC_NO_ANALYTICS="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for key, value in (("GIT_AUTHOR_NAME", "LatentForge Bench"),
                       ("GIT_AUTHOR_EMAIL", "bench@latentforge.invalid"),
                       ("GIT_COMMITTER_NAME", "LatentForge Bench"),
                       ("GIT_COMMITTER_EMAIL", "bench@latentforge.invalid")):
        env.setdefault(key, value)
    return env


def project_files() -> list[str]:
    """What git tracks or would track, less tests, benches and stage outputs (as the tests'
    `project_files`)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    from latentforge import paths

    produced = [str(p) for s in paths.STAGES.values() for p in (*s.outs, *s.metrics, *s.plots)]
    skip = ("tests/", "bench/", "dvc.lock", str(paths.STATE), *produced)
    return [f for f in out if not f.startswith(skip) and (REPO / f).is_file()]


def make_project(root: Path, preset: Path, overrides: list[str], env: dict[str, str]) -> None:
    """Copy the project into `root`, write the preset (+ overrides) as params.yaml, commit."""
    from latentforge.config import load_params, write_params_file

    for rel in project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    params = load_params(preset, ["tracking.enabled=false", *overrides])
    write_params_file(params, root / "params.yaml")
    run(["git", "init", "-q"], root, env)
    if not (root / ".dvc").is_dir():
        run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "project"], root, env)
    # Prepare and judge are the same for every variant, and DVC's run cache skips stages with
    # persistent outputs: run them once here, so that each experiment checks their outputs
    # out of the shared DVC cache (dvc.lock says they are up to date) and starts at the
    # tokenizer.
    run([sys.executable, "-m", "dvc", "repro", "judge"], root, env)
    run(["git", "add", "-A"], root, env)  # dvc.lock and the (uncached) metrics files
    run(["git", "commit", "-qm", "prepare and judge"], root, env)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def queue_variants(root: Path, variants: dict[str, dict[str, object]], half: int,
                   env: dict[str, str]) -> None:
    """One queued experiment per variant, targeting the generator stage and its upstream."""
    for name, overrides in variants.items():
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "generator", "--queue",
               "-n", exp_name(name)]
        for key, value in overrides.items():
            value = half if value == "{half}" else value
            cmd += ["-S", f"tokenizer.{key}={json.dumps(value)}"]
        run(cmd, root, env)


def exp_name(name: str) -> str:
    """A git-ref-safe experiment name."""
    return name.replace(" ", "-").replace("/", "_").replace(".", "p")


def run_queue(root: Path, env: dict[str, str], timeout_s: float) -> None:
    """Start one queue worker and wait until nothing is queued or running."""
    # The worker runs detached; a captured stdout would keep us waiting for it to exit.
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=root,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    started = time.time()
    last = ""
    while True:
        time.sleep(10)
        status = run([sys.executable, "-m", "dvc", "queue", "status"], root, env)
        summary = " ".join(sorted(line.split()[-1] for line in status.splitlines()[1:]
                                  if line.strip() and not line.startswith("Worker")))
        if summary != last:
            print(f"[{time.time() - started:5.0f} s] queue: {summary}", flush=True)
            last = summary
        if not any(word in status for word in ("Queued", "Running")):
            return
        if time.time() - started > timeout_s:
            run([sys.executable, "-m", "dvc", "queue", "kill", "--all"], root, env)
            raise SystemExit(f"the queue did not finish within {timeout_s:.0f} s:\n{status}")


def read_metrics(root: Path, env: dict[str, str]) -> dict[str, dict[str, dict]]:
    """experiment name -> {"tokenizer": metrics, "generator": metrics} from `dvc exp show`."""
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], root, env))
    out: dict[str, dict[str, dict]] = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            data = (exp.get("revs") or [{}])[0].get("data") or {}
            metrics = data.get("metrics") or {}
            out[exp.get("name")] = {
                stage: (metrics.get(f"metrics/{stage}.json") or {}).get("data") or {}
                for stage in ("tokenizer", "generator")}
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (scipy's when installed)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:  # Pearson correlation of the ranks (no ties expected)
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        return float(np.corrcoef(rx, ry)[0, 1])
    return float(spearmanr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", type=Path, default=REPO / "params.yaml",
                       help="params file of every variant (default: params.yaml)")
    group.add_argument("--tiny", action="store_true", help="presets/tiny.yaml: a wiring check")
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for every variant")
    parser.add_argument("--only", action="append", choices=list(VARIANTS),
                        help="run only these variants (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the queue")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()
    preset = REPO / "presets/tiny.yaml" if args.tiny else args.preset.resolve()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}

    from latentforge.config import load_params

    base = load_params(preset, args.overrides)
    half = max(1, base.tokenizer.num_tokens // 2)
    env = child_env()
    tmp = Path(tempfile.mkdtemp(prefix="robusttok_study_"))
    started = time.time()
    try:
        root = tmp / "project"
        make_project(root, preset, args.overrides, env)
        queue_variants(root, variants, half, env)
        print(f"project {root}: {len(variants)} experiments queued ({preset.name}"
              f"{' ' + ' '.join(args.overrides) if args.overrides else ''})", flush=True)
        run_queue(root, env, args.timeout)
        results = read_metrics(root, env)
        if any(exp_name(n) not in results or not results[exp_name(n)]["generator"]
               for n in variants):
            print(run([sys.executable, "-m", "dvc", "queue", "status"], root, env))
        report(variants, results, half, time.time() - started)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(variants: dict[str, dict[str, object]], results: dict[str, dict[str, dict]],
           half: int, seconds: float) -> None:
    """Print the table and the two rank correlations."""
    header = f"| variant | {' | '.join(c for c, _, _ in COLUMNS)} |"
    print(f"\n{header}\n|{'---|' * (len(COLUMNS) + 1)}")
    rows = {}
    for name in variants:
        got = results.get(exp_name(name), {"tokenizer": {}, "generator": {}})
        values = [got[stage].get(key, float("nan")) for _, stage, key in COLUMNS]
        rows[name] = values
        label = name.replace("K/2", f"K={half}")
        print(f"| {label} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
    done = [v for v in rows.values() if all(np.isfinite(v[:3]))]
    print(f"\n{len(done)} of {len(rows)} variants finished in {seconds:.0f} s.")
    if len(done) >= 3:
        rfd, pfd, gfd = ([v[i] for v in done] for i in range(3))
        print(f"Spearman rho over {len(done)} tokenizers (noisy with so few):")
        print(f"  rFD-judge vs gFD-eval: {spearman(rfd, gfd):+.2f}")
        print(f"  pFD-judge vs gFD-eval: {spearman(pfd, gfd):+.2f}")
        at_real = [v[3] for v in done]
        if all(np.isfinite(at_real)):
            print(f"  rFD-judge vs gFD@real: {spearman(rfd, at_real):+.2f}")
            print(f"  pFD-judge vs gFD@real: {spearman(pfd, at_real):+.2f}")


if __name__ == "__main__":
    main()
