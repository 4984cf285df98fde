"""Child processes that end with their parent: process groups, interrupts and a guard.

`latentforge run` starts `dvc repro` (which starts the stage, which may start Ray) and, when no
Prefect API is configured, a temporary Prefect server. Three rules keep them from outliving it:

- Each child runs in its own session, so a terminal's Ctrl-C reaches `latentforge` alone,
  which stops the children in order: SIGTERM to the stage's process group (the stage ends its
  MLflow run KILLED), SIGKILL to the group after a grace period, then
  the Prefect server last (it must still answer while the flow records its end).
- SIGTERM is handled like Ctrl-C (`install_interrupt_handlers`): `Interrupted`, a
  KeyboardInterrupt, unwinds the stack through every `finally`; the CLI exits 128 + signal.
- A guard process (`python -m latentforge.procs`) holds the read end of a pipe. If
  `latentforge` dies without saying goodbye (SIGKILL, the OOM killer), the pipe closes and the
  guard does the cleanup instead: the registered process groups get SIGTERM, then SIGKILL; the
  registered processes SIGTERM; the invocation's MLflow runs still RUNNING end KILLED.

Every process of one invocation carries `LATENTFORGE_INVOCATION` in its environment and every
MLflow run it opens the tag `latentforge.invocation`, so the guard (and a person) can find them.

`map_processes` runs jobs of one stage side by side in worker processes on this machine
(RL seeds): they share the stage's process group (a stop of the group stops them),
ignore a terminal's Ctrl-C (the stage stops them itself), and end on their own when the stage
dies without stopping them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import IO, Any

log = logging.getLogger(__name__)

INVOCATION_ENV = "LATENTFORGE_INVOCATION"
INVOCATION_TAG = "latentforge.invocation"
GRACE_S = 15.0  # how long a stage gets to end its runs after SIGTERM
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
ORPHAN_POLL_S = 1.0  # how often a worker process checks that its parent is still there
# Thread counts a worker process of map_processes gets in its environment (numpy's BLAS and
# OpenMP read them at start-up; torch's own is set in the worker).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# SIGTERM, not SIGINT, stops children: a process started from a non-interactive shell's
# background job inherits SIGINT ignored (and so do its children), SIGTERM never is.


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: unwinds like KeyboardInterrupt; remembers which signal came."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM, however it arrived: our Interrupted (a KeyboardInterrupt), or the
    TerminationSignal that Prefect's flow engine raises instead while a flow runs."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    signals = sys.modules.get("prefect.exceptions")  # loaded wherever a flow can run
    return signals is not None and isinstance(exc, signals.ExternalSignal)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


# Ctrl-C, `kill`, and a terminal closed under a running command (unless under nohup, which
# ignores SIGHUP: an ignored signal stays ignored).
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_interrupt_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread (no-op elsewhere)."""
    with contextlib.suppress(ValueError):  # not the main thread
        for signum in INTERRUPTS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, _raise_interrupted)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up after the first one (a second Ctrl-C must not
    cut the cleanup short and leave children behind)."""
    saved = {}
    with contextlib.suppress(ValueError):
        for signum in INTERRUPTS:
            saved[signum] = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def invocation_id() -> str:
    """This invocation's id (inherited by every child through the environment)."""
    if not os.environ.get(INVOCATION_ENV):
        os.environ[INVOCATION_ENV] = uuid.uuid4().hex[:12]
    return os.environ[INVOCATION_ENV]


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------


