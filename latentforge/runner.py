"""Execute one stage: the body of `latentforge stage NAME` when DVC runs it.

Opens the stage's MLflow run (nested under the pipeline run when `latentforge run` started
it), calls `tasks/<stage>.run(...)`, writes the DVC metrics file, and leaves a small record
(run id, duration, metrics, Markdown summary) for the Prefect flow that asked for the stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentforge import paths, storage, tracking
from latentforge.config import Params

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage's `run` returns: metrics for DVC/MLflow and a Markdown summary for people."""

    metrics: dict[str, float]
    summary: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # output name -> sha256
    # Timings and throughput vary run to run: MLflow only, never the DVC metrics file,
    # so that `latentforge run` and `dvc repro` leave identical dvc.lock files.
    timings: dict[str, float] = field(default_factory=dict)


def stage_tags(stage: str) -> dict[str, str]:
    return {
        f"{tracking.TAG_PREFIX}stage": stage,
        f"{tracking.TAG_PREFIX}dvc_stage": os.environ.get("DVC_STAGE", ""),
        f"{tracking.TAG_PREFIX}prefect_flow_run_id": os.environ.get(tracking.FLOW_RUN_ENV, ""),
        f"{tracking.TAG_PREFIX}entry": "latentforge run" if os.environ.get(
            tracking.PARENT_RUN_ENV) else ("dvc repro" if os.environ.get("DVC_STAGE") else "direct"),
    }


def _call_task(stage: str, params: Params, tracker: tracking.Tracker) -> StageResult:
    module = importlib.import_module(f"latentforge.tasks.{stage}")
    return module.run_stage(params, tracker)


def execute_stage(stage: str, params: Params, root: str | Path = ".") -> StageResult:
    """Run `stage` with tracking; write metrics/<stage>.json and the last-run record."""
    if stage not in paths.STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(paths.STAGES)}")
    storage.configure(params.storage)
    root = Path(root)
    parent = os.environ.get(tracking.PARENT_RUN_ENV) or None
    started = time.time()
    with tracking.start_run(params.tracking, stage, stage_tags(stage), parent, root) as tracker:
        section = params.section(stage)
        tracker.log_params({stage: dataclasses.asdict(section),
                            "compute": dataclasses.asdict(params.compute)})
        result = _call_task(stage, params, tracker)
        tracker.log_metrics(result.metrics)
        duration = time.time() - started
        tracker.log_metrics({**result.timings, "stage_seconds": duration})
        tracker.log_text(result.summary, f"{stage}_summary.md")
        run_id = tracker.run_id
    metrics_path = root / paths.metrics_file(stage)
    storage.write_bytes_atomic(metrics_path, json.dumps(result.metrics, indent=2,
                                                        sort_keys=True).encode())
    record = {"stage": stage, "run_id": run_id, "parent_run_id": parent,
              "seconds": round(duration, 2), "metrics": result.metrics, "summary": result.summary,
              "digests": result.digests, "finished": time.time()}
    storage.write_bytes_atomic(root / paths.last_run_file(stage),
                               json.dumps(record, indent=2).encode())
    log.info("%s finished in %.1f s (MLflow run %s)", stage, duration, run_id or "-")
    return result


def skipped_record(stage: str, root: str | Path = ".", seconds: float = 0.0) -> dict[str, Any]:
    """The record of a stage DVC found up to date: its last run's metrics, MLflow run and
    summary (none when its outputs came from elsewhere, e.g. `dvc pull`)."""
    last = read_last_run(stage, root) or {}
    return {"stage": stage, "status": "skipped", "seconds": seconds,
            "metrics": last.get("metrics", {}), "run_id": last.get("run_id"),
            "summary": last.get("summary", ""), "finished": last.get("finished"),
            "last_seconds": last.get("seconds")}


def read_last_run(stage: str, root: str | Path = ".") -> dict[str, Any] | None:
    path = Path(root) / paths.last_run_file(stage)
    if not path.exists():
        return None
    return json.loads(path.read_text())
