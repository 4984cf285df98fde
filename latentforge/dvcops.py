"""The few DVC operations the pipeline needs: stage order, up-to-date check, reproduce, push.

Reproduction runs `dvc repro --single-item NAME` as a subprocess, so the stage's own command
(`latentforge stage NAME`) runs exactly as under a plain `dvc repro`, and both entry points
leave the same dvc.lock.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentforge import paths, procs, storage
from latentforge.errors import ConfigError, LatentForgeError

log = logging.getLogger(__name__)


def dvc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC subprocesses: the running interpreter's bin folder first on
    PATH, so the stage command `latentforge` resolves to this installation."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class GraphStatus:
    """dvc.yaml's stages in graph order, each stage's upstream stages, and the stages DVC finds
    changed on their own (deps, params, outs or command), from one look at the repository."""

    order: list[str]
    upstream: dict[str, frozenset[str]]
    changed: frozenset[str]

    def clean(self, stage: str, ran: set[str] | frozenset[str] = frozenset()) -> bool:
        """True when `stage` is known up to date: unchanged, and none of its upstream stages
        ran since this status was taken (a stage that ran may have changed its outputs)."""
        return stage not in self.changed and not (self.upstream[stage] & ran)


_known: list[GraphStatus] = []


@contextlib.contextmanager
def known_status(status: GraphStatus) -> Iterator[None]:
    """Hand a status just taken to the next graph_status() call in this process (once): the
    CLI looks before it starts the flow (the no-op check), the flow would look again ~1 s
    later. Only for a caller that holds the workspace lock throughout, so nothing changed."""
    _known[:] = [status]
    try:
        yield
    finally:
        _known.clear()


def status_known() -> bool:
    """Whether graph_status() will hand back a status the caller already took (known_status):
    the looks that come before DVC's own (check_source) were made then too."""
    return bool(_known)


def check_source(params: Any, prepare_runs: bool = True) -> None:
    """dvc.yaml names prepare.path as the prepare stage's input, so DVC's status opens an
    s3:// one with DVC's own S3 client: no time limits (a silent endpoint hangs it), and no
    credentials end in a botocore traceback. Look first through latentforge.storage, bounded
    by storage.* and naming the AWS settings it found. A missing key or bucket refuses a run
    of prepare here, as a missing local path does (DVC said only "dependency ... does not
    exist", after params.yaml was rewritten); for the other stages it is DVC's to report (a
    deleted input), not a reason to refuse them (`prepare_runs`: whether prepare is among
    the stages of this run)."""
    from latentforge.errors import ConfigError, DataError

    path = params.prepare.path
    if not storage.is_url(path):
        check_local_source(path, params.prepare.source, prepare_runs)
        return
    if not storage.is_s3(path):
        return
    storage.configure(params.storage)
    try:
        found, missing = storage.exists(path), "no such key or prefix"
    except DataError as exc:
        if storage.error_code(exc) != "NoSuchBucket":
            raise
        found, missing = False, f"no such bucket ({path.split('/')[2]})"
    if not found and prepare_runs:
        raise ConfigError(f"prepare.path = {path!r}: {missing} at that endpoint; give the "
                          f"folder (prefix) or file the {params.prepare.source} source reads")


# What a copy of the project (DVC's experiment copy, a teammate's clone + `dvc pull`) must find
# in git to reuse the outputs here: the lock, the params, and the outputs DVC leaves to git
# (`cache: false`: metrics and plots; the DVC remote never gets them).
COMMITTED = ("dvc.lock", "params.yaml", str(paths.METRICS), str(paths.PLOTS))