def start_group(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Popen in a new session (its own process group), registered with the guard."""
    proc = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
    guard_send(f"group {proc.pid}")
    return proc


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_members(pgid: int) -> list[tuple[int, float]]:
    """(pid, start time) of the live processes of group `pgid`, the leader's included while
    it lives; zombies (exited, not yet reaped) are not counted."""
    import psutil

    found = []
    for proc in psutil.process_iter(["status", "create_time"]):
        with contextlib.suppress(OSError, psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append((proc.pid, proc.info["create_time"]))
    return found


LEADER_AFTER_S = 3.0  # how long a leader gets to wind up once the rest of its group is gone


def stop_group(proc: subprocess.Popen[Any], grace: float = GRACE_S,
               drain: IO[str] | None = None, on_line: Callable[[str], None] | None = None,
               leader_last: bool = False) -> None:
    """SIGTERM to the group, wait up to `grace` seconds for the leader and the group, then
    SIGKILL what is left. `drain`: the leader's output pipe, read (and passed to `on_line`)
    meanwhile so that the children never block on a full pipe.

    `leader_last`: SIGTERM the leader's children first and let the leader see them end, as
    `dvc repro` must (a dvc killed by SIGTERM leaves its entries in .dvc/tmp/rwlock, and the
    next run warns that a killed process held them); the leader gets SIGTERM too if it is
    still there LEADER_AFTER_S after they are gone, or has no children to wait for."""
    pgid = proc.pid
    signalled: set[tuple[int, float]] = set()

    def term_children() -> bool:
        """SIGTERM the group's members but the leader not signalled yet (those it started
        meanwhile too); True while any live."""
        members = [m for m in _group_members(pgid) if m[0] != pgid]
        for member in members:
            if member not in signalled:
                signalled.add(member)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(member[0], signal.SIGTERM)
        return bool(members)

    leader_signalled = not (leader_last and term_children())
    if leader_signalled:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alone_since: float | None = None
    if drain is not None:
        os.set_blocking(drain.fileno(), False)
    while time.monotonic() < deadline and (proc.poll() is None or group_alive(pgid)):
        if drain is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                for line in drain.readlines():
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
        if not leader_signalled and proc.poll() is None:
            if term_children():
                alone_since = None
            else:
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since >= LEADER_AFTER_S:
                    _signal_group(pgid, signal.SIGTERM)
                    leader_signalled = True
        time.sleep(0.1)
    if proc.poll() is None or group_alive(pgid):
        log.warning("process group %d still running %.0f s after SIGTERM: killing it", pgid, grace)
        _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    guard_send(f"ungroup {pgid}")


# --------------------------------------------------------------------------------------------
# Worker processes on this machine
# --------------------------------------------------------------------------------------------


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class WorkerFailed(RuntimeError):
    """A job of `map_processes` raised (or its process died): names the job and the error."""


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(ORPHAN_POLL_S)
        if os.getppid() != parent:  # re-parented: the stage died without stopping us
            os._exit(1)


def worker_main(job_fd: int, result_fd: int, parent: int, threads: int, log_level: int) -> None:
    """A worker process (`python -m latentforge.procs worker ...`): read one pickled
    (target, args) from `job_fd`, send back ("ok", result) or ("error", line, traceback,
    the exception where it pickles), and exit at once (no interpreter teardown)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the parent stops us
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    logging.basicConfig(level=log_level, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    from latentforge.malloc import tune_malloc

    tune_malloc()
    import torch

    torch.set_num_threads(threads)
    code = 0
    with Connection(job_fd, writable=False) as jobs, Connection(result_fd, readable=False) as out:
        try:
            target, args = pickle.loads(jobs.recv_bytes())
            payload = pickle.dumps(("ok", target(*args)))
        except BaseException as exc:  # everything goes back to the parent, which decides
            code = 1
            line, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
            try:  # the exception itself where it pickles (its type decides the exit code)
                payload = pickle.dumps(("error", line, trace, exc))
                pickle.loads(payload)
            except Exception:
                payload = pickle.dumps(("error", line, trace, None))
        out.send_bytes(payload)
    sys.stderr.flush()
    os._exit(code)


def map_processes(target: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], processes: int,
                  threads: int, names: Sequence[str] | None = None,
                  on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """`[target(*job) for job in jobs]`, each job in a fresh Python process on this machine, at
    most `processes` at once, each with `threads` threads (torch's, and OpenMP/BLAS's through
    the environment); results in job order, and each also to `on_result(i, result)` as soon
    as its job ends.

    `target` must be importable (a module-level function); jobs and results travel pickled, by
    value (a job that does not pickle fails here, before any process starts). A worker imports
    what it needs by this process's sys.path, never this process's __main__ (unlike
    multiprocessing's spawn: a script without a main guard works). The first job to raise
    stops the others; its exception is raised again here (type and message, as if it had run
    in this process, with a note naming the job: `names[i]`, else "job i"), or where it does
    not pickle or the process died, `WorkerFailed` naming the job and the error in one line.
    The child's traceback goes to the debug log. An interrupt here stops every worker before
    it unwinds.
    """
    names = list(names) if names is not None else [f"job {i}" for i in range(len(jobs))]
    payloads = [pickle.dumps((target, tuple(job))) for job in jobs]
    # -P and this sys.path: the worker imports exactly what this process imports (not, say, a
    # `latentforge` folder in the working directory ahead of the installed package).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           **{name: str(threads) for name in THREAD_ENV}}
    level = logging.getLogger().getEffectiveLevel()
    waiting = list(range(len(jobs)))
    running: dict[int, tuple[subprocess.Popen[Any], Connection]] = {}
    results: dict[int, Any] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max(1, processes):
                i = waiting.pop(0)
                running[i] = _start_worker(payloads[i], threads, level, env)
            ready = wait([c for _, c in running.values()])
            for i in [i for i, (_, c) in running.items() if c in ready]:
                proc, conn = running[i]
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):  # it died, before or while sending
                    message = None
                conn.close()
                _reap(proc)
                del running[i]
                if message is None:
                    raise WorkerFailed(f"{names[i]}: its process ended (exit code "
                                       f"{proc.returncode}) before reporting")
                if message[0] == "error":
                    _, line, trace, exc = message
                    log.debug("%s failed in its process:\n%s", names[i], trace)
                    if isinstance(exc, Exception):  # raised again here, as in one process
                        exc.add_note(f"(in the worker process of {names[i]}; its traceback is "
                                     "in the debug log)")
                        log.error("%s failed: %s", names[i], line)
                        raise exc
                    raise WorkerFailed(f"{names[i]}: {line}")
                results[i] = message[1]
                if on_result is not None:
                    on_result(i, results[i])
    finally:
        with interrupts_deferred():  # a second Ctrl-C must not leave workers behind
            _stop_workers([proc for proc, _ in running.values()])
            for _, conn in running.values():
                conn.close()
    return [results[i] for i in range(len(jobs))]


