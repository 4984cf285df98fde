"""Stage times of `latentforge run` on one machine and on a 2-node Ray cluster, side by side.

The cluster is the one tests/test_cluster.py proves things on: a head with no CPUs for work and
a worker node in its own mount namespace that cannot see the workspace (root only), with Ray
Train checkpoints on a local S3 server (moto). Both runs use the same params (the tiny preset
unless --params, with compute.num_workers 2) in fresh git + DVC projects; cluster start-up is
not counted, each stage's own Ray connect is. Prints seconds per stage and the ratio.

    sudo .venv/bin/python bench/cluster_stage_times.py [--params presets/tiny.yaml]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster import TwoNodeCluster  # noqa: E402

from latentforge import paths  # noqa: E402
from latentforge.config import build_params, load_params, write_params_file  # noqa: E402


def make_project(root: Path, raw: dict) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if rel.startswith(("tests/", "bench/")) or rel == "dvc.lock":
            continue
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    write_params_file(build_params(raw), root / "params.yaml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@invalid"}
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    if not (root / ".dvc").is_dir():  # the repository's own .dvc/config came along otherwise
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, env=env, check=True)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return root


def run(root: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "latentforge", "run"], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"latentforge run failed in {root}:\n{proc.stderr[-3000:]}")
    seconds = {s: json.loads((root / paths.last_run_file(s)).read_text())["seconds"]
               for s in paths.STAGES}
    seconds["pipeline (wall)"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "presets/tiny.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    host, port = s3.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "DVC_NO_ANALYTICS": "1"})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    base = load_params(args.params).to_dict()
    base["compute"].update(num_workers=args.workers, cpus_per_worker=1)
    work = Path(tempfile.mkdtemp(prefix="lf-cluster-bench-"))
    cluster = TwoNodeCluster(hide=[REPO / d for d in ("data", "artifacts", "metrics",
                                                      ".latentforge", ".dvc/cache")],
                             worker_cpus=args.workers)
    try:
        local = run(make_project(work / "local", base), dict(os.environ))
        print("single machine done; starting the 2-node cluster", file=sys.stderr, flush=True)
        cluster.start()
        remote_raw = json.loads(json.dumps(base))
        remote_raw["compute"].update(ray_address=cluster.address, storage_path="s3://bench/ray")
        remote = run(make_project(work / "cluster", remote_raw),
                     {**os.environ, **cluster.driver_env()})
    finally:
        cluster.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'stage':<18}{'1 machine s':>12}{'2-node s':>10}{'ratio':>8}")
    for stage in local:
        print(f"{stage:<18}{local[stage]:>12.1f}{remote[stage]:>10.1f}"
              f"{remote[stage] / max(local[stage], 1e-9):>8.2f}")


if __name__ == "__main__":
    main()
