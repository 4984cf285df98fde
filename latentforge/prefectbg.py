"""The background Prefect server that `latentforge run` starts once and every later command reuses.

Prefect's temporary server costs a `latentforge run` 4-13 s of start-up and leaves no UI behind.
Instead, the first command that needs an API starts `prefect server start` on 127.0.0.1 in its
own session (it outlives the command, as a database server would), writes where it listens to
`$PREFECT_HOME/latentforge-server.json`, and later commands find it there and connect at once.
Its UI (the same port) shows every run. `latentforge server status|start|stop` manage it;
`LATENTFORGE_PREFECT_SERVER=temporary` brings back a server per command; a PREFECT_API_URL the
user configured (environment or active Prefect profile) always wins.

Everything here avoids importing prefect (2+ s): the no-op `latentforge run` depends on it.
A record that is unreadable or names a dead process is set aside (never trusted, never fatal),
and a fresh server starts. A recorded server that is alive but cannot be reused is never left
running unrecorded (it would hold port 4200 and show a UI without the new runs):
- one that no longer listens on its port is stopped and replaced; one that accepts connections
  but does not answer /health within UNRESPONSIVE_WAIT_S (busy: it may be serving another
  workspace's run) is left alone, and the command uses a temporary server (BusyServer);
- one of another Prefect version started from this Python (an upgrade since) is stopped and
  replaced;
- one started from another Python environment sharing this PREFECT_HOME is left alone, and the
  command uses a temporary server of its own (ForeignServer), with a warning saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import cast

from latentforge import storage
from latentforge.errors import LatentForgeError

log = logging.getLogger(__name__)

MODE_ENV = "LATENTFORGE_PREFECT_SERVER"  # background (default) | temporary
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 2.0
UNRESPONSIVE_WAIT_S = 15.0  # a busy 2-core machine can keep a healthy server from answering
STOP_GRACE_S = 20.0


class ServerUnavailable(LatentForgeError):
    """The recorded background server is alive but not to be used, nor stopped, by this
    command: callers fall back to a temporary server."""


class ForeignServer(ServerUnavailable):
    """It runs another Prefect version from another Python environment: not ours."""


class BusyServer(ServerUnavailable):
    """It accepts connections but did not answer /health in time: busy (it may be serving
    another workspace's pipeline), so it is neither reused now nor stopped."""


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    port: int
    prefect_version: str
    python: str
    started: float
    log: str

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it by default (its database lives there)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def record_file() -> Path:
    return prefect_home() / "latentforge-server.json"


def mode() -> str:
    value = os.environ.get(MODE_ENV, "background").strip().lower() or "background"
    if value not in ("background", "temporary"):
        raise LatentForgeError(f"{MODE_ENV}={value!r}: expected 'background' (one Prefect "
                               "server started once and reused) or 'temporary' (one per command)")
    return value


def configured_api_url() -> str | None:
    """The PREFECT_API_URL the user configured, from the environment or the active profile in
    $PREFECT_HOME/profiles.toml, read without importing prefect (Prefect's own order: the
    environment first, then the profile named by PREFECT_PROFILE or `active`)."""
    return configured("PREFECT_API_URL")


def configured(setting: str) -> str | None:
    """A Prefect setting as configured_api_url reads PREFECT_API_URL."""
    if os.environ.get(setting):
        return os.environ[setting]
    path = prefect_home() / "profiles.toml"
    try:
        profiles = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.debug("cannot read %s (%s): Prefect's own resolution decides", path, exc)
        return None
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = (profiles.get("profiles", {}).get(name) or {}).get(setting)
    return str(value) if value else None


def prefect_version() -> str:
    return metadata.version("prefect")


def _is_recorded_server(record: ServerRecord) -> bool:
    """Whether `record.pid` is still the server the record describes: a `prefect server start`
    on its port that began no later than the record was written. The record outlives reboots
    and crashes, and its pid may since belong to anything (a shell leads its own process
    group): nothing but the recorded server is ever signalled."""
    import psutil

    try:
        proc = psutil.Process(record.pid)
        cmdline, created = proc.cmdline(), proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False  # gone, or another user's process: not ours either way
    return ("prefect" in " ".join(cmdline) and {"server", "start"} <= set(cmdline)
            and str(record.port) in cmdline and created <= record.started + 1.0)


def healthy(api_url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    with contextlib.suppress(OSError, ValueError), \
            urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as answer:  # noqa: S310
        return answer.status == 200
    return False


def _set_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.stale-{int(time.time())}")
    with contextlib.suppress(OSError):
        path.replace(aside)
        log.warning("set aside the background Prefect server record %s (%s) as %s", path, why,
                    aside.name)


def read_record() -> ServerRecord | None:
    path = record_file()
    try:
        data = json.loads(path.read_text())
        return ServerRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        _set_aside(path, f"unreadable: {exc}")
        return None


def _live_record() -> ServerRecord | None:
    """The record when its server process still runs; a stale record is set aside."""
    record = read_record()
    if record is not None and not _is_recorded_server(record):
        _set_aside(record_file(), f"its process {record.pid} is gone, or is another program")
        return None
    return record


def running() -> ServerRecord | None:
    """The recorded background server when it is alive, answers /health and runs this Prefect
    version; None otherwise (a stale record is set aside)."""
    record = _live_record()
    if record is None or record.prefect_version != prefect_version():
        return None  # another version: start() decides (replace it, or leave it alone)
    return record if healthy(record.api_url) else None


def unusable() -> ServerRecord | None:
    """The recorded server when it is alive but runs another Prefect version (which `running`
    does not reuse); None otherwise."""
    record = _live_record()
    return record if record is not None and record.prefect_version != prefect_version() else None


def _accepts(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(HEALTH_TIMEOUT_S)
        return sock.connect_ex((HOST, port)) == 0


def _same_environment(record: ServerRecord) -> bool:
    """Whether the record's server was started from this Python environment (or from one that
    no longer exists): then a version change means an upgrade since, and nobody else owns it."""
    if record.python == sys.executable:
        return True
    return not Path(record.python).exists()


def _reusable_or_cleared() -> ServerRecord | None:
    """The recorded server if it can be reused; otherwise None, after stopping a recorded server
    that is ours but unusable (under the start lock, so no second server ever goes unrecorded):
    one that no longer listens, or an older version from this environment. Raises
    ForeignServer for another environment's server of another Prefect version, BusyServer for
    one that accepts connections but answers too slowly (it may be serving another run)."""
    record = _live_record()
    if record is None:
        return None
    version = prefect_version()
    if record.prefect_version == version:
        if healthy(record.api_url, timeout=UNRESPONSIVE_WAIT_S):
            return record
        if _accepts(record.port):
            raise BusyServer(
                f"the background Prefect server (pid {record.pid}, {record.ui_url}) accepts "
                f"connections but did not answer /health within {UNRESPONSIVE_WAIT_S:.0f} s "
                f"(busy): not reused now and not stopped (`latentforge server stop` stops it)")
        why = f"no longer listens on port {record.port}"
    elif _same_environment(record):
        why = f"runs Prefect {record.prefect_version}, this environment now has {version}"
    else:
        raise ForeignServer(
            f"the background Prefect server (pid {record.pid}, {record.ui_url}) runs Prefect "
            f"{record.prefect_version} from another environment ({record.python}), this is "
            f"{version}: not reused and not stopped (that environment's `latentforge server "
            f"stop` stops it; or give each environment its own PREFECT_HOME)")
    log.warning("the background Prefect server (pid %d) %s: stopping it and starting a fresh "
                "one", record.pid, why)
    _kill_group(record.pid)
    with contextlib.suppress(FileNotFoundError):
        record_file().unlink()
    return None


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise LatentForgeError(f"no free TCP port on {HOST} for a Prefect server")


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """One starter at a time: two commands started together share one server."""
    prefect_home().mkdir(parents=True, exist_ok=True)
    with open(prefect_home() / "latentforge-server.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start(port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S) -> ServerRecord:
    """Start the background server (or return the one already running) and wait for /health.
    Raises ServerUnavailable when the recorded server is alive but not ours to use or stop.
    A server that fails to start on a damaged database (a full disk, a crash mid-write) gets a
    fresh one, the damaged file set aside beside it; only the UI's run history is lost."""
    with _start_lock():
        found = _reusable_or_cleared()
        if found is not None:
            return found
        port = _free_port(port)
        try:
            return _launch(port, timeout)
        except _DamagedDatabase as damaged:
            aside = damaged.path.with_name(f"{damaged.path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{damaged.path}{suffix}").replace(f"{aside}{suffix}")
            log.warning("the Prefect server's database %s is damaged (%s): set aside as %s, and "
                        "the server starts on a new one (earlier flow runs are not in the UI)",
                        damaged.path, damaged.reason, aside.name)
        try:
            return _launch(port, timeout)
        except _DamagedDatabase as again:  # a new database damaged at once: a full disk?
            raise LatentForgeError(f"the background Prefect server's new database {again.path} "
                                   f"is damaged too ({again.reason}): is its disk full? see "
                                   f"{prefect_home() / 'latentforge-server.log'}") from None


class _DamagedDatabase(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


def default_database() -> Path | None:
    """The server's SQLite file where no other database is configured, else None."""
    if any(configured(f"PREFECT_{scope}_DATABASE_CONNECTION_URL") for scope in ("API", "SERVER")):
        return None
    return prefect_home() / "prefect.db"


def _damage(database: Path | None) -> str | None:
    """SQLite's reason where `database` is damaged (not where it is merely missing)."""
    import sqlite3

    if database is None or not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=1)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:  # damage only: not a lock, not a permission
        corrupt = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
        return str(exc) if getattr(exc, "sqlite_errorcode", None) in corrupt else None
    return None if found == "ok" else str(found)


def _launch(port: int, timeout: float) -> ServerRecord:
    """Start `prefect server start` and wait for /health; the process is stopped again where
    it does not get there (an error, the timeout, or Ctrl-C meanwhile: a server nobody
    recorded must not keep running)."""
    home = prefect_home()
    log_path = home / "latentforge-server.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED":
           os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as out:
        # Its own session: a terminal's Ctrl-C and the guard of the command that started it
        # leave it alone; `latentforge server stop` ends its whole group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
             "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env=env, start_new_session=True, cwd=home)
    record = ServerRecord(pid=proc.pid, port=port, prefect_version=prefect_version(),
                          python=sys.executable, started=time.time(), log=str(log_path))
    deadline = time.monotonic() + timeout
    try:
        while not healthy(record.api_url):
            if proc.poll() is not None:
                reason = _damage(default_database())
                if reason is not None:
                    raise _DamagedDatabase(cast(Path, default_database()), reason)
                raise LatentForgeError(f"the background Prefect server exited with code "
                                       f"{proc.returncode} while starting; see {log_path}")
            if time.monotonic() > deadline:
                raise LatentForgeError(f"the background Prefect server did not answer "
                                       f"{record.api_url}/health within {timeout:.0f} s; see "
                                       f"{log_path}")
            time.sleep(0.25)
    except BaseException:
        from latentforge import procs

        with procs.interrupts_deferred():
            _kill_group(proc.pid)
        raise
    tmp = record_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(record_file())
    return record


def _kill_group(pid: int, grace: float = STOP_GRACE_S) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _users_dir() -> Path:
    return prefect_home() / "latentforge-users"


@contextlib.contextmanager
def in_use() -> Iterator[None]:
    """While the body runs, this process counts as using the background server (`users`): a
    file named by its pid, holding its start time (a reused pid is not mistaken for it)."""
    import psutil

    folder = _users_dir()
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / str(os.getpid())
    mine.write_text(json.dumps({"created": psutil.Process().create_time(),
                                "command": " ".join(sys.argv)}))
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)


def users() -> list[tuple[int, str]]:
    """(pid, command) of the live processes using the background server (`in_use`): a run or
    stage, `latentforge ui` or `serve`. Files of processes that are gone are removed."""
    import psutil

    found = []
    folder = _users_dir()
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        record = storage.read_json_dict(entry)
        try:
            alive = entry.name.isdigit() and \
                abs(psutil.Process(int(entry.name)).create_time() - record.get("created", 0)) < 1
        except psutil.Error:
            alive = False
        if alive:
            found.append((int(entry.name), str(record.get("command", "?"))))
        elif entry.name != str(os.getpid()):
            entry.unlink(missing_ok=True)
    return found


def stop(force: bool = False) -> ServerRecord | None:
    """Stop the recorded background server (whichever Prefect version); None if none ran.
    While a command uses it (`users`), a LatentForgeError unless `force`: a run's flow would
    retry its API for minutes and then fail, its stages' work done but unrecorded."""
    with _start_lock():
        record = read_record()
        if record is None:
            return None
        if not _is_recorded_server(record):
            _set_aside(record_file(), f"its process {record.pid} is gone, or is another "
                                      "program: not signalled")
            return None
        busy = users()
        if busy and not force:
            shown = "; ".join(f"pid {pid}: {cmd[:80]}" for pid, cmd in busy[:3])
            raise LatentForgeError(f"the Prefect server at {record.ui_url} is in use by "
                                   f"{len(busy)} process(es) ({shown}): stopping it would stall "
                                   "their runs; let them end (or stop them), or stop it anyway "
                                   "with `latentforge server stop --force`")
        _kill_group(record.pid)
        with contextlib.suppress(FileNotFoundError):
            record_file().unlink()
        return record


def ensure(say: bool = True) -> str:
    """The background server's API URL, starting it first if none runs (ServerUnavailable: see
    start)."""
    found = running()
    if found is not None:
        return found.api_url
    began = time.monotonic()
    before = read_record()
    record = start()
    if say and record != before:  # not the slow one that answered after all
        print(f"started a Prefect server in the background: UI {record.ui_url} (every run is "
              f"there); it stays up for later commands, `latentforge server stop` stops it "
              f"({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    return record.api_url
