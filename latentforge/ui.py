"""`latentforge ui`: the Prefect server, the served deployments and the MLflow UI in one command.

Three child processes, each in its own session (procs.start_group), all on 127.0.0.1:
a Prefect server (the UI with Run buttons), `latentforge serve` (the deployments, pointed at
that server) and `mlflow ui` on the project's store. The Prefect server is the background one
every `latentforge run` reports to (prefectbg.py; started if none runs, left running), or, with
LATENTFORGE_PREFECT_SERVER=temporary, one of its own. Ctrl-C stops them in the reverse order
(deployments first, so they never retry a server that is already gone); if one of them exits
on its own, the others are stopped and the command fails naming it. The guard stops them all
if this process is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from latentforge import prefectbg, procs, tracking
from latentforge.errors import LatentForgeError
from latentforge.summaries import MLFLOW_UI_ENV

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[Any]
    health: str | None  # URL answering 200 once the service is up


def _port_free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _wait_healthy(service: Service, deadline: float) -> None:
    assert service.health is not None
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise LatentForgeError(f"{service.name} exited with code {service.proc.returncode} "
                                   "while starting (its output is above)")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(service.health, timeout=2) as answer:  # noqa: S310
            if answer.status == 200:
                return
        time.sleep(0.3)
    raise LatentForgeError(f"{service.name} did not answer {service.health} within "
                           f"{START_TIMEOUT_S:.0f} s")


def _start(name: str, cmd: list[str], env: dict[str, str], health: str | None) -> Service:
    log.info("starting %s", name)
    return Service(name, procs.start_group(cmd, env=env, stdin=subprocess.DEVNULL), health)


def _stop(services: list[Service]) -> None:
    with procs.interrupts_deferred():
        for service in reversed(services):
            if service.proc.poll() is None or procs.group_alive(service.proc.pid):
                log.info("stopping %s", service.name)
                procs.stop_group(service.proc, grace=20)


def _check_ports_free(ports: list[tuple[str, int]]) -> None:
    for what, port in ports:
        if not _port_free(port):
            raise LatentForgeError(f"port {port} on {HOST} is taken: is another `latentforge "
                                   f"ui` or {what} server running? Pick another with "
                                   f"--{what.lower()}-port")


def run_ui(prefect_port: int = 4200, mlflow_port: int = 5000, limit: int = 1) -> int:
    """Start the three services, print their URLs, wait for Ctrl-C (exit 0) or a failure."""
    # The background Prefect server (prefectbg.py) is the one every `latentforge run` reports
    # to: the UI shows it, started here if none runs, and it stays up after Ctrl-C. With
    # LATENTFORGE_PREFECT_SERVER=temporary, or an API configured elsewhere that is not ours to
    # show, this command starts its own server and stops it.
    shared = prefectbg.mode() == "background" and not prefectbg.configured_api_url()
    _check_ports_free([("MLflow", mlflow_port)] if shared else [("Prefect", prefect_port),
                                                                 ("MLflow", mlflow_port)])
    procs.start_guard()
    if shared:
        try:
            record = prefectbg.start(port=prefect_port)
            prefect_port = record.port
        except prefectbg.ServerUnavailable as exc:  # not ours to show: a server of its own
            log.warning("%s; this command starts its own Prefect server", exc)
            shared = False
            _check_ports_free([("Prefect", prefect_port)])
    prefect_api = f"http://{HOST}:{prefect_port}/api"
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           # Offline, Prefect's start-up telemetry logs an ERROR that reads like a failure.
           "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED",
                                                              "false")}
    services: list[Service] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        if not shared:
            services.append(_start(
                "the Prefect server",
                [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port",
                 str(prefect_port)], env, f"{prefect_api}/health"))
        store = tracking.tracking_uri()
        services.append(_start(
            "the MLflow UI",
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", HOST,
             "--port", str(mlflow_port)], env, f"http://{HOST}:{mlflow_port}/health"))
        for service in services:
            _wait_healthy(service, deadline)
        services.append(_start(
            "the deployments (latentforge serve)",
            [sys.executable, "-m", "latentforge", "serve", "--limit", str(limit)],
            # their runs' summaries link into this MLflow UI (summaries.mlflow_ui_base)
            {**env, MLFLOW_UI_ENV: f"http://{HOST}:{mlflow_port}"}, None))
        print(f"Prefect UI   http://{HOST}:{prefect_port}   (Deployments: press Run on "
              f"pipeline or a stage)\nMLflow UI    http://{HOST}:{mlflow_port}/#/experiments"
              f"?workflowType=machine_learning   ({store})\n"
              + ("Ctrl-C stops the deployments and the MLflow UI; the background Prefect "
                 "server stays up (`latentforge server stop`)." if shared else
                 "Ctrl-C stops all three."), flush=True)
        while True:
            for service in services:
                if service.proc.poll() is not None:
                    raise LatentForgeError(f"{service.name} exited with code "
                                           f"{service.proc.returncode}; stopping the others")
            time.sleep(0.5)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, procs.Interrupted) else signal.SIGINT
        print(f"{signal.Signals(signum).name}: stopping the deployments, the MLflow UI"
              + ("" if shared else " and the Prefect server"), file=sys.stderr, flush=True)
        _stop(services)
        print("stopped", file=sys.stderr)
        return 0
    except BaseException:
        _stop(services)
        raise
