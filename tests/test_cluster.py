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
from pathlib import Path

import mlflow
import pytest
from cluster import TwoNodeCluster
from conftest import REPO
from test_pipeline import cli, tiny

# Not on this machine? These tests need root (mount namespaces) and util-linux's unshare.
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a node without the workspace needs root and unshare (mount namespaces)")

pytestmark = [pytest.mark.slow, pytest.mark.cluster, needs_namespaces]

STAGES_ON_RAY = {"judge": ["train"], "tokenizer": ["train"], "cache": ["cache"],
                 "generator": ["train", "sample"]}


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
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["latentforge"], output_format="list",
                               filter_string="tags.`latentforge.stage` != ''")
    return {r.data.tags["latentforge.stage"]: r for r in found}


def shard_digests(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "data/cache/manifest.json").read_text())
    return {entry["file"]: entry["sha256"] for split in manifest["splits"].values()
            for shard in split["shards"] for entry in shard["files"].values()}


def test_pipeline_on_a_node_that_cannot_see_the_workspace(cluster, make_project, prefect_harness,
                                                          s3_bucket, monkeypatch):
    compute = {"num_workers": 2, "cpus_per_worker": 1}
    local = make_project(tiny(compute=compute))
    remote = make_project(tiny(compute={**compute, "ray_address": cluster.address,
                                        "storage_path": f"s3://{s3_bucket}/ray"}))
    for var, value in cluster.driver_env().items():
        monkeypatch.setenv(var, value)
    worker, head = cluster.worker_node_id(), cluster.head_node_id()

    table = cli(remote, "run").stdout
    for stage in ("prepare", "judge", "tokenizer", "cache", "generator", "rl", "evaluate"):
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
    for stage in ("judge", "tokenizer", "generator"):
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