def _start_worker(payload: bytes, threads: int, level: int, env: dict[str, str]
                  ) -> tuple[subprocess.Popen[Any], Connection]:
    job_r, job_w = os.pipe()
    result_r, result_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "latentforge.procs", "worker", str(job_r),
             str(result_w), str(os.getpid()), str(threads), str(level)],
            pass_fds=(job_r, result_w), stdin=subprocess.DEVNULL, env=env)
    except BaseException:
        os.close(job_w)
        os.close(result_r)
        raise
    finally:
        os.close(job_r)
        os.close(result_w)
    # A writer thread: a job larger than the pipe's buffer must not block the loop.
    threading.Thread(target=_send_and_close, args=(job_w, payload), daemon=True).start()
    return proc, Connection(result_r, writable=False)


def _send_and_close(fd: int, payload: bytes) -> None:
    with contextlib.suppress(OSError), Connection(fd, readable=False) as conn:
        conn.send_bytes(payload)


def _reap(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Wait for a worker that has reported (it exits at once), killing it after `grace`."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _stop_workers(workers: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> None:
    """SIGTERM the workers still running, SIGKILL any left after `grace` seconds."""
    for proc in workers:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in workers:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------

_guard: tuple[subprocess.Popen[Any], int] | None = None
_mlflow_targets: set[tuple[str, str]] = set()  # (tracking URI, experiment) this process opened


def start_guard() -> None:
    """Start this process's guard (once). Later `guard_send` calls register what it cleans up."""
    global _guard
    if _guard is not None:
        return
    invocation_id()
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentforge.procs", str(read_fd), str(os.getpid())],
        pass_fds=(read_fd,), start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL)
    os.close(read_fd)
    os.set_inheritable(write_fd, False)
    _guard = (proc, write_fd)


def guard_send(message: str) -> None:
    if _guard is None:
        return
    with contextlib.suppress(OSError):
        os.write(_guard[1], (message + "\n").encode())


def mlflow_watched() -> bool:
    """Whether this process opened (or started stages that open) MLflow runs."""
    return bool(_mlflow_targets)


def watch_mlflow(uri: str, experiment: str) -> None:
    """Runs of this invocation in `experiment` at `uri` end KILLED if it is interrupted or
    killed: `end_invocation_runs` (after an interrupt) or the guard (after SIGKILL) does it."""
    _mlflow_targets.add((uri, experiment))
    guard_send(f"mlflow {uri}\t{experiment}")


@contextlib.contextmanager
def flow_run_watched() -> Iterator[None]:
    """While the body runs, the current Prefect flow run ends Crashed if this process is killed
    (SIGKILL, the out-of-memory killer): the guard tells the API, which otherwise shows the
    run Running for ever. A clean end or an interrupt leaves its state to Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id, api, auth = flow_run.id, "", ""
    if run_id and _guard is not None:
        try:
            with get_client(sync_client=True) as client:  # a temporary server's too
                api = str(client.api_url).rstrip("/")
                http = getattr(client, "_client", None)  # its auth (API key, auth string)
                auth = str(http.headers.get("Authorization", "")) if http is not None else ""
        except Exception:  # a crash mark is a courtesy: never in the way of the flow
            log.debug("no Prefect client for the guard's crash mark", exc_info=True)
            api = ""
    if not api.startswith("http"):
        yield
        return
    entry = f"{api}\t{run_id}\t{auth}"
    guard_send(f"flowrun {entry}")
    try:
        yield
    finally:
        guard_send(f"unflowrun {entry}")


def _crash_flow_runs(flow_runs: Iterable[tuple[str, str, str]], parent: int) -> None:
    """Set each (API URL, flow run id, auth header) Crashed, as Prefect marks a run whose
    process died. Seconds at most: the killed command's children wait meanwhile."""
    import urllib.request

    crashed = 0
    for api, run_id, auth in sorted(flow_runs):
        body = json.dumps({"force": True, "state": {
            "type": "CRASHED", "name": "Crashed",
            "message": f"process {parent} was killed (SIGKILL, or the out-of-memory killer)"}})
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        request = urllib.request.Request(f"{api}/flow_runs/{run_id}/set_state",
                                         data=body.encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=2):
                crashed += 1
        except Exception as exc:  # the guard must finish its other work
            print(f"latentforge guard: could not mark Prefect flow run {run_id} crashed: {exc}",
                  file=sys.stderr)
    if crashed:
        print(f"latentforge guard: set {crashed} Prefect flow run(s) Crashed", file=sys.stderr)


