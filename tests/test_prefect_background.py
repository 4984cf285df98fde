"""The background Prefect server (latentforge/prefectbg.py) and the no-op run (latentforge/noop.py).

A real `prefect server start` in a temporary PREFECT_HOME: started by one command, reused by the
next, outliving both, stopped by `latentforge server stop`; stale records set aside. The no-op
run answers from one DVC status and still leaves its flow run in the Prefect API.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latentforge import noop, paths, prefectbg
from latentforge.errors import LatentForgeError


@pytest.fixture
def prefect_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "prefect_home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv(prefectbg.MODE_ENV, "background")
    yield home
    prefectbg.stop()  # whatever a failing test left running


def lf(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "latentforge", *args], cwd=root,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)
    return proc


def test_configured_api_url_follows_prefects_own_resolution(prefect_home, monkeypatch):
    assert prefectbg.configured_api_url() is None
    (prefect_home / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
        '[profiles.other]\nPREFECT_API_URL = "http://127.0.0.1:8/api"\n')
    assert prefectbg.configured_api_url() == "http://127.0.0.1:9/api"
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    ours = prefectbg.configured_api_url()
    theirs = subprocess.run(
        [sys.executable, "-c", "from prefect.settings import PREFECT_API_URL; "
         "print(PREFECT_API_URL.value())"], capture_output=True, text=True, check=True,
        env=os.environ).stdout.strip()
    assert ours == theirs == "http://127.0.0.1:8/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:7/api")
    assert prefectbg.configured_api_url() == "http://127.0.0.1:7/api"


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(prefectbg.MODE_ENV, "forever")
    with pytest.raises(LatentForgeError, match="LATENTFORGE_PREFECT_SERVER='forever'.*background"):
        prefectbg.mode()


def test_stale_records_are_set_aside_not_trusted(prefect_home):
    record = prefectbg.record_file()
    record.write_text("{not json")
    assert prefectbg.running() is None
    assert not record.exists() and len(list(prefect_home.glob("latentforge-server.json.stale-*"))) == 1

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    record.write_text(json.dumps({"pid": int(dead), "port": 9, "prefect_version": "3.9.1",
                                  "python": sys.executable, "started": 0.0, "log": "x"}))
    assert prefectbg.running() is None
    assert not record.exists() and len(list(prefect_home.glob("latentforge-server.json.stale-*"))) >= 1


def test_a_record_whose_pid_is_another_program_now_is_never_signalled(prefect_home):
    """The record outlives reboots and crashes; its pid may lead someone's shell or session
    by now. `server stop` and `status` set the record aside and leave that process alone."""
    import time

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group leader
    try:
        record = prefectbg.record_file()
        for started in (time.time() - 3600, time.time() + 3600):  # whatever the record says
            record.write_text(json.dumps({"pid": other.pid, "port": 4200,
                                          "prefect_version": "3.9.1", "python": sys.executable,
                                          "started": started, "log": "x"}))
            assert prefectbg.stop() is None
            assert other.poll() is None, "an unrelated process group was signalled"
            assert not record.exists()
        record.write_text(json.dumps({"pid": other.pid, "port": 4200, "prefect_version": "3.9.1",
                                      "python": sys.executable, "started": time.time(),
                                      "log": "x"}))
        assert prefectbg.running() is None and other.poll() is None and not record.exists()
    finally:
        other.kill()
        other.wait()


# A stand-in for an old or busy `prefect server start` on PORT: the record checks see its
# command line; it answers /health after DELAY seconds (never, when DELAY is negative).
_FAKE_SERVER = """
import http.server, sys, time
port, delay = int(sys.argv[-1]), float(sys.argv[1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(delay)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
if delay < 0:
    time.sleep(120)
else:
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _fake_server(delay: float, python: str = sys.executable, version: str | None = None) -> int:
    """Start the stand-in as a real background server runs: in its own session and not a child
    of this process (a child, never reaped, would still look alive); record it; its pid."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    starter = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], "
               "start_new_session=True, stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL).pid)")
    pid = int(subprocess.run([sys.executable, "-c", starter, sys.executable, "-c", _FAKE_SERVER,
                              str(delay), "prefect", "server", "start", "--port", str(port)],
                             capture_output=True, text=True, check=True).stdout)
    deadline = time.monotonic() + 20
    while delay >= 0 and time.monotonic() < deadline:  # listening (the answer may be slow)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    prefectbg.record_file().write_text(json.dumps(
        {"pid": pid, "port": port, "prefect_version": version or prefectbg.prefect_version(),
         "python": python, "started": time.time(), "log": "x"}))
    return pid


def _alive(pid: int, within: float = 0.0) -> bool:
    """Whether `pid` still runs (after waiting up to `within` seconds for it to end)."""
    import time

    import psutil

    deadline = time.monotonic() + within
    while True:
        try:
            running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            running = False
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


@pytest.fixture
def fakes():
    """The stand-ins a test started, killed at its end whatever happened."""
    import signal

    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_slow_server_is_waited_for_and_a_dead_one_replaced_never_orphaned(prefect_home,
                                                                           monkeypatch, fakes):
    """A recorded server that answers late (a busy machine) is reused, not duplicated; one that
    never answers is stopped before another starts, so none runs on unrecorded (holding the port
    and showing a UI without the new runs)."""
    fakes.append(slow := _fake_server(delay=3.0))
    assert prefectbg.running() is None  # the quick look gives up after 2 s ...
    found = prefectbg._reusable_or_cleared()  # ... the starter waits longer
    assert found is not None and found.pid == slow and _alive(slow)
    os.killpg(slow, 9)

    monkeypatch.setattr(prefectbg, "UNRESPONSIVE_WAIT_S", 0.5)
    fakes.append(busy := _fake_server(delay=5.0))  # accepts, answers too late: maybe serving
    with pytest.raises(prefectbg.BusyServer, match="did not answer /health within 0 s"):
        prefectbg.start()                            # another run, so never stopped
    assert _alive(busy) and prefectbg.record_file().exists()
    os.killpg(busy, 9)

    fakes.append(silent := _fake_server(delay=-1))  # alive but no longer listening: broken
    assert prefectbg._reusable_or_cleared() is None
    assert not _alive(silent, within=10), "the unanswering server was left running"
    assert not prefectbg.record_file().exists()


@pytest.mark.slow  # a real server start or two (~15-45 s): CI's test-infra runs it
def test_another_prefect_version_is_replaced_here_and_left_alone_elsewhere(prefect_home,
                                                                         tmp_path, fakes):
    """An upgrade in this environment: the old version's server is stopped. Another
    environment's server (another Python) is not ours: left running, its record kept, and the
    command takes a temporary server (the no-op path steps aside for it)."""
    from latentforge import noop

    fakes.append(old := _fake_server(delay=0.0, version="0.0.1"))
    assert prefectbg.unusable().pid == old
    status = lf(tmp_path, "server", "status")
    assert status.returncode == 3 and "Prefect 0.0.1" in status.stdout, status.stdout
    assert prefectbg._reusable_or_cleared() is None
    assert not _alive(old, within=10) and not prefectbg.record_file().exists()

    # its environment was deleted since: nobody else can own it
    fakes.append(gone := _fake_server(delay=0.0, version="0.0.1",
                                      python=str(tmp_path / "gone/bin/python")))
    assert prefectbg._reusable_or_cleared() is None and not _alive(gone, within=10)

    fakes.append(other := _fake_server(delay=0.0, version="0.0.1", python="/bin/sh"))
    before = prefectbg.record_file().read_text()
    with pytest.raises(prefectbg.ForeignServer,
                       match=r"Prefect 0\.0\.1 from another environment \(/bin/sh\)"):
        prefectbg.start()
    assert _alive(other) and prefectbg.record_file().read_text() == before
    assert noop.api_url() is None
    # a command here: a temporary server of its own, saying why, which stops with it
    probe = ("from prefect.client.orchestration import get_client\n"
             "from latentforge import prefectserver\n"
             "with prefectserver.api_server(), get_client(sync_client=True) as client:\n"
             "    print(str(client.api_url).rstrip('/'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = proc.stdout.strip().splitlines()[-1]
    assert f":{json.loads(before)['port']}/" not in url and not prefectbg.healthy(url)
    assert "this command uses a temporary Prefect server" in proc.stderr
    assert _alive(other) and prefectbg.record_file().read_text() == before


@pytest.mark.slow  # a real server start or two (~15-45 s): CI's test-infra runs it
def test_a_damaged_server_database_is_set_aside_and_a_fresh_one_started(prefect_home):
    """A full disk or a crash can leave prefect.db damaged: the server then exits at start-up,
    and every command (no-op runs too) failed until someone moved the file by hand."""
    (prefect_home / "prefect.db").write_bytes(b"not a database " * 1000)
    record = prefectbg.start()
    assert prefectbg.healthy(record.api_url)
    (aside,) = prefect_home.glob("prefect.db.damaged-*[0-9]")
    assert aside.read_bytes().startswith(b"not a database ")  # kept, for whoever wants it
    assert (prefect_home / "prefect.db").is_file()


@pytest.mark.slow  # a real server start or two (~15-45 s): CI's test-infra runs it
def test_ctrl_c_while_the_server_starts_leaves_no_server_running(prefect_home, tmp_path):
    """The first run spends seconds starting the server, when a user may well press Ctrl-C: the
    half-started server kept running, unrecorded (`server status` said none ran, and the next
    command started a second one on the same database)."""
    import signal
    import time

    import psutil

    def servers() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if (p.info["cmdline"] or [])[-6:-3] == ["server", "start", "--host"] and \
                        p.environ().get("PREFECT_HOME") == str(prefect_home):
                    found.append(p)
        return found

    from servers import as_from_terminal

    proc = subprocess.Popen([sys.executable, "-m", "latentforge", "server", "start"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=as_from_terminal)
    deadline = time.monotonic() + 60
    while not servers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers(), "the server never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not servers() or not any(_alive(p.pid, within=15) for p in servers()), err
    assert prefectbg.read_record() is None


@pytest.mark.slow  # a real server start or two (~15-45 s): CI's test-infra runs it
def test_server_stop_refuses_while_a_run_uses_the_server(prefect_home, tmp_path):
    """Stopped under a running stage, the server left the run retrying its API for minutes and
    then failing in some 200 lines of tracebacks, its stage's work done but unrecorded."""
    import httpx

    from latentforge.prefectserver import describe_api_error

    record = prefectbg.start()
    user = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom latentforge import prefectserver\n"
         "with prefectserver.api_server():\n    print('using', flush=True)\n"
         "    time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None and user.stdout.readline().strip() == "using"
        stop = lf(tmp_path, "server", "stop")
        assert stop.returncode == 1, stop.stderr
        assert f"is in use by 1 process(es) (pid {user.pid}: " in stop.stderr
        assert "latentforge server stop --force" in stop.stderr
        assert prefectbg.healthy(record.api_url)
        forced = lf(tmp_path, "server", "stop", "--force")
        assert forced.returncode == 0 and "stopped the Prefect server" in forced.stdout
        assert not _alive(record.pid, within=15)
    finally:
        user.kill()
        user.wait()
    # a user that is gone (killed: no clean-up) does not count
    assert prefectbg.users() == [] and not any((prefect_home / "latentforge-users").iterdir())
    # A run that loses its API anyway (a crash) ends in one line saying what happened.
    with pytest.raises(httpx.TransportError) as lost:
        httpx.get(record.api_url + "/health", timeout=2)
    line = describe_api_error(lost.value)
    assert line is not None and line.startswith(
        f"the Prefect API at http://127.0.0.1:{record.port} stopped answering during the run "
        "(ConnectError: ")
    assert describe_api_error(ValueError("x")) is None


def test_noop_falls_back_when_the_api_refuses(make_project, monkeypatch, prefect_harness):
    """An up-to-date project, but the configured API is gone: no record, the full path decides."""
    from conftest import REPO  # noqa: F401

    root = make_project({"prepare": {"max_images": 50, "resolution": 8}})
    monkeypatch.chdir(root)
    assert subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "prepare"], cwd=root,
                          capture_output=True).returncode == 0
    from latentforge import dvcops

    status = dvcops.graph_status()
    assert status.order[:3] == ["prepare", "judge", "tokenizer"]
    assert len(status.order) == len(paths.STAGES)
    assert "prepare" not in status.changed and {"judge", "evaluate"} <= status.changed
    assert status.upstream["prepare"] == frozenset()
    assert status.upstream["cache"] >= {"prepare", "tokenizer"}
    assert status.clean("prepare") and not status.clean("judge")
    assert status.clean("prepare", ran={"prepare"})  # its own run is not upstream of it
    two = dvcops.GraphStatus(["a", "b"], {"a": frozenset(), "b": frozenset({"a"})}, frozenset())
    assert two.clean("b") and not two.clean("b", ran={"a"})  # an upstream stage ran
    with dvcops.known_status(status):  # handed over once, then looked up afresh
        assert dvcops.graph_status() is status
        assert dvcops.graph_status() is not status

    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    records = noop.try_noop(["prepare"])
    assert records is not None and records[0]["status"] == "skipped"
    assert records[0]["metrics"]["train_images"] + records[0]["metrics"]["val_images"] == 50
    assert noop.try_noop(["judge"]) is None  # judge has not run: not a no-op
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # discard port: refused
    assert noop.try_noop(["prepare"]) is None


