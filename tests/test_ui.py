"""`latentforge ui`: Prefect server, deployments and MLflow UI up on loopback, URLs printed,
and all three gone after one Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid

from servers import running_ui
from test_pipeline import TINY
from test_signals import is_loopback, marked_processes

from latentforge import procs


def test_ui_starts_three_services_on_loopback_and_ctrl_c_stops_them(make_project, tmp_path):
    import psutil

    root = make_project(TINY)
    token = uuid.uuid4().hex[:12]
    with running_ui(root, tmp_path, {procs.INVOCATION_ENV: token}) as (prefect, mlflow, lines,
                                                                         proc):
        assert any(prefect in line for line in lines)
        assert any(f"{mlflow}/#/experiments?workflowType=machine_learning" in line
                   for line in lines)
        with urllib.request.urlopen(f"{mlflow}/health", timeout=10) as r:
            assert r.status == 200

        pids = marked_processes(token)
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        ports = {int(url.rsplit(":", 1)[1]) for url in (prefect, mlflow)}
        assert ports <= {port for _, port in listening}, listening
        assert all(is_loopback(ip) for ip, _ in listening), listening

        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - sent
    gone = time.monotonic()
    while marked_processes(token) and time.monotonic() - gone < 30:
        time.sleep(0.2)
    print(f"ui stopped {seconds:.1f} s after Ctrl-C")
    assert code == 0, "\n".join(lines[-30:])
    assert lines[-1] == "stopped", "\n".join(lines[-30:])
    assert not marked_processes(token), marked_processes(token)
    assert "Traceback" not in "\n".join(lines), "\n".join(lines[-60:])
