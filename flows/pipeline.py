"""The pipeline flow: every DVC stage in graph order, one subflow per stage, under one
MLflow parent run. `latentforge run` and the Prefect UI's Run button both start it."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from latentforge import dvcops, tracking, workspace
from latentforge.config import load_params
from latentforge.errors import ConfigError
from latentforge.flows.stages import STAGE_FLOWS, apply_params


def stage_table_markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| stage | status | seconds | key metrics | MLflow run |", "|---|---|---|---|---|"]
    for r in records:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list((r.get("metrics") or {}).items())[:4])
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {shown} | "
                     f"{r.get('run_id') or '-'} |")
    return "\n".join(lines)


@flow(name="pipeline", log_prints=True,
      description="prepare -> ... -> evaluate: DVC decides what is up to date; MLflow tracks.")
def pipeline(overrides: list[str] | None = None, params_file: str | None = None,
             force: bool = False, stages: list[str] | None = None) -> list[dict[str, Any]]:
    with workspace.lock(what=f"Prefect flow run {flow_run.id or 'pipeline'}"):
        return _pipeline(overrides, params_file, force, stages)


def _pipeline(overrides: list[str] | None, params_file: str | None, force: bool,
              stages: list[str] | None) -> list[dict[str, Any]]:
    logger = get_run_logger()
    apply_params(params_file, overrides or [])
    params = load_params()
    order = dvcops.stage_order()
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(order)}")
    selected = [s for s in order if not stages or s in stages]
    logger.info("stages in order: %s", " -> ".join(selected))
    tags = {f"{tracking.TAG_PREFIX}prefect_flow_run_id": str(flow_run.id or ""),
            f"{tracking.TAG_PREFIX}stage": "pipeline"}
    records: list[dict[str, Any]] = []
    started = time.time()
    with tracking.start_run(params.tracking, "pipeline", tags) as parent:
        for stage in selected:
            records.append(STAGE_FLOWS[stage](force=force, parent_run_id=parent.run_id))
        for r in records:
            parent.log_metrics({f"{r['stage']}.{k}": v for k, v in (r.get("metrics") or {}).items()
                                if isinstance(v, int | float)})
        table = stage_table_markdown(records)
        parent.log_text(table, "stages.md")
        parent.log_metrics({"pipeline_seconds": time.time() - started})
        parent.set_tags({f"{tracking.TAG_PREFIX}ran": ",".join(
            r["stage"] for r in records if r["status"] == "ran")})
    for r in records:
        r["parent_run_id"] = parent.run_id
    create_markdown_artifact(f"## LatentForge pipeline\n\n{table}\n\nMLflow parent run "
                             f"`{parent.run_id}`", key="pipeline-summary")
    if params.storage.remote:
        logger.info("pushing outputs to the DVC remote %s", params.storage.remote)
        dvcops.push(params.storage.remote, on_line=lambda line: logger.info("%s", line))
    return records


def run_pipeline(stages: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Entry for the CLI: the whole pipeline, or one stage flow on its own (no parent run)."""
    if stages and len(stages) == 1:
        return [STAGE_FLOWS[stages[0]](force=force)]
    return pipeline(force=force, stages=stages)
