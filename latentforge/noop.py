"""The no-op `latentforge run`: every stage up to date, answered at about the cost of `dvc status`.

When DVC finds every selected stage unchanged, nothing would run: the Prefect flow engine
(2+ s of imports) and one subflow per stage only to say "skipped" cost 10x the answer. Here one
DVC status of the graph decides; the skipped stages' last records give the table; and the run is
still recorded in Prefect (the UI shows every run): a flow run of the same flow (`pipeline`, or
the stage's), Completed, with the same summary artifact and a log line, through Prefect's REST
API (the calls Prefect's own client makes), without importing prefect. No MLflow run: nothing
executed.

Anything unusual (no API known without Prefect's own settings, the API refusing a call) returns
None, and the caller takes the full path, which handles it as always.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from latentforge import dvcops, prefectbg
from latentforge.runner import skipped_record
from latentforge.summaries import nothing_ran_markdown, stage_summary_markdown

log = logging.getLogger(__name__)

API_TIMEOUT_S = 5.0


def api_url() -> str | None:
    """The Prefect API this command would use, when it is known without importing prefect:
    a configured PREFECT_API_URL, else the background server (started if none runs)."""
    configured = prefectbg.configured_api_url()
    if configured:
        return configured.rstrip("/")
    if prefectbg.mode() != "background":
        return None  # a temporary server per command: the full path starts it
    try:
        return prefectbg.ensure()
    except prefectbg.ServerUnavailable:
        return None  # another environment's server: the full path says so and starts its own


def _call(api: str, method: str, path: str, body: Any) -> Any:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=API_TIMEOUT_S) as answer:  # noqa: S310
        raw = answer.read()
    return json.loads(raw) if raw else None


def record_in_prefect(api: str, flow_name: str, parameters: dict[str, Any], markdown: str,
                      artifact_key: str, message: str) -> str:
    """A Completed flow run of `flow_name` with the summary artifact and one log line; returns
    the flow run's name."""
    flow = _call(api, "POST", "/flows/", {"name": flow_name})
    run = _call(api, "POST", "/flow_runs/", {
        "flow_id": flow["id"], "parameters": parameters, "tags": ["latentforge", "no-op"],
        "state": {"type": "RUNNING", "name": "Running"}})
    now = datetime.now(UTC).isoformat()
    _call(api, "POST", "/logs/", [{"name": "latentforge", "level": logging.INFO,
                                   "message": message, "timestamp": now,
                                   "flow_run_id": run["id"]}])
    _call(api, "POST", "/artifacts/", {"key": artifact_key, "type": "markdown",
                                       "data": markdown, "flow_run_id": run["id"],
                                       "description": f"latentforge {flow_name}: nothing ran"})
    _call(api, "POST", f"/flow_runs/{run['id']}/set_state",
          {"state": {"type": "COMPLETED", "name": "Completed", "message": message},
           "force": True})
    return str(run["name"])


def try_noop(stages: list[str] | None, status: dvcops.GraphStatus | None = None,
             remote: str | None = None) -> list[dict[str, Any]] | None:
    """The records of a run where every selected stage is up to date, recorded in Prefect;
    None when something would run (or cannot be answered here), or when the pipeline would
    push outputs that `remote` (storage.remote) has not had from us yet."""
    if remote and not (stages and len(stages) == 1) and not dvcops.pushed(remote):
        return None
    status = status or dvcops.graph_status()
    unknown = sorted(set(stages or []) - set(status.order))
    if unknown:
        return None  # the full path names them in its error
    selected = [s for s in status.order if not stages or s in stages]
    if any(not status.clean(s) for s in selected):
        return None
    records = [skipped_record(s) for s in selected]
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if stages and len(stages) == 1:
        flow_name, key = stages[0], f"{stages[0]}-summary"
        markdown = stage_summary_markdown(records[0], uri)
        parameters: dict[str, Any] = {"force": False}
    else:
        flow_name, key = "pipeline", "pipeline-summary"
        markdown = nothing_ran_markdown(records, uri)
        parameters = {"force": False, "stages": stages}
    message = (f"every stage is up to date (DVC): nothing ran ({', '.join(selected)})"
               if len(selected) > 1 else f"{selected[0]} is up to date: skipped")
    try:
        api = api_url()
        if api is None:
            return None
        name = record_in_prefect(api, flow_name, parameters, markdown, key, message)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError is an OSError
        log.debug("recording the no-op run through the Prefect API failed; taking the flow "
                  "path", exc_info=exc)
        return None
    for r in records:
        r["prefect_flow_run"] = name
    return records