def test_background_server_started_once_reused_and_stopped(make_project, prefect_home):
    root = make_project({"prepare": {"max_images": 50, "resolution": 8}})
    first = lf(root, "stage", "prepare")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "started a Prefect server in the background" in first.stderr
    record = prefectbg.running()
    assert record is not None, "the server did not outlive the command that started it"
    assert prefectbg.healthy(record.api_url)

    # the next command finds it: no start, and (up to date) the no-op path records the run there
    second = lf(root, "stage", "prepare")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "started a Prefect server" not in second.stderr
    assert re.search(r"prepare\s+skipped", second.stdout)
    flow_run = re.search(r"nothing ran: every stage is up to date \(Prefect flow run (\S+)\)",
                         second.stderr).group(1)
    assert prefectbg.running().pid == record.pid

    import urllib.request

    def api(path: str, body: dict) -> list:
        request = urllib.request.Request(f"{record.api_url}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    runs = api("/flow_runs/filter", {"flow_runs": {"name": {"any_": [flow_run]}}})
    assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED"
    assert "no-op" in runs[0]["tags"]
    ran = api("/flow_runs/filter", {})
    assert len(ran) == 2  # the first command's flow run is in the same server's history
    artifacts = api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    assert artifacts[0]["key"] == "prepare-summary" and "skipped" in artifacts[0]["data"]

    status = lf(root, "server", "status")
    assert status.returncode == 0 and record.ui_url in status.stdout
    stop = lf(root, "server", "stop")
    assert stop.returncode == 0 and f"pid {record.pid}" in stop.stdout
    assert prefectbg.running() is None and not prefectbg.healthy(record.api_url)
    assert lf(root, "server", "status").returncode == 3
