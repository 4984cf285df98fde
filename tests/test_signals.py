"""Ctrl-C and SIGKILL of `latentforge run`, and what the pipeline listens on.

A real `latentforge run` in a temporary project, with Prefect's temporary server (no
PREFECT_API_URL), DVC, MLflow on SQLite and, for caching, a local Ray instance. Every process
of the run carries LATENTFORGE_INVOCATION in its environment, which is how these tests find
what is left behind (Ray and Prefect children included).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from servers import as_from_terminal
from test_pipeline import runs, tiny

from latentforge import procs


def marked_processes(token: str) -> dict[int, str]:
    """pid -> name of every live process whose environment carries the invocation `token`."""
    found = {}
    needle = f"{procs.INVOCATION_ENV}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class Run:
    """`latentforge run` in its own session, as from a terminal; output collected by a thread;
    the listening sockets of the run's processes sampled meanwhile."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.token = uuid.uuid4().hex[:12]
        # No PREFECT_API_URL: the run starts its temporary server. No MLFLOW_TRACKING_URI
        # (mlflow.set_tracking_uri in an earlier test exports it): the project's own store.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
        env.update({procs.INVOCATION_ENV: self.token, "PREFECT_HOME": str(tmp_path / "prefect"),
                    "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, "-m", "latentforge", "run"], cwd=root,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True,
                                     preexec_fn=as_from_terminal)
        self.lines: list[str] = []
        self.listening: dict[tuple[str, int], str] = {}
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._sample_sockets, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _sample_sockets(self) -> None:
        import psutil

        while self.proc.poll() is None:
            pids = marked_processes(self.token)
            for conn in psutil.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
                    self.listening[(conn.laddr.ip, conn.laddr.port)] = pids[conn.pid]
            time.sleep(0.5)

    def wait_for(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never saw {text!r}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    def wait_until_gone(self, timeout: float) -> float:
        started = time.monotonic()
        while marked_processes(self.token) and time.monotonic() - started < timeout:
            time.sleep(0.2)
        return time.monotonic() - started

    def statuses(self, root: Path) -> dict[str, str]:
        return {r.info.run_name: r.info.status
                for r in runs(root, f"tags.`{procs.INVOCATION_TAG}` = '{self.token}'")}


@pytest.mark.slow  # a whole `latentforge run` interrupted (~50-75 s): CI's test-infra runs it
def test_ctrl_c_stops_stage_and_server_ends_runs_killed_and_listens_on_loopback_only(
        make_project, tmp_path):
    # The generator trains until interrupted. With compute's defaults (one worker, no cluster)
    # nothing starts Ray: caching, training and sampling run in the stages' processes.
    root = make_project(tiny(prepare={"max_images": 300}, generator={"steps": 100000}))
    run = Run(root, tmp_path)
    run.wait_for("Running stage 'generator'")
    run.wait_for("/100000 loss")  # training has started (its MLflow run is open)
    time.sleep(3)
    sent = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    code = run.proc.wait(timeout=120)
    seconds = time.monotonic() - sent
    gone_after = run.wait_until_gone(timeout=30)
    output = "\n".join(run.lines)
    killed = [line for line in run.lines if "killing it" in line or "MLflow run(s)" in line]
    print(f"Ctrl-C to exit: {seconds:.1f} s; all processes gone {gone_after:.1f} s later; "
          f"listening sockets seen: {sorted(run.listening.items())}; "
          f"stage killed after its grace period: {killed or 'no'}")
    assert code == 130, output[-3000:]
    assert seconds < 60, f"exit took {seconds:.0f} s after Ctrl-C"
    assert run.lines[-1].startswith("interrupted (SIGINT)"), output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert not marked_processes(run.token), marked_processes(run.token)

    # The stage ends its own run KILLED; one that does not within the grace period is killed
    # and `latentforge run` ends its run for it (CI once saw a stage take the whole grace).
    statuses = run.statuses(root)
    assert statuses["pipeline"] == "KILLED", (statuses, output[-3000:])
    assert statuses["generator"] == "KILLED", (statuses, output[-3000:])
    assert statuses["prepare"] == statuses["cache"] == "FINISHED", statuses

    # Every socket the run listened on (Prefect's server) was on loopback, and no Ray process
    # listened at all (test_raycluster checks that a local Ray instance, when one is started,
    # listens on loopback only).
    names = set(run.listening.values())
    assert not any("gcs_server" in n or "raylet" in n for n in names), run.listening
    assert run.listening, "the temporary Prefect server was never seen listening"
    outside = {k: v for k, v in run.listening.items() if not is_loopback(k[0])}
    assert not outside, f"listening beyond loopback: {outside}"

    # The workspace is free again: the next run may start.
    from latentforge import workspace

    with workspace.lock(root):
        pass


@pytest.mark.slow  # a whole `latentforge run` interrupted (~50-75 s): CI's test-infra runs it
def test_sigkill_of_run_leaves_no_process_and_no_running_mlflow_run(make_project, tmp_path):
    root = make_project(tiny(prepare={"max_images": 300}, judge={"steps": 100000}))
    run = Run(root, tmp_path)
    run.wait_for("Running stage 'judge'")
    run.wait_for("/100000 loss")
    time.sleep(3)
    assert len(marked_processes(run.token)) >= 4  # run, guard, server, dvc, stage
    run.proc.send_signal(signal.SIGKILL)  # no handler runs: the guard must clean up
    run.proc.wait(timeout=10)
    gone_after = run.wait_until_gone(timeout=60)
    print(f"after SIGKILL, all processes gone in {gone_after:.1f} s")
    assert not marked_processes(run.token), marked_processes(run.token)
    statuses = run.statuses(root)
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses["pipeline"] == "KILLED", statuses
    assert statuses["judge"] in ("KILLED", "FAILED"), statuses
    assert any("stopping its" in line for line in run.lines), "\n".join(run.lines[-20:])
    # Prefect too: the guard sets the flow runs Crashed (the UI showed them Running for ever).
    import sqlite3

    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = dict(db.execute("SELECT name, state_type FROM flow_run").fetchall())
    assert states and "RUNNING" not in states.values(), states
    assert "CRASHED" in states.values(), states
    assert any("Prefect flow run(s) Crashed" in line for line in run.lines)
