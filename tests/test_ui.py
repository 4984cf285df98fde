"""`latentforge ui`: Prefect server, deployments and MLflow UI up on loopback, URLs printed,
and all three gone after one Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid

import pytest
from servers import as_from_terminal, running_ui
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


@pytest.mark.slow
def test_serve_stops_at_once_when_its_server_is_gone(make_project, tmp_path):
    """`latentforge serve` whose Prefect server died: Ctrl-C ends it at once in one line
    (Prefect's own shutdown would retry pausing every deployment for minutes, then print a
    traceback), and the server's loss itself is one WARNING line, no traceback."""
    import subprocess
    import sys

    from servers import api, free_port, stop_group, wait_healthy

    root = make_project(TINY)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    server_log = tmp_path / "server.log"
    with server_log.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    serve = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/api/health", server, server_log, "the Prefect server")
        serve = subprocess.Popen(
            [sys.executable, "-m", "latentforge", "serve"], cwd=root,
            env={**env, "PREFECT_API_URL": f"{url}/api"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=as_from_terminal)
        lines: list[str] = []
        import threading

        threading.Thread(target=lambda: lines.extend(line.rstrip() for line in serve.stdout),
                         daemon=True).start()
        deadline = time.monotonic() + 180
        while len(api(url, "deployments/filter", {})) < 9 or not any(
                "being served" in line for line in lines):
            assert serve.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(1)
        stop_group(server)  # the server goes away
        time.sleep(5)  # long enough for the runner to notice
        sent = time.monotonic()
        os.killpg(serve.pid, signal.SIGINT)
        code = serve.wait(timeout=120)
        seconds = time.monotonic() - sent
        time.sleep(0.5)  # the reader thread's last lines
    finally:
        stop_group(serve)
        stop_group(server)
    print(f"serve stopped {seconds:.1f} s after Ctrl-C")
    out = "\n".join(lines)
    assert code == 130, out[-3000:]
    assert lines[-1] == (f"SIGINT: the Prefect server {url}/api no longer answers; stopped "
                         "without pausing the deployments"), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
