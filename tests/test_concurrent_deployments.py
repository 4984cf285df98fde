"""One run per workspace across deployments: served deployments (`latentforge ui`, a real
Prefect server) get three flow runs on one project. The pipeline run holds the workspace
(its process stopped with SIGSTOP meanwhile, so it cannot end first); a stage run with
wait=false fails at once naming it, one with wait=true says it is waiting, then runs after it. dvc.lock and mlflow.db come out whole and agree.

The deployments' concurrency limits are per deployment, so only the workspace lock keeps the
pipeline and the stage runs apart. ~3-4 min on 2 cores (servers ~40 s, a tiny prepare+judge
~1-2 min); slow, in `make test-infra`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
import yaml
from servers import api, running_ui
from test_pipeline import TINY

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment_id(prefect: str, name: str) -> str:
    return api(prefect, f"deployments/name/{name}/{name}")["id"]


def start(prefect: str, name: str, parameters: dict) -> str:
    """A flow run of deployment `name/name`, as the UI's Run button creates it."""
    run = api(prefect, f"deployments/{deployment_id(prefect, name)}/create_flow_run",
              {"parameters": parameters})
    return run["id"]


def state(prefect: str, run_id: str) -> dict:
    return api(prefect, f"flow_runs/{run_id}")


def logs(prefect: str, run_id: str) -> list[dict]:
    return api(prefect, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                         "limit": 200})


def wait_until(check, what: str, alive, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if result := check():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
def test_two_deployments_on_one_workspace_never_overlap(make_project, tmp_path):
    root = make_project(TINY)
    lock_file = root / ".latentforge" / "run.lock"
    with running_ui(root, tmp_path) as (prefect, _mlflow, lines, proc):
        def alive() -> None:
            assert proc.poll() is None, "\n".join(lines[-60:])

        first = start(prefect, "pipeline", {"stages": ["prepare", "judge"]})
        # the pipeline run holds the workspace: the lock file names its flow run
        wait_until(lambda: lock_file.exists() and first in lock_file.read_text(),
                   "the pipeline run to take the workspace", alive)
        # Freeze the holder (its flow run process; the stage it started may go on) while the
        # other two runs meet the lock: a tiny prepare+judge may otherwise end before their
        # processes start, and then the refused run would meet the queued one, or nothing.
        holder = json.loads(lock_file.read_text())["pid"]
        assert holder != proc.pid, "the flow run is expected in a process of its own"
        os.kill(holder, signal.SIGSTOP)
        try:
            refused = start(prefect, "prepare", {"overrides": ["prepare.seed=7"]})
            end = wait_until(
                lambda: (s := state(prefect, refused))["state_type"] in TERMINAL and s,
                "the refused run to end", alive)
            assert end["state_type"] == "FAILED"
            assert end["state"]["message"].startswith("another run is using this workspace")
            assert f"Prefect flow run {first}" in end["state"]["message"]
            assert "(in the Run form: set wait) to queue behind it" in end["state"]["message"]
            assert "seed: 7" not in (root / "params.yaml").read_text()  # nothing was written

            # the queued run says so in its own log while the pipeline holds the workspace
            queued = start(prefect, "judge", {"wait": True})
            waiting = wait_until(
                lambda: [datetime.fromisoformat(log["timestamp"])
                         for log in logs(prefect, queued)
                         if "waiting for the workspace" in log["message"]
                         and first in log["message"]],
                "the queued run's waiting message", alive)
        finally:
            os.kill(holder, signal.SIGCONT)

        for run_id in (first, queued):
            final = wait_until(
                lambda r=run_id: (s := state(prefect, r))["state_type"] in TERMINAL and s,
                f"flow run {run_id}", alive, timeout=900)
            assert final["state_type"] == "COMPLETED", "\n".join(lines[-80:])
        # the queued run did its work only after the pipeline run ended
        pipeline_end = datetime.fromisoformat(state(prefect, first)["end_time"])
        # Prefect ships a flow run's logs in batches, after its state may read COMPLETED.
        skipped = wait_until(
            lambda: [datetime.fromisoformat(log["timestamp"]) for log in logs(prefect, queued)
                     if "judge is up to date: skipped" in log["message"]],
            "the queued run's skip line in its log", alive, timeout=60)
        assert skipped[0] >= pipeline_end
        assert waiting[0] <= pipeline_end

    # dvc.lock parses and matches the workspace; mlflow.db answers with one run per stage
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "judge"}
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "prepare", "judge"],
                            cwd=root, capture_output=True, text=True, check=True).stdout
    assert "up to date" in status, status
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "latentforge"]
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags.get("latentforge.stage") for r in runs)
    assert stages == ["judge", "pipeline", "prepare"], stages
    assert all(r.info.status == "FINISHED" for r in runs)
