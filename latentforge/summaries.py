"""The Markdown that Prefect shows for a stage or a pipeline run (its summary artifacts), built
without importing Prefect or MLflow: the no-op `latentforge run` (noop.py) publishes it too."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any


def local_store_uri() -> str:
    """The store `mlflow ui --backend-store-uri` opens: MLFLOW_TRACKING_URI, else the project's
    SQLite file (relative: the command is run from the project root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def mlflow_server(tracking_uri: str | None) -> str | None:
    """The web UI's base URL when the tracking URI is an MLflow server, else None."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return None


# Set by `latentforge ui` for the deployments it serves: the MLflow UI it started on the
# project's store, which the runs' summaries then link into.
MLFLOW_UI_ENV = "LATENTFORGE_MLFLOW_UI"


def mlflow_ui_base(tracking_uri: str | None) -> str | None:
    """Where the runs can be opened in a browser: the tracking server, else the MLflow UI
    `latentforge ui` serves on the local store; None when neither."""
    return mlflow_server(tracking_uri) or (os.environ.get(MLFLOW_UI_ENV) or "").rstrip("/") \
        or None


def mlflow_run_markdown(run_id: str | None, tracking_uri: str | None,
                        experiment_id: str | None = None) -> str:
    """An MLflow run in Markdown: a link into the tracking server's (or `latentforge ui`'s
    MLflow) UI, else the run id."""
    if not run_id:
        return "not tracked"
    server = mlflow_ui_base(tracking_uri)
    if server is None:
        return f"`{run_id}`"
    # Without the experiment id, MLflow's direct run route (which redirects) still works.
    page = f"experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"runs/{run_id}"
    # workflowType: MLflow 3.17's UI opens its GenAI view unless the link asks for this one
    return f"[{run_id[:8]}…]({server}/#/{page}?workflowType=machine_learning)"


def mlflow_ui_hint(tracking_uri: str | None) -> str:
    """How to open the runs' UI when they are in a local store (empty where they are links)."""
    if mlflow_ui_base(tracking_uri):
        return ""
    return f"Browse the MLflow runs with `mlflow ui --backend-store-uri {local_store_uri()}`."


def stage_summary_markdown(record: dict[str, Any], tracking_uri: str | None,
                           experiment_id: str | None = None) -> str:
    """The stage's artifact: its summary and MLflow run when it ran; when DVC found it up to
    date, that it was skipped and which run produced the outputs it kept."""
    stage, run = record["stage"], mlflow_run_markdown(record.get("run_id"), tracking_uri,
                                                       experiment_id)
    if record["status"] == "ran":
        lines = [f"## {stage}: ran", "", record.get("summary") or "", "",
                 f"Ran in {record['seconds']:.1f} s; MLflow run {run}."]
    else:
        if record.get("run_id") or record.get("finished"):
            when = (f", finished {_utc(record['finished'])}" if record.get("finished") else "")
            took = (f" in {record['last_seconds']:.1f} s" if record.get("last_seconds") else "")
            last = f"last run {run}{when}{took}"
        else:  # outputs from elsewhere (`dvc pull`, a `dvc repro` in another clone)
            last = "no run of it recorded in this workspace"
        lines = [f"## {stage}: skipped", "", f"**Up to date: skipped**, {last}."]
        if record.get("summary"):
            lines += ["", "### Last run's summary", "", record["summary"]]
    hint = mlflow_ui_hint(tracking_uri) if record.get("run_id") else ""
    return "\n".join([*lines, *(["", hint] if hint else [])])


def _utc(timestamp: float) -> str:
    """A Unix time as minutes in UTC."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def stage_table_markdown(records: list[dict[str, Any]], tracking_uri: str | None = None,
                         experiment_id: str | None = None) -> str:
    """The pipeline's stage table. A skipped stage shows its last run's metrics and MLflow run,
    marked as such, and no duration (nothing ran)."""
    lines = ["| stage | status | seconds | key metrics | MLflow run |", "|---|---|---|---|---|"]
    for r in records:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list((r.get("metrics") or {}).items())[:4])
        run = (mlflow_run_markdown(r["run_id"], tracking_uri, experiment_id)
               if r.get("run_id") else "-")
        if r["status"] == "ran":
            lines.append(f"| {r['stage']} | ran | {r['seconds']:.1f} | {shown} | {run} |")
        else:
            lines.append(f"| {r['stage']} | **skipped** (up to date) | - | "
                         f"{'last run: ' + shown if shown else '-'} | "
                         f"{'last run ' + run if r.get('run_id') else '-'} |")
    return "\n".join(lines)


def nothing_ran_markdown(records: list[dict[str, Any]], tracking_uri: str | None) -> str:
    """The pipeline's artifact when DVC found every selected stage up to date."""
    return ("## LatentForge pipeline\n\nNothing ran: DVC found every stage up to date, so no "
            "MLflow run was opened.\n\n" + stage_table_markdown(records, tracking_uri))


def pipeline_summary_markdown(records: list[dict[str, Any]], parent_run_id: str | None,
                              tracking_uri: str | None, experiment_id: str | None = None) -> str:
    """The pipeline's artifact: the stage table and the MLflow parent run."""
    table = stage_table_markdown(records, tracking_uri, experiment_id)
    parent = mlflow_run_markdown(parent_run_id, tracking_uri, experiment_id)
    hint = mlflow_ui_hint(tracking_uri) if parent_run_id else ""
    return f"## LatentForge pipeline\n\n{table}\n\nMLflow parent run {parent}. {hint}".rstrip()
