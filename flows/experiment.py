"""An experiment: the pipeline with changed parameters as a DVC experiment, leaving the
workspace's params.yaml (and outputs) untouched.

`dvc exp run --temp -n NAME -S KEY=VALUE...` copies the workspace into a temporary folder,
reproduces the graph there and records the result as an experiment (`dvc exp show`,
`dvc exp apply NAME` to bring it into the workspace). Its stages log to the workspace's MLflow
store, nested under one parent run tagged with the experiment's name.

The changes are checked here (YAML after `-S`, as everywhere in LatentForge), and DVC gets the
checked values rendered in its own `-S` grammar (Hydra's), never the text as typed: the same
text means other values to DVC (latentforge/overrides.py says which).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

from latentforge import dvcops, paths, procs, tracking, workspace
from latentforge.config import load_params, yaml_text
from latentforge.dvcops import COMMITTED, uncommitted_outputs
from latentforge.errors import ConfigError, LatentForgeError
from latentforge.flows.stages import FORM_WAIT, NO_CHANGES, Overrides, ParamChanges, failed_state
from latentforge.overrides import dvc_set_params_checked
from latentforge.schema import as_overrides
from latentforge.summaries import mlflow_run_markdown, mlflow_ui_hint, stage_table_markdown

EXPERIMENT_TAG = f"{tracking.TAG_PREFIX}dvc_experiment"


@flow(name="experiment", log_prints=True,
      description="The pipeline as a DVC experiment (dvc exp run --temp): params.yaml and the "
                  "workspace's outputs stay as they are; `dvc exp show` lists the result.")
def experiment(name: Annotated[str, Field(examples=["seed3"])], overrides: Overrides = None,
               force: bool = False, params: ParamChanges = NO_CHANGES,
               wait: bool = False) -> dict[str, Any]:
    """Run the pipeline as a DVC experiment.

    Args:
        name: The experiment's name, as `dvc exp show` lists it and `dvc exp apply NAME`
            takes it; MLflow tags the runs `latentforge.dvc_experiment = NAME`.
        overrides: Parameter changes, one KEY=VALUE per item, e.g. prepare.seed=3, VALUE in
            YAML as in params.yaml (what `latentforge -S` takes). They apply to the
            experiment's copy only: the workspace's params.yaml stays as it is.
        force: Rerun every stage even when DVC finds it up to date.
        params: Parameter changes, section by section: every params.yaml key with its doc,
            default and bounds. Fill in only what should change; applied before the
            overrides, to the experiment's copy only.
        wait: When another run holds this workspace, wait for it to finish, saying so every
            minute, instead of failing at once.
    """
    try:
        return _experiment(name, [*as_overrides(params), *(overrides or [])], force, wait)
    except LatentForgeError as exc:  # one ERROR line, as the pipeline's flow runs say it
        return failed_state(exc)  # type: ignore[return-value]  # Prefect raises exc


def check_name(name: str) -> None:
    """A ConfigError for a name git cannot hold as an experiment ref (DVC would refuse it only
    after the MLflow parent run was opened): empty, spaces, `..`, `~^:?*[\\`, and the rest
    of git's ref rules (`git check-ref-format`)."""
    ok = bool(name.strip()) and not name.startswith("-") and subprocess.run(
        ["git", "check-ref-format", f"refs/exps/xx/{name}"], capture_output=True).returncode == 0
    if not ok:
        raise ConfigError(f"experiment name {name!r}: not a name git can hold (no spaces, "
                          "'..', '~^:?*[\\', a leading '-' or '/', or a trailing '.lock')")


