"""Helpers for tests that start real servers as subprocesses (Prefect, MLflow, Ray nodes):
a free loopback port, waiting for a health endpoint, stopping a process group for good."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