def uncommitted_outputs(root: str = ".") -> str | None:
    """Why DVC's temporary copy would not know the outputs here: which of dvc.lock,
    params.yaml and the stages' metrics and plots files git does not track. (Changes to
    tracked files travel into the copy: `dvc exp run --temp` stashes them there; untracked
    files do not.) None when all are tracked."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                           *COMMITTED], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    untracked = [line[3:] for line in proc.stdout.splitlines() if line.startswith("??")]
    if not untracked:
        return None
    return "not in git: " + ", ".join(untracked[:4]) + (
        f" and {len(untracked) - 4} more" if len(untracked) > 4 else "")


# What a source path must not be: DVC takes it as the prepare stage's input, and refuses a
# folder that holds the project, a DVC file or another stage's output (with a traceback or an
# unexpected-error line that never names prepare.path).
PROJECT_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvc", ".dvcignore", ".git")


def check_local_source(path: str, source: str, prepare_runs: bool = True) -> None:
    """A ConfigError naming prepare.path where DVC could not take it as the prepare stage's
    input: the project folder or one above it, a DVC or project file, a stage's output (or a
    folder holding one), or, for the embedded sources (which never read it) when prepare runs,
    a missing path."""
    from latentforge.paths import STAGES

    if path.startswith("~"):  # no shell expands it in params.yaml or a -S value
        raise ConfigError(f"prepare.path = {path!r}: '~' is not expanded (DVC and the stage "
                          f"read the path as written); give {os.path.expanduser(path)!r}")
    root, target = Path.cwd().resolve(), Path(path).resolve()
    why = ""
    if target == root or target in root.parents:
        why = "the project folder or one above it"
    elif target.is_relative_to(root):
        rel = target.relative_to(root)
        outputs = [Path(o) for spec in STAGES.values() for o in (*spec.outs, *spec.metrics,
                                                               *spec.plots)]
        clash = next((o for o in [*map(Path, PROJECT_FILES), *outputs]
                      if rel.is_relative_to(o) or o.is_relative_to(rel)), None)
        if clash is not None:
            what = ("a file of the project" if str(clash) in PROJECT_FILES else
                    "an output of the pipeline")
            where = "" if rel == clash else "inside " if rel.is_relative_to(clash) else "holds "
            why = f"{where}{clash}, {what}" if where != "holds " else \
                f"a folder that holds {clash}, {what}"
    if why:
        raise ConfigError(f"prepare.path = {path!r} is {why}: DVC takes prepare.path as the "
                          "prepare stage's input, so it must be the source data (or data/source, "
                          "the default, for the embedded sources)")
    if prepare_runs and source in ("digits", "shapes") and not target.exists():
        raise ConfigError(f"prepare.path = {path!r}: no such file or folder; the {source} source "
                          "does not read it, but DVC takes it as the prepare stage's input: keep "
                          "data/source (the default)")
    if prepare_runs and not target.exists():  # DVC's own error names neither key nor source
        raise ConfigError(f"prepare.path = {path!r}: no such file or folder (prepare.source "
                          f"{source!r} reads it; a relative path starts at {root})")


def graph_status(root: str | Path = ".") -> GraphStatus:
    """The whole graph's status in one pass (what `dvc status` prints), for the pipeline to
    skip up-to-date stages without asking DVC again per stage. A failure inside DVC (or its
    filesystems': botocore, an unreadable file) is one LatentForgeError line."""
    if _known:
        return _known.pop()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        return _graph_status(root)
    except LatentForgeError:
        raise
    except Exception as exc:
        log.debug("dvc status failed", exc_info=True)
        broken = getattr(exc, "filename", None)
        if isinstance(exc, FileNotFoundError) and broken and os.path.islink(broken):
            raise LatentForgeError(f"{broken}: a symbolic link to {os.readlink(broken)}, which is "
                                   "not there; DVC hashes every file under a stage's input "
                                   "(prepare.path), so remove the link or restore its "
                                   "target") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LatentForgeError(f"dvc status of {Path(root).resolve()} failed: "
                               f"{type(exc).__name__}{': ' + first if first else ''} (`dvc "
                               "status` shows DVC's own account; -v the traceback)") from exc


def _graph_status(root: str | Path) -> GraphStatus:
    import networkx as nx
    from dvc.repo import Repo, lock_repo

    # Under one repository lock DVC builds its index (parsing dvc.yaml and dvc.lock) once;
    # status() on its own would take the lock again and rebuild it.
    with Repo(str(root)) as repo, lock_repo(repo):
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in graph if getattr(s, "cmd", None) and hasattr(s, "name")]
        ordered = list(reversed(list(nx.lexicographical_topological_sort(
            graph, key=lambda s: getattr(s, "addressing", str(s))))))
        order = [s.name for s in ordered if s in stages]
        upstream = {s.name: frozenset(d.name for d in nx.descendants(graph, s) if d in stages)
                    for s in stages}
        names = {s.addressing: s.name for s in stages}
        changed = frozenset(names.get(key, key.rsplit(":", 1)[-1]) for key in repo.status())
    return GraphStatus(order, upstream, changed)