def end_invocation_runs() -> int:
    """After an interrupt, once the children are stopped: end KILLED every MLflow run of this
    invocation still RUNNING (a stage killed after its grace period could not end its own).
    Returns how many it ended."""
    ended = 0
    for uri, experiment in sorted(_mlflow_targets):
        try:
            ended += _end_mlflow_runs(uri, experiment, invocation_id())
        except Exception:  # reported, never in the way of the exit
            log.warning("could not end this command's MLflow runs in %s", uri, exc_info=True)
    return ended


def stop_guard() -> None:
    """A clean exit: the guard leaves everything as it is."""
    global _guard
    if _guard is None:
        return
    proc, fd = _guard
    guard_send("bye")
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    _guard = None


def _guard_cleanup(groups: set[int], pids: set[int], mlflow_targets: set[tuple[str, str]],
                   invocation: str, flow_runs: Iterable[tuple[str, str, str]] = (),
                   parent: int = 0) -> None:
    _crash_flow_runs(flow_runs, parent)  # first: a temporary server is among the groups
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.2)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for uri, experiment in mlflow_targets:
        try:
            if ended := _end_mlflow_runs(uri, experiment, invocation):
                print(f"latentforge guard: ended {ended} MLflow run(s) KILLED", file=sys.stderr)
        except Exception as exc:  # the guard must finish its other work
            print(f"latentforge guard: could not end MLflow runs in {uri}: {exc}",
                  file=sys.stderr)


def end_stage_runs(stage: str, invocation: str,
                   targets: Iterable[tuple[str, str]] = ()) -> int:
    """After `stage`'s process died without ending its MLflow run (SIGKILL, the out-of-memory
    killer): end FAILED its runs of `invocation` still RUNNING, in `targets` ((tracking URI,
    experiment) pairs) and those this process watches. Returns how many it ended."""
    ended = 0
    for uri, experiment in sorted({*targets, *_mlflow_targets}):
        try:
            ended += _end_mlflow_runs(uri, experiment, invocation, "FAILED", stage)
        except Exception:  # reported, never in the way of the stage's own error
            log.warning("could not end stage %s's MLflow runs in %s", stage, uri, exc_info=True)
    return ended


def _end_mlflow_runs(uri: str, experiment: str, invocation: str, status: str = "KILLED",
                     stage: str | None = None) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    only_stage = f" and tags.`latentforge.stage` = '{stage}'" if stage else ""
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}' and attributes.status = "
                      f"'RUNNING'{only_stage}")
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)


def guard_main(read_fd: int, parent: int) -> int:
    """The guard's loop: collect registrations until `bye` (exit quietly) or EOF (clean up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the parent
    invocation = os.environ.get(INVOCATION_ENV, "")
    groups: set[int] = set()
    pids: set[int] = set()
    mlflow_targets: set[tuple[str, str]] = set()
    flow_runs: set[tuple[str, str, str]] = set()
    buffer = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                kind, _, arg = raw.decode().partition(" ")
                if kind == "bye":
                    return 0
                if kind == "group":
                    groups.add(int(arg))
                elif kind == "ungroup":
                    groups.discard(int(arg))
                elif kind == "pid":
                    pids.add(int(arg))
                elif kind == "unpid":
                    pids.discard(int(arg))
                elif kind == "mlflow":
                    uri, _, experiment = arg.partition("\t")
                    mlflow_targets.add((uri, experiment))
                elif kind in ("flowrun", "unflowrun"):
                    api, run_id, auth = (arg.split("\t") + ["", ""])[:3]
                    (flow_runs.add if kind == "flowrun" else flow_runs.discard)(
                        (api, run_id, auth))
    print(f"latentforge guard: process {parent} ended without cleaning up; stopping its "
          f"{len(groups)} process group(s) and {len(pids)} process(es)", file=sys.stderr)
    _guard_cleanup(groups, pids, mlflow_targets, invocation, flow_runs, parent)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker_main(*map(int, sys.argv[2:7]))
    sys.exit(guard_main(int(sys.argv[1]), int(sys.argv[2])))
