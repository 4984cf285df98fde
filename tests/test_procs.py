"""procs.map_processes: jobs side by side in worker processes, and how they end.

The workers are real Python processes (`python -P -m latentforge.procs worker`); the jobs
below are module-level functions, which the workers import by this process's sys.path.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from latentforge import procs


def square_after(x: int, delay: float) -> tuple[int, int, int, float, float, str | None]:
    import torch

    started = time.time()
    time.sleep(delay)
    return (x * x, os.getpid(), torch.get_num_threads(), started, time.time(),
            os.environ.get("OMP_NUM_THREADS"))


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def record_pid_and_sleep(folder: str, name: str) -> None:
    Path(folder, name).write_text(str(os.getpid()))
    time.sleep(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def pids_written(folder: Path, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [f for f in folder.iterdir() if f.read_text()]
        if len(files) >= count:
            return [int(f.read_text()) for f in files]
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not start within {timeout} s")


def test_results_in_job_order_with_the_threads_asked_for():
    # The first job sleeps longest: results still come back in job order (and to on_result
    # as each ends), and at most two processes at a time means the third job ran in a fresh
    # process after one ended.
    ended: list[int] = []
    out = procs.map_processes(square_after, [(2, 3.0), (3, 0.0), (4, 0.0)], processes=2,
                              threads=1, on_result=lambda i, _: ended.append(i))
    assert [r[0] for r in out] == [4, 9, 16]
    assert ended[-1] == 0 and sorted(ended) == [0, 1, 2]
    assert len({r[1] for r in out}) == 3 and os.getpid() not in {r[1] for r in out}
    assert all(r[2] == 1 and r[5] == "1" for r in out)
    first, second, third = out
    assert second[3] < first[4], "the first two jobs did not run side by side"
    assert third[3] >= min(first[4], second[4]), "a third process ran beside the first two"


def sleep_or_fail(kind: str, folder: str, what: str) -> None:
    """One module-level target for two kinds of job: the failing one waits until the sleeping
    one has started, so that the test can see the sleeper stopped."""
    if kind == "sleep":
        record_pid_and_sleep(folder, what)
    pids_written(Path(folder), 1)
    fail(what)


def test_a_failing_job_names_itself_and_stops_the_others(tmp_path):
    # The job's own exception, as if it had run here (so that its type decides the exit code),
    # with a note naming the job.
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^bad reward\n") as raised:
        procs.map_processes(sleep_or_fail, [("sleep", str(tmp_path), "a"),
                                            ("fail", str(tmp_path), "bad reward")],
                            processes=2, threads=1, names=["seed 0", "seed 1"])
    assert "worker process of seed 1" in raised.value.__notes__[0]
    # The sleeping job was stopped when the other failed, not left running for 120 s.
    assert time.monotonic() - started < 60
    assert wait_gone([int((tmp_path / "a").read_text())], 1) == []


def test_a_process_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(procs.WorkerFailed, match=r"job 0: its process ended \(exit code 3\)"):
        procs.map_processes(die, [()], processes=1, threads=1)


def test_an_interrupt_stops_every_worker(tmp_path):
    def interrupt_when_started() -> None:
        pids_written(tmp_path, 2)
        os.kill(os.getpid(), signal.SIGINT)

    # A background job of a non-interactive shell (CI, nohup) starts with SIGINT ignored.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        threading.Thread(target=interrupt_when_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            procs.map_processes(record_pid_and_sleep,
                                [(str(tmp_path), "a"), (str(tmp_path), "b")],
                                processes=2, threads=1)
    finally:
        signal.signal(signal.SIGINT, saved)
    assert time.monotonic() - started < 60  # not after the jobs' 120 s
    pids = [int(f.read_text()) for f in tmp_path.iterdir()]
    assert len(pids) == 2 and wait_gone(pids, 1) == []  # stopped before the call returned


SLEEPERS = """
import signal, sys
sys.path[:0] = {path!r}
signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, whoever started us
from latentforge import procs
from test_procs import record_pid_and_sleep
procs.map_processes(record_pid_and_sleep, [({folder!r}, "a"), ({folder!r}, "b")], 2, 1)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_ends_parent_and_workers(tmp_path, signum):
    # How `latentforge run` stops a stage (SIGTERM to its group), and a terminal's Ctrl-C
    # (SIGINT to the foreground group): the workers share the group, ignore SIGINT and are
    # stopped by the parent; nothing outlives the signal.
    script = SLEEPERS.format(path=[str(Path(__file__).parent)], folder=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        pids = pids_written(tmp_path, 2)
        os.killpg(parent.pid, signum)
        assert parent.wait(30) != 0
        assert wait_gone(pids, 10) == [], f"workers outlived {signal.Signals(signum).name}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def test_workers_end_when_their_parent_is_killed(tmp_path):
    # The parent dies by SIGKILL (no chance to stop anyone); its workers notice within about
    # procs.ORPHAN_POLL_S and end instead of running on.
    script = SLEEPERS.format(path=[str(Path(__file__).parent)], folder=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        pids = pids_written(tmp_path, 2)
        parent.kill()
        parent.wait(10)
        assert wait_gone(pids, 10) == [], "workers outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for f in tmp_path.iterdir():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(f.read_text()), signal.SIGKILL)


def test_worker_imports_what_the_parent_imports_not_the_working_directory(tmp_path,
                                                                          monkeypatch):
    # A `latentforge` folder in the working directory (an old copy of the code, say) must not
    # shadow the package this process runs.
    (tmp_path / "latentforge").mkdir()
    (tmp_path / "latentforge/__init__.py").write_text("raise ImportError('wrong copy')\n")
    monkeypatch.chdir(tmp_path)
    assert procs.map_processes(square_after, [(5, 0.0)], processes=1, threads=1)[0][0] == 25


def test_a_job_that_does_not_pickle_fails_before_any_process_starts():
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        procs.map_processes(square_after, [(2, 0.0), (lambda: 0, 0.0)], processes=2, threads=1)


def test_a_closed_terminal_interrupts_like_sigterm_unless_under_nohup():
    """SIGHUP (the terminal closed) killed `latentforge stage --no-dvc` outright, leaving its
    MLflow run RUNNING; now it unwinds like SIGTERM (exit 129). nohup's ignore stays."""
    from latentforge import procs

    saved = {signum: signal.getsignal(signum) for signum in procs.INTERRUPTS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (the suite may run under nohup)
        procs.install_interrupt_handlers()
        with pytest.raises(procs.Interrupted) as err:
            os.kill(os.getpid(), signal.SIGHUP)
        assert err.value.signum == signal.SIGHUP
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        procs.install_interrupt_handlers()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("leader_last", [True, False])
def test_stopping_dvc_repro_leaves_its_rwlock_clean(tmp_path, leader_last):
    """A `dvc repro` killed by SIGTERM with its stage left its entries in .dvc/tmp/rwlock,
    and every later run warned that a killed process had held them. Stopped stage first,
    dvc sees the stage fail and releases them (the False case shows what SIGTERM to the
    whole group leaves: the test can tell the two apart)."""
    import json

    root = tmp_path / "repo"
    root.mkdir()
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    (root / "dvc.yaml").write_text(
        f"stages:\n  slow:\n    cmd: {shlex.quote(sys.executable)} -c \"import time; "
        "open('started', 'w'); time.sleep(120)\"\n    outs: [out.txt]\n")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "slow"], cwd=root,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (root / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        rwlock = root / ".dvc" / "tmp" / "rwlock"
        assert json.loads(rwlock.read_text())["write"], "dvc holds no lock while the stage runs"
        started = time.monotonic()
        procs.stop_group(proc, grace=30, drain=proc.stdout, leader_last=leader_last)
        print(f"leader_last={leader_last}: stopped in {time.monotonic() - started:.1f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    held = json.loads(rwlock.read_text())
    if leader_last:
        assert not any(held.values()), held  # dvc released its read and write entries
    else:
        assert held["write"], held