def stage_status(stage: str, root: str | Path = ".") -> dict:
    """DVC's status of one stage alone (no upstream): empty when up to date."""
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    with Repo(str(root)) as repo:
        return dict(repo.status(targets=[stage]))


PARAMS_FILE = "params.yaml"


def reproduce(stage: str, root: str | Path = ".", env: Mapping[str, str] | None = None,
              force: bool = False, on_line: Callable[[str], None] = print) -> None:
    """`dvc repro --single-item STAGE`, streaming its output line by line to `on_line`.

    DVC reads params.yaml for dvc.lock after the stage's command ends, while the command read
    it when it started: an edit in between (a user tuning the next run) would be recorded as
    the parameters this output was made with. So the stage command keeps the bytes it read
    (paths.params_read_file; the file as it was before DVC started where the command did not
    run), and when params.yaml says otherwise by the end, dvc.lock is given back the values
    the stage ran with (see `record_params_used`): the stage then shows as changed and runs
    again next time.
    """
    from latentforge.paths import params_read_file

    params_path, read_path = Path(root) / PARAMS_FILE, Path(root) / params_read_file(stage)
    try:
        before: bytes | None = params_path.read_bytes()
    except OSError:
        before = None
    read_path.unlink(missing_ok=True)
    try:
        run_dvc(["repro", "--single-item", stage, *(["--force"] if force else [])], env=env,
                root=root, what=f"stage '{stage}'", on_line=on_line)
    except LatentForgeError as exc:
        unreadable = _unreadable_params(params_path, before)
        if unreadable is None:
            raise
        raise LatentForgeError(
            f"{params_path} changed while stage '{stage}' ran and can no longer be read "
            f"({unreadable}): DVC cannot record the stage (nor run it); fix {PARAMS_FILE} and "
            f"run again (the stage runs again); DVC said: {exc}") from exc
    with contextlib.suppress(OSError):
        before = read_path.read_bytes()  # what the stage read, where it ran
    try:
        after: bytes | None = params_path.read_bytes()
    except OSError:
        after = None
    if before is not None and after != before:
        record_params_used(stage, before, root, on_line)