def _experiment(name: str, overrides: list[str], force: bool, wait: bool) -> dict[str, Any]:
    params = load_params(None, overrides)  # validated before anything runs (exit 2)
    check_name(name)
    logger = get_run_logger()
    if why := uncommitted_outputs():
        logger.warning("%s: the experiment runs in a copy made from git's last commit (with "
                       "the changes to tracked files), so it reruns every stage whose outputs "
                       "that copy lacks (and registers their models again); `git add %s && "
                       "git commit` first to reuse them", why,
                       " ".join(c for c in COMMITTED if os.path.exists(c)))
    with workspace.lock(what=f"experiment {name}", wait=wait or None, say=logger.warning,
                        wait_hint=FORM_WAIT):
        # Against params.yaml as it is once the lock is held (a run waited on may have
        # rewritten it), and before the MLflow run opens: what DVC gets, refused with exit 2.
        values, set_params = dvc_set_params_checked(params, overrides)
        checked = [f"{key}={yaml_text(value)}" for key, value in values.items()]
        with tracking.start_run(
                params.tracking, f"experiment {name}",
                {f"{tracking.TAG_PREFIX}stage": "pipeline", EXPERIMENT_TAG: name,
                 f"{tracking.TAG_PREFIX}prefect_flow_run_id": str(flow_run.id or "")}) as parent:
            seconds = _run_experiment(name, parent, set_params, checked, force, logger)
    logger.info("experiment %s done in %.0f s: `dvc exp show` lists it, `dvc exp apply %s` "
                "brings it into the workspace", name, seconds, name)
    return {"experiment": name, "seconds": seconds, "run_id": parent.run_id,
            "overrides": checked}


def _run_experiment(name: str, parent: tracking.Tracker, set_params: list[str],
                    checked: list[str], force: bool, logger: Any) -> float:
    """`dvc exp run --temp` with the rendered overrides, nested under `parent`; its seconds."""
    started = time.time()
    parent.log_params({"overrides": " ".join(checked) or "-"})
    # The stages run in DVC's temporary copy: the store must be named absolutely.
    env = {tracking.PARENT_RUN_ENV: parent.run_id or "",
           tracking.FLOW_RUN_ENV: str(flow_run.id or ""),
           "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           # tells the stages inside DVC that this run holds the workspace lock
           procs.INVOCATION_ENV: os.environ.get(procs.INVOCATION_ENV) or uuid.uuid4().hex[:12]}
    cmd = ["exp", "run", "--temp", "-n", name]
    for item in set_params:
        cmd += ["-S", item]
    if force:
        cmd.append("--force")
    dvcops.run_dvc(cmd, env=env, what=f"experiment {name}",
                   on_line=lambda line: logger.info("%s", line))
    seconds = time.time() - started
    parent.log_metrics({"pipeline_seconds": seconds})
    ran = roll_up(parent)
    # The UI's summary, as the pipeline posts one: what ran (DVC reused the rest), its runs.
    records = [ran.get(stage) or {"stage": stage, "status": "skipped"} for stage in paths.STAGES]
    uri = tracking.tracking_uri()
    table = stage_table_markdown(records, uri) if parent.run_id else \
        "Not tracked (tracking.enabled is false): `dvc exp show` has its metrics."
    create_markdown_artifact(
        f"## Experiment {name}\n\nChanges: {', '.join(f'`{c}`' for c in checked) or 'none'}; "
        f"ran in {seconds:.0f} s; MLflow parent run {mlflow_run_markdown(parent.run_id, uri)}."
        f"\n\n{table}\n\n`dvc exp show` lists it, `dvc exp apply "
        f"{name}` brings it into the workspace. {mlflow_ui_hint(uri)}".rstrip(),
        key="experiment-summary", description=f"latentforge experiment {name}")
    return seconds


def roll_up(parent: tracking.Tracker) -> dict[str, dict[str, Any]]:
    """Log the metrics of `parent`'s stage runs on it as `<stage>.<metric>`, as a `latentforge
    run` parent holds them, with the `latentforge.ran` tag: an experiment's parent run had
    only its overrides and seconds, so experiments could not be compared in the MLflow UI.
    Returns each stage that ran, in the pipeline's order, as a stage table's record (its run,
    seconds and metrics)."""
    import mlflow

    if parent.run_id is None:  # tracking off
        return {}
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_run(parent.run_id).info.experiment_id
    children = client.search_runs([experiment],
                                  f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    by_stage = {c.data.tags.get(f"{tracking.TAG_PREFIX}stage"): c for c in children}
    ran = [s for s in paths.STAGES if s in by_stage]
    for stage in ran:
        parent.log_metrics({f"{stage}.{k}": v for k, v in by_stage[stage].data.metrics.items()})
    parent.set_tags({f"{tracking.TAG_PREFIX}ran": ",".join(ran)})
    return {stage: {"stage": stage, "status": "ran", "run_id": run.info.run_id,
                    "seconds": ((run.info.end_time or run.info.start_time)
                                - run.info.start_time) / 1000,
                    "metrics": dict(sorted(run.data.metrics.items()))}
            for stage, run in ((s, by_stage[s]) for s in ran)}
