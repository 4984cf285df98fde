"""Orchestration overhead: what a user waits for beyond the stages' own work.

In a fresh clone of this repository (a temporary folder; the default params.yaml unless
--params), runs `latentforge run` once from scratch, then the no-op run (every stage up to
date) against `dvc status`, alternating, --repeats times each. Prints:
- the pipeline's wall time, the stages' own work (each stage's duration as its own process
  measured it: tasks, MLflow run, metrics), the rest (Prefect, DVC, process start-up), and
  the rest per stage (the flow's time for the stage minus the stage's own);
- the no-op `latentforge run` and `dvc status` (medians) and their ratio.

It uses the background Prefect server (started by the first run if none runs; left running,
as for any user) unless LATENTFORGE_PREFECT_SERVER=temporary.

    python bench/overhead.py [--params presets/tiny.yaml] [--repeats 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "PYTHONSAFEPATH": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc


def stage_table(stdout: str) -> dict[str, tuple[str, float]]:
    """stage -> (ran|skipped, the flow's seconds) from `latentforge run`'s table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"(\w+)\s+(ran|skipped)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = (m.group(2), float(m.group(3)))
    return rows


def measure(root: Path, params: str | None = None, repeats: int = 5) -> dict[str, Any]:
    """Run the pipeline in `root` (a fresh project), then the no-op comparison."""
    sys.path.insert(0, str(REPO))
    from latentforge import paths

    cmd = ["latentforge", "run", *(["--params", params] if params else [])]
    wall, proc = _run(cmd, root)
    table = stage_table(proc.stdout)
    own = {}
    for stage in table:
        record = json.loads((root / paths.last_run_file(stage)).read_text())
        own[stage] = float(record["seconds"])
    noop, status = [], []
    for _ in range(repeats):
        noop.append(_run(["latentforge", "run"], root)[0])
        status.append(_run(["dvc", "status"], root)[0])
    return {"wall_s": wall, "stage_own_s": own, "flow_s": {s: t for s, (_, t) in table.items()},
            "noop_s": statistics.median(noop), "dvc_status_s": statistics.median(status),
            "noop_all": noop, "dvc_status_all": status}


def fresh_clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    # uncommitted edits to tracked files too: the clone runs what this checkout holds
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in changed:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    if not (dest / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    return dest


def report(r: dict[str, Any]) -> str:
    own = sum(r["stage_own_s"].values())
    rest = r["wall_s"] - own
    lines = [f"pipeline wall {r['wall_s']:.1f} s: stages' own work {own:.1f} s, orchestration "
             f"{rest:.1f} s ({100 * rest / r['wall_s']:.1f}%)",
             "per stage (flow - own): " + ", ".join(
                 f"{s} {r['flow_s'][s] - r['stage_own_s'][s]:.1f}" for s in r["stage_own_s"]),
             f"no-op run {r['noop_s']:.2f} s vs dvc status {r['dvc_status_s']:.2f} s "
             f"(medians of {len(r['noop_all'])}): {r['noop_s'] / r['dvc_status_s']:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", default=None, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fresh_clone(Path(args.keep) if args.keep else Path(tmp) / "project")
        print(report(measure(root, args.params, args.repeats)))


if __name__ == "__main__":
    main()
