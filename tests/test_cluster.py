"""The pipeline on a real 2-node Ray cluster whose worker node cannot see the workspace.

See tests/cluster.py for how the cluster is built. The head has no CPUs for work, so every
cache actor, sampling actor and Ray Train worker must run on the isolated node; Ray Train
checkpoints go to the local S3 server (compute.storage_path), which both nodes reach.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from cluster import TwoNodeCluster
from conftest import REPO
from test_pipeline import cli, tiny

from latentforge import paths

# Not on this machine? These tests need root (mount namespaces) and util-linux's unshare.
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a node without the workspace needs root and unshare (mount namespaces)")

pytestmark = [pytest.mark.slow, pytest.mark.cluster, needs_namespaces]

STAGES_ON_RAY = {"judge": ["train"], "tokenizer": ["train"], "cache": ["cache"],
                 "generator": ["train", "sample"], "posttrain": ["train"], "evaluate": ["sample"]}
# Decoder post-training on, briefly: its Ray Train workers need the tokenizer's weights shipped.
POSTTRAIN = {"enabled": True, "steps": 20, "save_every": 20, "log_every": 10, "warmup_steps": 5,
             "eval_per_class": 5}


@pytest.fixture
def cluster(s3_server):
    hide = [REPO / d for d in ("data", "artifacts", "metrics", ".latentforge", ".dvc/cache")]
    c = TwoNodeCluster(hide=hide)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.processes(), "cluster processes outlived the test"


def stage_runs(root: Path) -> dict[str, mlflow.entities.Run]:
    # A client of its own: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI to the
    # next test's `latentforge` processes, which would then log into this project's store.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentforge")
    assert experiment is not None, f"no latentforge experiment in {root / 'mlflow.db'}"
    found = client.search_runs([experiment.experiment_id],
                               filter_string="tags.`latentforge.stage` != ''")
    return {r.data.tags["latentforge.stage"]: r for r in found}


def shard_digests(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "data/cache/manifest.json").read_text())
    return {entry["file"]: entry["sha256"] for split in manifest["splits"].values()
            for shard in split["shards"] for entry in shard["files"].values()}


def test_pipeline_on_a_node_that_cannot_see_the_workspace(cluster, make_project, prefect_harness,
                                                          s3_bucket, monkeypatch):
    compute = {"num_workers": 2, "cpus_per_worker": 1}
    local = make_project(tiny(compute=compute, posttrain=POSTTRAIN))
    remote = make_project(tiny(compute={**compute, "ray_address": cluster.address,
                                        "storage_path": f"s3://{s3_bucket}/ray"},
                               posttrain=POSTTRAIN))
    for var, value in cluster.driver_env().items():
        monkeypatch.setenv(var, value)
    worker, head = cluster.worker_node_id(), cluster.head_node_id()

    table = cli(remote, "run").stdout
    for stage in paths.STAGES:
        assert re.search(rf"{stage}\s+ran", table), (stage, table)
    runs = stage_runs(remote)
    for stage, kinds in STAGES_ON_RAY.items():
        for kind in kinds:
            tag = runs[stage].data.tags.get(f"latentforge.ray_nodes.{kind}")
            assert tag == worker, (stage, kind, tag, worker, head)
    summary = mlflow.artifacts.load_text(f"{runs['generator'].info.artifact_uri}/"
                                         "generator_summary.md")
    assert f"Trained on Ray node(s) {worker[:12]}" in summary
    assert f"Sampled on Ray node(s) {worker[:12]}" in summary
    # Ray Train's run folders on S3 are removed once their checkpoints reached the driver.
    from latentforge import storage

    assert not [f for f in storage.list_files(f"s3://{s3_bucket}/ray") if "/step-" in f]

    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    cli(local, "run")
    # Same data, same batches, same thread counts: the cache is the same, byte for byte.
    assert shard_digests(remote) == shard_digests(local)
    for stage in ("judge", "tokenizer", "generator", "posttrain"):
        a = {r["step"]: r["loss"] for r in _history(remote, stage)}
        b = {r["step"]: r["loss"] for r in _history(local, stage)}
        assert a.keys() == b.keys() and a, stage
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-3), (stage, step)


def _history(root: Path, stage: str) -> list[dict]:
    from latentforge.training import read_metrics

    folders = sorted((root / ".latentforge/checkpoints" / stage).iterdir())
    assert len(folders) == 1, f"expected one {stage} checkpoint folder under {root}"
    return [r for r in read_metrics(folders[0]) if "loss" in r]


# --------------------------------------------------------------------------------------------
# Faults: the worker node's raylet SIGKILLed mid-stage, then the node comes back.
# --------------------------------------------------------------------------------------------


def _start_stage(root: Path, stage: str) -> subprocess.Popen:
    """`latentforge stage NAME` in the background, as a user runs it, against the harness."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen([sys.executable, "-m", "latentforge", "stage", stage], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_file(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended ({proc.returncode}) before {pattern} "
                                 f"appeared:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise TimeoutError(f"no {pattern} under {root} within {timeout:.0f} s")


