"""The pipeline flow: every DVC stage in graph order, one subflow per stage, under one
MLflow parent run. `latentforge run` and the Prefect UI's Run button both start it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

from latentforge import dvcops, preflight, procs, tracking, workspace
from latentforge.config import Params
from latentforge.errors import ConfigError, LatentForgeError
from latentforge.flows.stages import (
    FORM_WAIT,
    NO_CHANGES,
    PARAMETERS_DOC,
    STAGE_FLOWS,
    WRITES_PARAMS,
    Overrides,
    ParamChanges,
    ParamsFile,
    StageName,
    apply_params,
    failed_state,
    mlflow_experiment_id,
)
from latentforge.runner import skipped_record
from latentforge.summaries import (
    nothing_ran_markdown,
    pipeline_summary_markdown,
    stage_table_markdown,
)

Stages = Annotated[list[StageName] | None, Field(examples=[["prepare", "judge"]])]


PIPELINE_DOC = """Every stage of dvc.yaml in graph order, or the chosen ones.

Args:""" + PARAMETERS_DOC + """
    stages: Run only these stages, in graph order (the stages upstream of them are not
        run); each is still skipped when DVC finds it up to date. Empty: every stage.
"""


def _documented(fn: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
    fn.__doc__ = PIPELINE_DOC  # before @flow, which reads the parameter descriptions from it
    return fn


@flow(name="pipeline", log_prints=True,
      description="Every stage of dvc.yaml in graph order (prepare -> judge -> tokenizer -> "
      "cache -> generator -> posttrain -> rl -> evaluate), one subflow each; DVC skips the stages that are "
      f"up to date; MLflow records a parent run with a child run per stage. {WRITES_PARAMS}")
@_documented
def pipeline(overrides: Overrides = None, params_file: ParamsFile = None,
             force: bool = False, stages: Stages = None,
             params: ParamChanges = NO_CHANGES, wait: bool = False) -> list[dict[str, Any]]:
    try:
        with workspace.lock(what=f"Prefect flow run {flow_run.id or 'pipeline'}",
                            wait=wait or None, say=get_run_logger().warning,
                            wait_hint=FORM_WAIT), \
                procs.flow_run_watched():
            return _pipeline(overrides, params_file, force, list(stages or []), params)
    except LatentForgeError as exc:  # a failed stage's own flow run logged it too
        return failed_state(exc)  # type: ignore[return-value]  # Prefect raises exc


def _pipeline(overrides: list[str] | None, params_file: str | None, force: bool,
              stages: list[str], changes: Any = None) -> list[dict[str, Any]]:
    logger = get_run_logger()
    # Before DVC's unbounded S3 client looks at the source (UI-started); the CLI looked
    # already, before its own status.
    check = not dvcops.status_known()
    params = apply_params(params_file, overrides or [], changes, stages or None, check=check)
    # One DVC status of the graph: a stage found unchanged, none of whose upstream stages ran
    # in this pipeline, is skipped here without a subflow or another look at DVC.
    status = dvcops.graph_status()
    order = status.order
    unknown = sorted(set(stages) - set(order))
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(order)}")
    selected = [s for s in order if not stages or s in stages]
    logger.info("stages in order: %s", " -> ".join(selected))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not force and all(status.clean(stage, set()) for stage in selected):
        # Nothing will execute: the table and the summary, no MLflow run, as the CLI's no-op
        # answers without the flow engine (a temporary server, the UI's Run button come here).
        logger.info("every stage is up to date (DVC): nothing ran (%s)", ", ".join(selected))
        skipped = [skipped_record(stage) for stage in selected]
        create_markdown_artifact(nothing_ran_markdown(skipped, uri), key="pipeline-summary",
                                 description="latentforge pipeline")
        if params.storage.remote and not dvcops.pushed(params.storage.remote):
            _push(params, logger)  # a remote set since, or a push that failed: it gets them now
        return skipped
    tags = {f"{tracking.TAG_PREFIX}prefect_flow_run_id": str(flow_run.id or ""),
            f"{tracking.TAG_PREFIX}stage": "pipeline"}
    records: list[dict[str, Any]] = []
    started = time.time()
    if check:  # something will run: this machine and the tracking server
        preflight.check_environment(params, selected)
    with preflight.pipeline_checked(), \
            tracking.start_run(params.tracking, "pipeline", tags) as parent:
        experiment_id = mlflow_experiment_id(uri, params)
        # Every value the pipeline ran with (a `run -S` wrote its changes into params.yaml
        # before the flow began), so that pipeline runs compare in MLflow's table as stages do.
        parent.log_params(params.to_dict())
        ran: set[str] = set()
        for stage in selected:
            if not force and status.clean(stage, ran):
                logger.info("%s is up to date: skipped", stage)
                records.append(skipped_record(stage))
                continue
            records.append(STAGE_FLOWS[stage](force=force, parent_run_id=parent.run_id))
            if records[-1]["status"] == "ran":
                ran.add(stage)
        for r in records:
            parent.log_metrics({f"{r['stage']}.{k}": v for k, v in (r.get("metrics") or {}).items()
                                if isinstance(v, int | float)})
        parent.log_text(stage_table_markdown(records, uri, experiment_id), "stages.md")
        parent.log_metrics({"pipeline_seconds": time.time() - started})
        parent.set_tags({f"{tracking.TAG_PREFIX}ran": ",".join(
            r["stage"] for r in records if r["status"] == "ran")})
    for r in records:
        r["parent_run_id"] = parent.run_id
    create_markdown_artifact(pipeline_summary_markdown(records, parent.run_id, uri, experiment_id),
                             key="pipeline-summary", description="latentforge pipeline")
    if params.storage.remote:
        _push(params, logger)
    return records


def _push(params: Params, logger: Any) -> None:
    logger.info("pushing outputs to the DVC remote %s", params.storage.remote)
    dvcops.push(cast(str, params.storage.remote), on_line=lambda line: logger.info("%s", line),
                timeouts=(params.storage.connect_timeout, params.storage.read_timeout))


def run_pipeline(stages: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Entry for the CLI: the whole pipeline, or one stage flow on its own (no parent run)."""
    if stages and len(stages) == 1:
        return [STAGE_FLOWS[stages[0]](force=force)]
    return pipeline(force=force, stages=cast("list[StageName] | None", stages))  # Prefect checks
