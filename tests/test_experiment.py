"""`latentforge run --exp NAME -S ...`: a DVC experiment that leaves params.yaml alone, listed
by `dvc exp show` and tracked in the workspace's MLflow store under the experiment's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_pipeline import TINY, runs

from latentforge import paths


@pytest.mark.slow  # the whole tiny pipeline in DVC's temporary copy: ~3-5 min on 2 cores
def test_run_exp_leaves_params_yaml_alone_and_is_listed_by_dvc_and_mlflow(make_project):
    root = make_project(TINY)
    before = (root / "params.yaml").read_bytes()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_HOME"] = str(root / ".prefect-home")
    proc = subprocess.run([sys.executable, "-m", "latentforge", "run", "--exp", "seed3",
                           "-S", "prepare.seed=3"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "experiment seed3 finished" in proc.stdout

    # The workspace is as it was: same params.yaml, no stage outputs here.
    assert (root / "params.yaml").read_bytes() == before
    assert not (root / "data/prepared").exists()

    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                                      cwd=root, capture_output=True, text=True,
                                      check=True).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e.get("name") for e in experiments}
    assert "seed3" in names, shown
    exp = next(e for e in experiments if e.get("name") == "seed3")
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["prepare"]["seed"] == 3

    # One parent run named after the experiment; every stage ran nested under it.
    parent = runs(root, "tags.`latentforge.dvc_experiment` = 'seed3'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = runs(root, f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert {r.data.tags["latentforge.stage"] for r in children} == set(paths.STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    # ... whose metrics it holds as a `latentforge run` parent does: comparable in the UI
    rolled = runs(root, "tags.`latentforge.dvc_experiment` = 'seed3'")[0]
    assert rolled.data.tags["latentforge.ran"] == ",".join(paths.STAGES)
    judge = next(r for r in children if r.data.tags["latentforge.stage"] == "judge")
    assert rolled.data.metrics["judge.val_accuracy"] == judge.data.metrics["val_accuracy"]


def test_uncommitted_outputs_are_named_before_an_experiment(tmp_path):
    """DVC's temporary copy comes from git's last commit plus the changes to tracked files:
    with dvc.lock untracked (a fresh clone's first run) every stage ran again and every model
    was registered twice; with dvc.lock committed but the metrics and plots files (`cache:
    false`: git's to keep) untracked, the same, without a warning."""
    from latentforge.flows.experiment import uncommitted_outputs

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "x")
    assert uncommitted_outputs(str(tmp_path)) is None  # no lock yet: nothing to reuse
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert uncommitted_outputs(str(tmp_path)) == "not in git: dvc.lock"
    git("add", "dvc.lock")
    git("commit", "-q", "-m", "lock")
    assert uncommitted_outputs(str(tmp_path)) is None
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert uncommitted_outputs(str(tmp_path)) is None  # changes travel: DVC stashes them over
    git("commit", "-qam", "lock")
    for stage in paths.STAGES:
        (tmp_path / paths.metrics_file(stage)).parent.mkdir(exist_ok=True)
        (tmp_path / paths.metrics_file(stage)).write_text("{}\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "rl_reward.csv").write_text("step\n")
    why = uncommitted_outputs(str(tmp_path))
    assert why == (f"not in git: metrics/{sorted(paths.STAGES)[0]}.json, metrics/"
                   f"{sorted(paths.STAGES)[1]}.json, metrics/{sorted(paths.STAGES)[2]}.json, "
                   f"metrics/{sorted(paths.STAGES)[3]}.json and {len(paths.STAGES) - 3} more")
    git("add", "metrics", "plots")
    git("commit", "-qm", "outputs")
    assert uncommitted_outputs(str(tmp_path)) is None
    (tmp_path / "plots" / "rl_reward.csv").write_text("step\n1\n")
    assert uncommitted_outputs(str(tmp_path)) is None


def test_an_experiments_parent_run_rolls_up_its_stages_metrics(tmp_path, monkeypatch):
    """It held only its overrides and seconds: experiments could not be compared with each
    other or with `latentforge run` parents in the MLflow UI."""
    import mlflow

    from latentforge import tracking
    from latentforge.config import TrackingConfig
    from latentforge.flows.experiment import roll_up

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with tracking.start_run(TrackingConfig(), "experiment x", {}) as parent:
        client = mlflow.MlflowClient(tracking.tracking_uri())
        experiment = client.get_run(parent.run_id).info.experiment_id
        for stage, value in (("judge", 0.9), ("prepare", 10.0)):  # as the stages log them
            child = client.create_run(experiment, tags={
                "mlflow.parentRunId": parent.run_id, f"{tracking.TAG_PREFIX}stage": stage})
            client.log_metric(child.info.run_id, "m", value)
            client.set_terminated(child.info.run_id)
        rolled = roll_up(parent)
        assert list(rolled) == ["prepare", "judge"]
        assert rolled["judge"]["metrics"] == {"m": 0.9} and rolled["judge"]["status"] == "ran"
    run = client.get_run(parent.run_id)
    assert run.data.metrics == {"prepare.m": 10.0, "judge.m": 0.9}
    assert run.data.tags["latentforge.ran"] == "prepare,judge"
