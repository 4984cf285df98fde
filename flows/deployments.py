"""Served deployments: the pipeline and each stage get the Prefect UI's Run button.

Each deployment is named after its flow, so the UI and `prefect deployment ls` list them as
`pipeline/pipeline`, `prepare/prepare`, ... (flow name/deployment name), the same names as
infra/prefect.yaml gives them on a work pool."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from prefect.deployments.runner import EntrypointType

from latentforge.flows.experiment import experiment
from latentforge.flows.pipeline import pipeline
from latentforge.flows.stages import STAGE_FLOWS


def build_deployments(limit: int = 1) -> list[Any]:
    """One deployment for the pipeline, one per stage and one for DVC experiments. One run uses
    a workspace at a time (latentforge/workspace.py), so each deployment runs at most `limit`
    (default 1) flow runs concurrently."""
    flows = [pipeline, *STAGE_FLOWS.values(), experiment]
    return [f.to_deployment(name=f.name, concurrency_limit=limit,
                            description=f.description, tags=["latentforge"],
                            entrypoint_type=EntrypointType.MODULE_PATH) for f in flows]


SHUTDOWN_GRACE_S = 30.0  # how long a stopping `serve` may spend telling the server goodbye


def _api_answers(timeout: float = 2.0) -> bool:
    """Whether the Prefect API this process talks to answers its health check now."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return True  # no server named: nothing to check
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _stop_children(timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the flow-run processes this runner started."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _on_stop(signum: int) -> None:
    """What `serve` does first on Ctrl-C or SIGTERM. When the server is gone, Prefect's own
    shutdown (pause every deployment, with the client's retries) would hang minutes and end in
    a traceback: stop the flow runs and exit at once, in one line. Otherwise Prefect's shutdown
    runs, bounded by SHUTDOWN_GRACE_S."""
    name = signal.Signals(signum).name
    if not _api_answers():
        from prefect.settings import PREFECT_API_URL

        print(f"{name}: the Prefect server {PREFECT_API_URL.value()} no longer answers; "
              "stopped without pausing the deployments", file=sys.stderr, flush=True)
        _stop_children()
        os._exit(128 + signum)

    def give_up() -> None:
        print(f"{name}: Prefect's shutdown took over {SHUTDOWN_GRACE_S:.0f} s; stopped without "
              "waiting for it", file=sys.stderr, flush=True)
        _stop_children()
        os._exit(128 + signum)

    timer = threading.Timer(SHUTDOWN_GRACE_S, give_up)
    timer.daemon = True
    timer.start()


class _NoTraceback(logging.Filter):
    """Keep a record's message, drop its traceback (still there under `latentforge -v`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.getLogger("latentforge").isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


def serve_all(limit: int = 1) -> None:
    """Serve every deployment until Ctrl-C or SIGTERM (see `_on_stop`)."""
    from prefect.flows import serve
    from prefect.runner import Runner

    # When the server goes away, Prefect's cancellation observer logs a WARNING ("switching
    # to polling mode") with a websocket traceback: the line says enough.
    logging.getLogger("prefect.FlowRunCancellingObserver").addFilter(_NoTraceback())

    # Prefect's Runner puts its own SIGTERM handler in place when it starts: wrap the
    # handler it will install, and take SIGINT before asyncio does.
    original = Runner.handle_sigterm

    def handle_sigterm(self: Runner, *args: Any, **kwargs: Any) -> None:
        _on_stop(signal.SIGTERM)
        original(self, *args, **kwargs)

    def handle_sigint(signum: int, frame: Any) -> None:
        _on_stop(signum)
        signal.default_int_handler(signum, frame)

    Runner.handle_sigterm = handle_sigterm  # type: ignore[method-assign]
    signal.signal(signal.SIGINT, handle_sigint)
    try:
        serve(*build_deployments(limit))
    finally:
        Runner.handle_sigterm = original  # type: ignore[method-assign]