def _unreadable_params(path: Path, before: bytes | None) -> str | None:
    """Why `path` cannot be read as YAML where it changed since `before`, else None."""
    import yaml

    from latentforge.config import yaml_load

    try:
        now = path.read_bytes()
        if now == before:
            return None
        yaml_load(now)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def dotted_param(tree: object, key: str) -> tuple[bool, object]:
    """(found, value) of a dotted key (`compute.precision`) in a parsed YAML tree."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def record_params_used(stage: str, params_text: bytes, root: str | Path = ".",
                       on_line: Callable[[str], None] = print) -> list[str]:
    """Write into `stage`'s dvc.lock entry the params.yaml values of `params_text` (the file as
    the stage read it) where DVC recorded others; returns the keys corrected."""
    import yaml
    from dvc.utils.serialize import modify_yaml

    from latentforge.config import yaml_load  # as the stage and DVC read it (YAML 1.2)

    try:
        used = yaml_load(params_text)
    except (yaml.YAMLError, ConfigError):  # ConfigError: a duplicate key
        used = None
    lock_path = Path(root) / "dvc.lock"
    corrected: list[str] = []
    if not isinstance(used, dict) or not lock_path.exists():
        return corrected
    with modify_yaml(lock_path) as lock:
        entry = (lock.get("stages") or {}).get(stage) or {}
        recorded = (entry.get("params") or {}).get(PARAMS_FILE) or {}
        for key in list(recorded):
            found, value = dotted_param(used, key)
            if found and recorded[key] != value:
                recorded[key] = value
                corrected.append(key)
    if corrected:
        message = (f"{PARAMS_FILE} changed while stage '{stage}' ran: dvc.lock records the "
                   f"values it ran with ({', '.join(corrected)}), so the next run runs "
                   f"'{stage}' again with the new ones")
        log.warning("%s", message)
        on_line(f"warning: {message}")
    return corrected


ANALYSED_LINES, SHOWN_LINES = 400, 15
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def _traceback_end(lines: list[str]) -> str | None:
    """The exception line closing the last traceback in `lines`, whatever the exception's name
    (`zlib.error: ...` too): the first unindented line after its header; where the header
    fell out of `lines`, the last unindented line right after an indented frame line."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and not line[0].isspace():
                return line
        return None
    ends = [line for before, line in zip(lines, lines[1:], strict=False)
            if before[:1].isspace() and line and not line[0].isspace()
            and not line.startswith("ERROR: ")]
    return ends[-1] if ends else None


def crash_cause(lines: list[str]) -> str | None:
    """The line of a crashed stage's output that names the cause: the last Python exception
    (the line closing the last traceback, else a `RuntimeError: ...`-like line), else DVC's
    own last `ERROR: ...` (e.g. `exited with -9`)."""
    end = _traceback_end(lines)
    if end is not None and not end.startswith("ERROR: "):
        return end
    for matches in (_EXCEPTION_LINE.match, lambda line: line.startswith("ERROR: ")):
        found = [line for line in lines if matches(line)]
        if found:
            return _signal_named(found[-1].removeprefix("ERROR: "))
    return None


def _signal_named(cause: str) -> str:
    """DVC's `exited with -9` with the signal's name (and, for SIGKILL, its usual sender)."""
    import signal

    found = re.search(r"exited with -(\d+)", cause)
    if not found:
        return cause
    try:
        name = signal.Signals(int(found.group(1))).name
    except ValueError:
        return cause
    why = ": killed from outside, often by the out-of-memory killer (see `dmesg`)" \
        if name == "SIGKILL" else ""
    return f"{cause} ({name}{why})"


