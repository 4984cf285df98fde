"""One run per workspace: an exclusive lock on `.latentforge/run.lock`.

DVC locks its own repository only while it works on a stage, so two `latentforge` runs (or a
CLI run beside a Prefect deployment run) on one project would interleave stages and rewrite
params.yaml under each other. The pipeline flow and every stage flow hold this lock for their
whole run; it is re-entrant within a process (the pipeline flow calls the stage flows), and the
operating system releases it when the holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from latentforge import paths
from latentforge.errors import LatentForgeError

LOCK_FILE = paths.STATE / "run.lock"

log = logging.getLogger(__name__)

_held: dict[str, tuple[IO[str], int]] = {}  # resolved lock path -> (open file, depth)


class WorkspaceBusy(LatentForgeError):
    """Another run holds this workspace."""


def _holder(f: IO[str]) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        return dict(json.loads(f.read() or "{}"))
    return {}


WAIT_ENV = "LATENTFORGE_WAIT_FOR_WORKSPACE"
HOLDER_ENV = "LATENTFORGE_WORKSPACE_HOLDER"


def _describe(holder: dict[str, Any], path: Path) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(holder["since"])) \
        if "since" in holder else "?"
    return (f"pid {holder.get('pid', '?')} ({holder.get('what') or 'latentforge'}, since "
            f"{since}) holds {path}")


@contextlib.contextmanager
def lock(root: str | os.PathLike[str] = ".", what: str = "", wait: bool | None = None,
         say: Callable[[str], Any] | None = None, wait_hint: str = "pass --wait"
         ) -> Iterator[None]:
    """Hold the workspace lock for the body. When another run holds it: fail at once naming
    the holder, or with `wait` (default: the LATENTFORGE_WAIT_FOR_WORKSPACE environment
    variable, set by `--wait`) wait for it, saying so every minute through `say` (default:
    a warning on this module's logger; a flow passes its run logger, so the Prefect UI
    shows it; a flow's `wait_hint` names its Run form's `wait`)."""
    if wait is None:
        wait = os.environ.get(WAIT_ENV, "").lower() in ("1", "true", "yes")
    path = (Path(root) / LOCK_FILE).resolve()
    key = str(path)
    if key in _held:
        f, depth = _held[key]
        _held[key] = (f, depth + 1)
        try:
            yield
        finally:
            f, depth = _held[key]
            _held[key] = (f, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    said = 0.0
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                f.close()
                raise WorkspaceBusy(f"another run is using this workspace: "
                                    f"{_describe(holder, path)}; wait for it to finish, stop "
                                    f"it, or {wait_hint} to queue behind it") from None
            if time.monotonic() - said >= 60:
                (say or log.warning)(f"waiting for the workspace: {_describe(holder, path)}")
                said = time.monotonic()
            time.sleep(1.0)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "since": time.time(),
                        "what": what or " ".join(["latentforge", *sys.argv[1:3]])}))
    f.flush()
    _held[key] = (f, 1)
    os.environ[HOLDER_ENV] = str(os.getpid())  # what our children (dvc's stages) inherit
    try:
        yield
    finally:
        if _held.get(key, (None, 0))[1] <= 1:
            _held.pop(key, None)
            if os.environ.get(HOLDER_ENV) == str(os.getpid()):
                del os.environ[HOLDER_ENV]
            with contextlib.suppress(OSError):
                f.truncate(0)
            f.close()  # releases the flock


def held_by_parent(root: str | os.PathLike[str] = ".") -> bool:
    """True when the process that started us (through dvc) holds this workspace's lock: it
    set HOLDER_ENV while holding it, and the lock file still names that pid."""
    pid = os.environ.get(HOLDER_ENV)
    path = Path(root) / LOCK_FILE
    if not pid or not path.exists():
        return False
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(path.read_text() or "{}").get("pid")) == pid
    return False