def _crash_and_recover(cluster, root: Path, stage: str, progress: str) -> str:
    """Run `stage`, SIGKILL the worker node's raylet once `progress` (a glob) shows committed
    work, bring the node back, and let the stage finish through Ray's retries or a rerun.
    Returns how it finished."""
    proc = _start_stage(root, stage)
    try:
        _wait_for_file(root, progress, proc)
        assert proc.poll() is None, "the stage finished before the node could be killed"
        cluster.kill_worker_raylet()
        cluster.restart_worker()
        output = proc.communicate(timeout=900)[0]
    finally:
        proc.kill()
    print(f"{stage}: the stage process exited {proc.returncode} after the node was lost")
    if proc.returncode == 0:
        return "retried"
    assert proc.returncode != 0 and output.strip(), output[-3000:]
    cli(root, "stage", stage)  # the rerun resumes from what was committed
    return "rerun"


def _intact(root: Path) -> None:
    """dvc.lock parses and names the stage's outputs; the MLflow store answers."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"cache", "tokenizer"} <= set(lock["stages"])
    assert stage_runs(root)


def test_a_storage_path_that_cannot_be_reached_fails_at_once_naming_it(
        cluster, make_project, prefect_harness, s3_bucket, monkeypatch):
    """Before any work every node looks at compute.storage_path as it sees it; the nodes
    lack the endpoint in their own environment and get it from the driver (a missing key
    is fine: training writes it; a missing bucket is not)."""
    for var, value in cluster.driver_env().items():
        monkeypatch.setenv(var, value)
    compute = {"num_workers": 2, "cpus_per_worker": 1, "ray_address": cluster.address,
               "storage_path": "s3://lf-no-such-bucket/ray"}
    root = make_project(tiny(compute=compute))
    cli(root, "stage", "prepare")
    proc = cli(root, "stage", "judge", check=False)
    assert proc.returncode != 0
    # The driver, which copies every checkpoint back, looks first (preflight); each node's
    # own look is test_raycluster's (check_cluster on the local instance).
    errors = [line for line in proc.stderr.splitlines()
              if "compute.storage_path: this machine (the driver" in line]
    assert errors, proc.stderr[-3000:]
    assert "cannot reach it: s3://lf-no-such-bucket/ray: no such bucket" in errors[0], errors
    assert not (root / "artifacts/judge").exists()


def _cluster_project(make_project, cluster, s3_bucket, monkeypatch, **sections) -> Path:
    for var, value in cluster.driver_env().items():
        monkeypatch.setenv(var, value)
    compute = {"num_workers": 2, "cpus_per_worker": 1, "ray_address": cluster.address,
               "storage_path": f"s3://{s3_bucket}/ray"}
    root = make_project(tiny(compute=compute, **sections))
    for stage in ("prepare", "judge", "tokenizer"):
        cli(root, "stage", stage)
    return root


def test_worker_node_lost_during_caching(cluster, make_project, prefect_harness, s3_bucket,
                                         monkeypatch):
    # Small batches and flipped views: enough calls to lose the node between two shards.
    root = _cluster_project(make_project, cluster, s3_bucket, monkeypatch,
                            prepare={"max_images": 1200}, cache={"batch_size": 8, "hflip": True})
    how = _crash_and_recover(cluster, root, "cache", ".latentforge/work/cache/*/train-*.json")
    crashed = shard_digests(root)
    _intact(root)
    # The same cache from an uninterrupted run.
    shutil.rmtree(root / "data/cache")
    cli(root, "stage", "cache", "--force")
    assert shard_digests(root) == crashed, how


def test_worker_node_lost_during_generator_training(cluster, make_project, prefect_harness,
                                                    s3_bucket, monkeypatch):
    root = _cluster_project(make_project, cluster, s3_bucket, monkeypatch,
                            generator={"steps": 120, "save_every": 20})
    cli(root, "stage", "cache")
    how = _crash_and_recover(cluster, root, "generator",
                             ".latentforge/checkpoints/generator/*/step-000020")
    crashed = (root / "artifacts/generator/model.safetensors").read_bytes()
    _intact(root)
    history = _history(root, "generator")
    assert [r["step"] for r in history] == list(range(10, 121, 10)), how  # no step twice
    # An uninterrupted run from scratch ends with the same weights, bit for bit (same
    # machine, same shapes, same thread counts; each step reseeded from (seed, step, rank)).
    shutil.rmtree(root / ".latentforge/checkpoints/generator")
    cli(root, "stage", "generator", "--force")
    assert (root / "artifacts/generator/model.safetensors").read_bytes() == crashed, how