def push(remote_url: str, root: str | Path = ".", on_line: Callable[[str], None] = print,
         timeouts: tuple[float, float] | None = None) -> None:
    """Point the DVC remote `storage` at `remote_url` and push every stage output to it.

    The remote goes into the project's .dvc/config (versioned, not config.local): a teammate's
    clone then gets the outputs with a plain `dvc pull`. `timeouts`: (connect, read) seconds
    for an s3:// remote (storage.connect_timeout and read_timeout), written with it, so DVC's
    own S3 client, here and in the teammate's `dvc pull`, does not wait on a silent endpoint
    at botocore's defaults (60 s each, per attempt).
    """
    base = [sys.executable, "-m", "dvc"]

    def configure(*args: str) -> None:
        proc = subprocess.run(base + ["remote", *args], cwd=root, env=dvc_env(),
                              capture_output=True, text=True)
        if proc.returncode != 0:  # DVC's own reason, not a CalledProcessError traceback
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise LatentForgeError(f"storage.remote {remote_url!r}: `dvc remote {args[0]}` "
                                   f"failed: {said[-1] if said else f'exit {proc.returncode}'}")

    configure("add", "--force", "-d", "storage", remote_url)
    if timeouts is not None and storage.is_s3(remote_url):
        for option, seconds in zip(("connect_timeout", "read_timeout"), timeouts, strict=True):
            # dvc-s3 takes whole seconds; a fraction rounds up, never to 0 (no limit).
            configure("modify", "storage", option, str(max(1, math.ceil(seconds))))
    lock = _lock_digest(root)
    proc = subprocess.run(base + ["push"], cwd=root, env=dvc_env(), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        on_line(line)
    if proc.returncode != 0:  # DVC's reason in one line, not its help footer and warnings
        log.debug("dvc push to %s failed:\n%s", remote_url, proc.stderr[-4000:])
        said = [line.strip().removeprefix("ERROR: ").removeprefix("unexpected error - ")
                for line in proc.stderr.splitlines() if line.startswith("ERROR")] or \
            [line.strip() for line in proc.stderr.splitlines() if line.strip()][-1:]
        # The first error names the cause (a missing bucket), the last DVC's summary of it.
        reason = "; ".join(dict.fromkeys([said[0][:300], said[-1][:200]])) if said else \
            f"exit {proc.returncode}"
        raise LatentForgeError(f"dvc push to {remote_url} failed: {reason}")
    storage.write_bytes_atomic(Path(root) / paths.PUSHED_FILE, json.dumps(
        {"remote": remote_url, "dvc_lock_sha256": lock}).encode())
    if why := uncommitted_outputs(str(root)):  # the remote never gets them: git keeps them
        on_line(f"WARNING: {why}: a clone that runs `dvc pull` from {remote_url} gets the "
                f"cached outputs but not these, so its next run reruns every stage; `git add "
                f"{' '.join(c for c in COMMITTED if (Path(root) / c).exists())} && git commit` "
                f"and push that too")


def _lock_digest(root: str | Path) -> str | None:
    try:
        return storage.sha256_bytes((Path(root) / "dvc.lock").read_bytes())
    except OSError:
        return None


def pushed(remote_url: str, root: str | Path = ".") -> bool:
    """Whether the outputs dvc.lock names now were pushed to `remote_url` by a `latentforge
    run` (paths.PUSHED_FILE; a `dvc push` by hand is not seen, and only costs one more)."""
    found = storage.read_json_dict(Path(root) / paths.PUSHED_FILE)
    lock = _lock_digest(root)
    return lock is not None and found.get("remote") == remote_url and \
        found.get("dvc_lock_sha256") == lock


def run_dvc(args: list[str], env: Mapping[str, str] | None = None, root: str | Path = ".",
            what: str = "dvc", on_line: Callable[[str], None] = print) -> None:
    """`dvc ARGS`, streaming its output line by line to `on_line`.

    DVC runs in its own process group: a terminal's Ctrl-C reaches `latentforge` only, which
    then stops DVC and the stage in order (procs.stop_group), and the guard stops them if we
    die. On failure the error's first line says what went wrong (the Prefect flow logs it at
    ERROR, the CLI prints it): the stage's own one-line `error: ...`, which says what to fix
    (its log is above); without one (a crash), the exception it died of, and the last lines
    of output after it as the best account.
    """
    proc = procs.start_group([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
    # The last lines, enough to hold a deep stage traceback's header (the cause is read from
    # it); the error message shows the last SHOWN_LINES of them.
    tail: collections.deque[str] = collections.deque(maxlen=ANALYSED_LINES)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            on_line(line)
            tail.append(line)
        proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM, Prefect cancelling the flow run
        with procs.interrupts_deferred():
            log.warning("stopping %s (dvc %s, pid %d)", what, args[0], proc.pid)
            procs.stop_group(proc, drain=proc.stdout, on_line=on_line, leader_last=True)
        raise
    procs.guard_send(f"ungroup {proc.pid}")
    if proc.returncode == 0:
        return
    said = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
    if said:
        log.debug("dvc %s exited %d; last output:\n%s", " ".join(args), proc.returncode,
                  "\n".join(tail))
        raise LatentForgeError(f"{what} failed: {said[-1]}")
    cause = crash_cause(list(tail))
    raise LatentForgeError(f"{what} failed (dvc {args[0]} exit {proc.returncode})"
                           + (f": {cause}" if cause else "") + "; last output:\n"
                           + "\n".join(list(tail)[-SHOWN_LINES:]))
