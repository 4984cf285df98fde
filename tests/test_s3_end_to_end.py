"""S3 end to end, the way a team works, against the moto S3 server the other tests use:

(a) `storage.remote: s3://...`: one person runs the pipeline and commits; a teammate clones
    the git repository, runs `dvc pull` and `latentforge run`, which finds every stage up to
    date, and `latentforge sample` works in that clone.
(b) a shared `mlflow server` whose artifacts live on S3 (`--artifacts-destination s3://...`):
    the pipeline logs to it, and a registered generator loads back with
    `mlflow.pyfunc.load_model("models:/...")` from a folder that holds no project files.

Real components only: git, DVC, Prefect's test harness, MLflow's server, moto's S3 server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port, stop_group, wait_healthy
from test_pipeline import cli, dvc, tiny

from latentforge import paths

pytestmark = pytest.mark.slow

PARAMS = {"prepare": {"max_images": 300}}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout


def statuses(table: str) -> dict[str, str]:
    """stage -> status from the table `latentforge run` prints at the end."""
    found = {}
    for line in table.splitlines():
        m = re.match(r"^(\S+)\s+(ran|skipped)\s", line)
        if m and m.group(1) in paths.STAGES:
            found[m.group(1)] = m.group(2)
    return found


def s3_keys(bucket: str, prefix: str) -> list[str]:
    """Every key under `prefix`, read fresh from the endpoint (no s3fs listing cache)."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_fresh_clone_pulls_from_s3_remote_skips_every_stage_and_samples(
        make_project, prefect_harness, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/dvc"
    root = make_project(tiny(**PARAMS, storage={"remote": remote}))
    first = statuses(cli(root, "run").stdout)
    assert first == dict.fromkeys(paths.STAGES, "ran"), first
    assert s3_keys(s3_bucket, "dvc/"), "latentforge run pushed nothing to the DVC remote"

    # What the run leaves for git (dvc.lock, metrics, plots, DVC's .gitignore entries): the
    # author commits all of it, as after any `dvc repro`.
    left = git(root, "status", "--porcelain", "--untracked-files=all")
    assert "dvc.lock" in left
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline results")
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""

    # The teammate: clone, pull the outputs from the S3 remote, run.
    clone = tmp_path / "teammate"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    for produced in (paths.GENERATOR, paths.TOKENIZER):
        assert not (clone / produced).exists()
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=clone,
                            capture_output=True, text=True)
    assert pulled.returncode == 0, f"`dvc pull` in a fresh clone failed:\n{pulled.stdout}\n{pulled.stderr}"
    for name, spec in paths.STAGES.items():
        for produced in (*spec.outs, *spec.metrics, *spec.plots):
            assert (clone / produced).exists(), (name, produced)
    assert "Data and pipelines are up to date" in dvc(clone, "status")

    second = cli(clone, "run").stdout
    assert statuses(second) == dict.fromkeys(paths.STAGES, "skipped"), second
    assert not re.search(r"\sran\s", second), second

    sampled = cli(clone, "sample", "--class", "3", "--n", "8", "--out", "grid.png")
    assert "wrote 8 samples of class '3'" in sampled.stdout
    from PIL import Image

    with Image.open(clone / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > grid.height >= 8


LOAD_SCRIPT = """
import json, sys
import mlflow, mlflow.pyfunc
import numpy as np
mlflow.set_tracking_uri(sys.argv[1])
images = mlflow.pyfunc.load_model(sys.argv[2]).predict(np.array([1, 2]))
print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype),
                  "min": int(images.min()), "max": int(images.max())}))
"""


def test_team_mlflow_server_with_s3_artifacts(make_project, prefect_harness, s3_bucket, tmp_path,
                                              monkeypatch):
    from mlflow import MlflowClient

    server_dir = tmp_path / "mlflow-server"
    server_dir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = server_dir / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{s3_bucket}/mlartifacts"],
            cwd=server_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{url}/health", server, log, "mlflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        root = make_project(tiny(**PARAMS))
        table = cli(root, "run").stdout
        assert statuses(table) == dict.fromkeys(paths.STAGES, "ran"), table

        # the runs and the registered models are on the server, not in the project
        assert not (root / "mlflow.db").exists()
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("latentforge")
        assert experiment is not None
        # no artifact location of its own: the server's proxied store (--artifacts-destination)
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), \
            f"experiment created with artifact_location {experiment.artifact_location}"
        parents = client.search_runs([experiment.experiment_id],
                                     "tags.`latentforge.stage` = 'pipeline'")
        assert len(parents) == 1
        # the generator and its RL fine-tune, each its own registered model
        versions = [v for name in ("latentforge-generator", "latentforge-generator-rl")
                    for v in client.search_model_versions(f"name = '{name}'")]
        assert sorted((v.name, v.version) for v in versions) == [
            ("latentforge-generator", "1"), ("latentforge-generator-rl", "1")]
        assert {m.name for m in client.search_registered_models()} >= {
            "latentforge-judge", "latentforge-tokenizer", "latentforge-generator",
            "latentforge-generator-rl"}

        # artifacts went through the server to S3: none in a local mlartifacts folder
        keys = s3_keys(s3_bucket, "mlartifacts/")
        assert any(k.endswith("/model.safetensors") for k in keys), keys[:20]
        assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
        assert any(k.endswith("/manifest.json") for k in keys), keys[:20]
        for local in (root / "mlartifacts", root / "mlruns", server_dir / "mlartifacts",
                      server_dir / "mlruns"):
            assert not local.exists(), f"artifacts were written to {local}, not to S3"

        # a teammate's empty folder: no dvc.yaml, no artifacts/tokenizer to fall back on
        manifest = json.loads((root / "data/prepared/manifest.json").read_text())
        expected = [2, manifest["resolution"], manifest["resolution"], manifest["channels"]]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        # no S3 endpoint or credentials there: the server proxies the artifacts
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"}
        for v in versions:
            uri = f"models:/{v.name}/{v.version}"
            proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, url, uri], cwd=elsewhere,
                                  env=env, capture_output=True, text=True)
            assert proc.returncode == 0, f"{uri}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            assert got["shape"] == expected and got["dtype"] == "uint8", (uri, got)
            assert got["max"] > got["min"], (uri, got)  # images, not a constant fill
        assert sorted(p.name for p in elsewhere.iterdir()) == []
    finally:
        stop_group(server)
