"""The Prefect API of a `latentforge` command: configured, background (prefectbg.py) or temporary.

The temporary server (LATENTFORGE_PREFECT_SERVER=temporary) is started so that it ends with
the command.

Without PREFECT_API_URL, Prefect starts a temporary API server on 127.0.0.1 in a child
process. Started by Prefect, that child shares the terminal's process group: Ctrl-C killed
it first, and the flow then retried the dead API for minutes while recording its crash; and a
SIGKILL of `latentforge` left it running. Started here instead (the same Prefect class, which
Prefect then reuses), it runs in its own session, the guard knows its pid, and it is stopped
last, after the flow has recorded how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from latentforge import prefectbg, procs
from latentforge.errors import LatentForgeError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120


def _server_class() -> type:
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class SessionServer(SubprocessASGIServer):
        """Prefect's temporary server, in its own session and registered with the guard."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's own command line and environment (prefect/server/api/server.py).
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, start_new_session=True)
            procs.guard_send(f"pid {proc.pid}")
            return proc

    return SessionServer


def needs_temporary_server() -> bool:
    """True when no Prefect API is configured (Prefect would start a temporary one)."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the flow's last logs and events while the server still answers: otherwise Prefect's
    workers retry the stopped server at exit for over a minute ("Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # a failed drain costs log lines, never the run's result
            log.debug("draining %s failed", worker.__name__, exc_info=True)


def check_configured_api(url: str, timeout: float = prefectbg.UNRESPONSIVE_WAIT_S) -> None:
    """The PREFECT_API_URL the user configured must answer (probe.unanswered): Prefect's client
    otherwise fails in a long traceback or, on a server that never answers, waits without a
    word."""
    from latentforge.probe import shown_url, unanswered

    where = "the environment" if os.environ.get("PREFECT_API_URL") else \
        f"the Prefect profile in {prefectbg.prefect_home() / 'profiles.toml'}"
    reason = unanswered(url, timeout)
    if reason is not None:
        raise LatentForgeError(f"PREFECT_API_URL {shown_url(url)} (from {where}) does not "
                               f"answer: {reason}; start that server, or unset PREFECT_API_URL "
                               "and LatentForge starts its own")


def describe_api_error(exc: BaseException) -> str | None:
    """One line for the Prefect API failing under a running command (its server stopped or
    crashed: Prefect's client gives up with an httpx error after its retries), else None."""
    import httpx

    if not isinstance(exc, httpx.TransportError):
        return None
    from latentforge.probe import shown_url

    try:
        request = exc.request  # httpx sets it on errors of a request it sent
        url = f"{request.url.scheme}://{request.url.netloc.decode()}"
    except RuntimeError:
        url = os.environ.get("PREFECT_API_URL") or "its address"
    return (f"the Prefect API at {shown_url(url)} stopped answering during the run "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}): "
            "was its server stopped (`latentforge server status`)? Stages that finished are in "
            "dvc.lock and MLflow; run again to go on")


@contextlib.contextmanager
def api_server() -> Iterator[None]:
    """A Prefect API for the body: the one the user configured; else the background server
    (started once, reused by every later command: prefectbg.py); else, with
    LATENTFORGE_PREFECT_SERVER=temporary or while the recorded background server is not ours to
    use (another environment's, or busy), a temporary server that stops with the body."""
    configured = prefectbg.configured_api_url()
    if configured:
        check_configured_api(configured)
    if configured or not needs_temporary_server():
        yield
        return
    url: str | None = None
    if prefectbg.mode() == "background":
        try:
            url = prefectbg.ensure()
        except prefectbg.ServerUnavailable as exc:
            log.warning("%s; this command uses a temporary Prefect server", exc)
    if url is None:
        with temporary_server():
            yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # for children (a flow run process, a worker)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), prefectbg.in_use():
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


@contextlib.contextmanager
def temporary_server() -> Iterator[None]:
    """Start Prefect's temporary server (when no API is configured) for the body; stop it after."""
    if not needs_temporary_server():
        yield
        return
    server = _server_class()()  # registered as Prefect's instance: its clients reuse it
    try:
        # Prefect's default wait (20 s) is too short for a busy 2-core machine.
        server.start(timeout=STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        server.stop()
        raise LatentForgeError(
            f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S} s; start "
            "one with `prefect server start` and set PREFECT_API_URL, or retry") from exc
    try:
        yield
    finally:
        with procs.interrupts_deferred():
            _drain_prefect_workers()
            pid = server.server_process.pid if server.server_process else None
            server.stop()
            if pid:
                procs.guard_send(f"unpid {pid}")
