"""`latentforge ui`: Prefect server, deployments and MLflow UI up on loopback, URLs printed,
and all three gone after one Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

from servers import free_port
from test_pipeline import TINY
from test_signals import is_loopback, marked_processes

from latentforge import paths, procs


def test_ui_starts_three_services_on_loopback_and_ctrl_c_stops_them(make_project, tmp_path):
    import psutil

    root = make_project(TINY)
    prefect_port, mlflow_port = free_port(), free_port()
    token = uuid.uuid4().hex[:12]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_API") and k != "MLFLOW_TRACKING_URI"}
    env.update({procs.INVOCATION_ENV: token, "PREFECT_HOME": str(tmp_path / "prefect"),
                "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentforge", "ui", "--prefect-port", str(prefect_port),
         "--mlflow-port", str(mlflow_port)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout),
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        api = f"http://127.0.0.1:{prefect_port}/api"
        names: list[str] = []
        while time.monotonic() < deadline and len(names) < len(paths.STAGES) + 2:
            assert proc.poll() is None, "\n".join(lines[-40:])
            time.sleep(1)
            if not any(line.startswith("MLflow UI") for line in lines):
                continue
            request = urllib.request.Request(f"{api}/deployments/filter", data=b"{}",
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                names = [d["flow_id"] for d in json.load(answer)]
        assert len(names) == len(paths.STAGES) + 2, "\n".join(lines[-40:])
        assert any(f"http://127.0.0.1:{prefect_port}" in line for line in lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=10) as r:
            assert r.status == 200

        pids = marked_processes(token)
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert {prefect_port, mlflow_port} <= {port for _, port in listening}, listening
        assert all(is_loopback(ip) for ip, _ in listening), listening

        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    gone = time.monotonic()
    while marked_processes(token) and time.monotonic() - gone < 30:
        time.sleep(0.2)
    print(f"ui stopped {seconds:.1f} s after Ctrl-C")
    assert code == 0, "\n".join(lines[-30:])
    assert lines[-1] == "stopped", "\n".join(lines[-30:])
    assert not marked_processes(token), marked_processes(token)
    assert "Traceback" not in "\n".join(lines), "\n".join(lines[-60:])
