"""Helpers for tests that start real servers as subprocesses (Prefect, MLflow, Ray nodes):
a free loopback port, waiting for a health endpoint, stopping a process group for good."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from latentforge import paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_from_terminal() -> None:
    """Popen's preexec_fn for a process that a test then sends Ctrl-C (SIGINT): SIGINT at its
    default, as in any process a terminal starts. A test run launched as a non-interactive
    shell's background job (`make test &`, nohup) inherits SIGINT ignored, and POSIX passes an
    ignored signal on through exec, so the CLI would rightly keep ignoring it (procs.py) and a
    test's Ctrl-C would never arrive: the test would time out, the process go on running."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, what: str,
                 timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the server's log tail if the process exits
    or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{what}: no answer from {url} after {timeout:.0f} s:\n{tail(log)}")


def stop_group(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True: SIGTERM its group, SIGKILL after
    `timeout`; then the same for descendants that left the group (a Prefect worker starts each
    flow run in a new session, and the flow run starts DVC, the stage command and Ray)."""
    if proc is None:
        return
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(proc.pid).children(recursive=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    for sig in ("terminate", "kill"):
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(child, sig)()
        _, descendants = psutil.wait_procs(descendants, timeout=timeout)


@contextlib.contextmanager
def running_ui(root: Path, tmp_path: Path, env_extra: dict[str, str] | None = None):
    """`latentforge ui` in `root` on free ports; yields (Prefect URL, MLflow URL, its output
    lines, the process) once both are up and every deployment is served; Ctrl-C at the end
    (a test may send it itself first)."""

    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1",
                **(env_extra or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentforge", "ui", "--prefect-port", str(prefect_port),
         "--mlflow-port", str(mlflow_port)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=as_from_terminal)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout),
                     daemon=True).start()
    prefect = f"http://127.0.0.1:{prefect_port}"
    try:
        deadline = time.monotonic() + 300
        served = 0
        while served < len(paths.STAGES) + 2:
            assert proc.poll() is None, "\n".join(lines[-40:])
            assert time.monotonic() < deadline, "\n".join(lines[-40:])
            time.sleep(1)
            if any(line.startswith("MLflow UI") for line in lines):
                served = len(api(prefect, "deployments/filter", {}))
        yield prefect, f"http://127.0.0.1:{mlflow_port}", lines, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        stop_group(proc)


def api(prefect: str, route: str, body: dict | None = None, tries: int = 5):
    """GET (or POST `body` to) the Prefect REST API. A 503 (the server's SQLite database busy
    on 2 loaded cores) is retried."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{prefect}/api/{route}", data=data,
                                     headers={"content-type": "application/json"})
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:  # the API says why in the body
            text = exc.read().decode(errors="replace")[:2000]
            if exc.code != 503 or attempt == tries - 1:
                raise AssertionError(f"{request.get_method()} {route}: {exc.code} {text}"
                                     ) from None
            time.sleep(2)
    raise AssertionError("unreachable")
