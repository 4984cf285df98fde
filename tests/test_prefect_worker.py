"""`infra/prefect.yaml` works as is with a work pool, the way teams run deployments besides
`latentforge serve`.

Everything is real: a `prefect server start` process on 127.0.0.1 with its own PREFECT_HOME
and SQLite database, a process work pool, `prefect deploy --prefect-file infra/prefect.yaml
--all` and `prefect worker start --pool ...` run from the project root (the yaml's own usage
lines), in a git + DVC project on the tiny preset. The pipeline deployment is triggered
through the API; the test proves that the flow run COMPLETED with one COMPLETED subflow run
per stage, that every stage's outputs exist, and that the MLflow runs point back at those
Prefect flow runs. The worker and the server are stopped (process groups, SIGTERM then
SIGKILL) whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import BIN
from servers import free_port, stop_group, tail, wait_healthy
from test_pipeline import tiny

from latentforge import paths

SERVER_START_TIMEOUT = 180  # seconds until /api/health must answer
FLOW_RUN_TIMEOUT = 600  # seconds for the whole pipeline on the tiny preset (~2 min here)


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A long-running process in its own session (so its whole group can be stopped)."""
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def prefect(root: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.mark.slow
def test_pipeline_deployment_runs_on_a_process_work_pool(make_project, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = make_project(tiny())
    deployments = yaml.safe_load((root / "infra/prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert len(pools) == 1, f"infra/prefect.yaml targets several work pools: {pools}"
    (pool,) = pools
    (pipeline_deployment,) = [d["name"] for d in deployments
                              if d["entrypoint"].endswith(":pipeline")]

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server_env = {**base, "PREFECT_SERVER_UI_ENABLED": "false",
                  "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                      f"sqlite+aiosqlite:///{home / 'server.db'}"}
    client_env = {**base, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"

    server = worker = None
    try:
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", str(port)], server_log, server_env, tmp_path)
        wait_healthy(f"{api}/health", server, server_log, "prefect server", SERVER_START_TIMEOUT)

        # the yaml's own usage lines, run from the project root
        prefect(root, client_env, "work-pool", "create", pool, "--type", "process")
        prefect(root, client_env, "--no-prompt", "deploy", "--prefect-file",
                "infra/prefect.yaml", "--all")
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", pool],
                       worker_log, client_env, root)

        with temporary_settings(updates={PREFECT_API_URL: api}), \
                get_client(sync_client=True) as client:
            for d in deployments:  # every deployment of the yaml, on the pool
                flow_name = d["entrypoint"].rsplit(":", 1)[1]
                deployed = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
                assert deployed.work_pool_name == pool, deployed
            deployment = client.read_deployment_by_name(f"pipeline/{pipeline_deployment}")
            flow_run = client.create_flow_run_from_deployment(deployment.id)
            deadline = time.monotonic() + FLOW_RUN_TIMEOUT
            while not flow_run.state.is_final():
                assert worker.poll() is None, \
                    f"the worker exited {worker.returncode}:\n{tail(worker_log)}"
                assert time.monotonic() < deadline, \
                    (f"flow run still {flow_run.state.type.value} after {FLOW_RUN_TIMEOUT} s:"
                     f"\n{tail(worker_log)}")
                time.sleep(3)
                flow_run = client.read_flow_run(flow_run.id)
            assert flow_run.state.is_completed(), \
                f"flow run ended {flow_run.state.type.value}:\n{tail(worker_log)}"

            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
            by_stage = {client.read_flow(c.flow_id).name: c for c in children}
            assert sorted(by_stage) == sorted(paths.STAGES), by_stage.keys()
            assert len(children) == len(paths.STAGES)
            for stage, child in by_stage.items():
                assert child.state.is_completed(), (stage, child.state)
    except BaseException:
        print(f"server log tail:\n{tail(server_log, 3000)}\nworker log tail:\n"
              f"{tail(worker_log)}", file=sys.stderr)
        raise
    finally:
        stop_group(worker)
        stop_group(server)

    # the flow run worked in the project root: every stage's outputs are there ...
    for stage_spec in paths.STAGES.values():
        for produced in (*stage_spec.outs, *stage_spec.metrics, *stage_spec.plots):
            assert (root / produced).exists(), produced
    assert (root / paths.PREPARED / "manifest.json").is_file()
    assert (root / "reports/evaluate/report.md").is_file()

    # ... and each stage's MLflow run records the Prefect subflow run that produced it,
    # under the pipeline's parent run, which records the deployment's flow run
    tracking = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = tracking.get_experiment_by_name("latentforge").experiment_id

    def only_run(stage: str) -> mlflow.entities.Run:
        (run,) = tracking.search_runs([experiment], f"tags.`latentforge.stage` = '{stage}'")
        return run

    parent = only_run("pipeline")
    assert parent.data.tags["latentforge.prefect_flow_run_id"] == str(flow_run.id)
    for stage, child in by_stage.items():
        run = only_run(stage)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.data.tags["latentforge.prefect_flow_run_id"] == str(child.id), stage
