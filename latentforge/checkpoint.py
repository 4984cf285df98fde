"""Training checkpoints: committed whole by renaming a folder, found again after a crash.

Layout of a checkpoint folder (local path; training assumes a filesystem every worker sees):

    ckpt_dir/
      step-000200/            one committed checkpoint (a folder renamed into place when whole)
        model.safetensors     the trained weights
        ema.safetensors       the EMA weights (the model's own when EMA is off)
        state.pt              optimizer, step, RNG states, run fingerprint (torch.save; plain
                              containers and tensors only, so torch.load(weights_only=True) reads it)
      latest                  "step-000200": the newest committed folder, updated atomically
      metrics.jsonl           logged metric rows (written by training.py)
      .step-000300.tmp-1a2b   a checkpoint being written; ignored and removed by `clean_partial`
      corrupt-step-000400-20250102T030405
                              a checkpoint that could not be read back, set aside (never deleted)

Every `step-*` folder is complete (it only appears by rename), so the newest one is the resume
point even if a crash came between the rename and the `latest` update. Renaming guards against
torn saves, not against what happens to the files later (a full disk during a copy, a bad
sector, a hand-placed file): `find_resume_checkpoint` reads the candidates back, newest first,
and sets aside every one that does not load, with a warning naming the file and why.

state.pt is read with weights_only=True, which refuses anything but tensors and plain
containers; a refusal is reported as such, never with torch's advice to retry with
weights_only=False (a state.pt holding a pickled object is not one LatentForge wrote).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from latentforge.errors import DataError
from latentforge.storage import naming, write_bytes_atomic

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE)
CORRUPT_PREFIX = "corrupt-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# The safe unpickler names the global it refused ("... unsupported GLOBAL posix.system ...");
# only a dotted identifier is kept, so nothing else the file says reaches the message.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]{0,80})")
_REFUSED = ("holds objects other than tensors and plain containers; refused "
            "(LatentForge never loads pickled code)")


class CheckpointError(DataError):
    """A checkpoint file that cannot be read back, or that does not fit the model."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass
class Checkpoint:
    """One loaded checkpoint; tensors on the CPU."""

    step: int
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    path: Path


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file_synced(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if naming(exc, path) is exc:
            raise
        raise naming(exc, path) from exc


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> str:
    """A stage's model weights as safetensors, written like every other output (atomically,
    with the mode the umask gives: safetensors' own save_file makes them 0600, unreadable to
    teammates and web servers); returns their sha256."""
    from safetensors.torch import save

    return write_bytes_atomic(path, save({k: v.contiguous() for k, v in state.items()}))


def _to_safetensors_bytes(state: dict[str, torch.Tensor], step: int) -> bytes:
    """Serialise a state dict; tensors are cloned because safetensors refuses shared storage."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    return save(tensors, metadata={"step": str(step)})


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-NNNNNN` folder, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def committed_steps(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint that holds all its files, oldest first."""
    found = []
    for step, child in _step_folders(Path(ckpt_dir)):
        if all((child / name).is_file() for name in CHECKPOINT_FILES):
            found.append((step, child))
        else:
            # Only a hand-made or half-copied folder can get here: ours appear by rename.
            log.warning("ignoring incomplete checkpoint folder %s", child)
    return found


def latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """The newest committed checkpoint folder, or None."""
    steps = committed_steps(ckpt_dir)
    return steps[-1][1] if steps else None


def clean_partial(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove what an interrupted save or prune left behind (hidden temp folders and files)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    removed = []
    for child in root.iterdir():
        if child.name.startswith(".step-") or (
                child.name.startswith(f".{LATEST_FILE}.") and child.name.endswith(".tmp")):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    if removed:
        log.info("removed %d partial checkpoint leftovers in %s", len(removed), root)
    return removed


def prune_checkpoints(ckpt_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` committed checkpoints (0: delete them all)."""
    root = Path(ckpt_dir)
    found = committed_steps(root)
    doomed = [path for _, path in found[:len(found) - keep_last]] if keep_last < len(found) else []
    for path in doomed:
        # Hide it first, so that a crash mid-delete leaves a temp folder, not a torn checkpoint.
        hidden = root / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def save_checkpoint(ckpt_dir: str | os.PathLike[str], step: int,
                    model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write `step-NNNNNN/` under a temp name, commit it by rename, point `latest` at it, prune.

    `train_state` must hold only tensors and plain containers (it is read back with
    weights_only=True). keep_last=None keeps everything.
    """
    import io

    import torch

    def write(tmp: Path) -> None:
        _write_file_synced(tmp / MODEL_FILE, _to_safetensors_bytes(model_state, step))
        _write_file_synced(tmp / EMA_FILE, _to_safetensors_bytes(ema_state, step))
        buf = io.BytesIO()
        torch.save({**train_state, "step": step}, buf)
        _write_file_synced(tmp / STATE_FILE, buf.getvalue())

    return install_checkpoint(ckpt_dir, step, write, keep_last)


def install_checkpoint(ckpt_dir: str | os.PathLike[str], step: int,
                       write: Callable[[Path], None], keep_last: int | None = None) -> Path:
    """Commit a checkpoint whose files `write(tmp)` puts into a fresh temp folder: rename to
    `step-NNNNNN/`, point `latest` at it, prune. Also how a checkpoint that another machine
    wrote (reported to Ray Train's storage, or shipped as bytes) lands in a folder."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
        if final.exists():
            # Same step saved again (a rerun of a finished run): swap, keeping one whole copy.
            old = root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_bytes_atomic(root / LATEST_FILE, f"{final.name}\n".encode())
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def checkpoint_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """A committed checkpoint folder's files as bytes (to ship it through Ray's object store)."""
    return {name: (Path(path) / name).read_bytes() for name in (MODEL_FILE, EMA_FILE, STATE_FILE)}


def install_checkpoint_files(ckpt_dir: str | os.PathLike[str], step: int,
                             files: dict[str, bytes], keep_last: int | None = None) -> Path:
    """Commit a checkpoint from `checkpoint_files` bytes into `ckpt_dir`."""
    def write(tmp: Path) -> None:
        for name, data in files.items():
            _write_file_synced(tmp / name, data)

    return install_checkpoint(ckpt_dir, step, write, keep_last)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's go on for a paragraph)."""
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0][:160] if lines else type(exc).__name__


def _unreadable_reason(file: Path, exc: Exception) -> str:
    """One line on why `file` did not parse; never torch's advice to set weights_only=False."""
    message = str(exc)
    if "weights_only" in message:  # the safe unpickler refused the file
        refused = _REFUSED_GLOBAL.search(message)
        if refused:
            return f"{_REFUSED}; it names {refused.group(1)}"
        return f"garbled, or {_REFUSED}"
    kind = "safetensors" if file.suffix == ".safetensors" else "torch.save"
    if isinstance(exc, EOFError) or not message:
        return f"empty or truncated {kind} file"
    return f"truncated or garbled {kind} file ({type(exc).__name__}: {_first_line(exc)})"


def _read_file(file: Path, parse: Callable[[bytes], Any]) -> Any:
    """`parse` of the file's bytes; a missing file or any complaint of the parser (safetensors,
    zip, the safe unpickler) is raised as a CheckpointError naming the file.

    The bytes are read first so that an OSError of the disk or the mount (which setting the
    folder aside would hide) propagates, while one that a parser raises (torch.load of some
    truncated archives raises EINVAL) counts against the file.
    """
    try:
        data = file.read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise CheckpointError(file, "missing") from exc
    try:
        return parse(data)
    except Exception as exc:
        raise CheckpointError(file, _unreadable_reason(file, exc)) from exc


def _parse_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    # From bytes, not load_file: its tensors map the file, so rewriting the file in place
    # would change (or, truncated, crash on) weights already handed out.
    from safetensors.torch import load

    return load(data)


def _parse_train_state(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_train_state(file: Path) -> dict[str, Any]:
    """A state.pt, safely (tensors and plain containers only); CheckpointError naming `file`
    when it is missing, unreadable, refused or not a training state."""
    state = _read_file(file, _parse_train_state)
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(file, f"no integer 'step' in it (a {type(state).__name__}); "
                                    f"not a training state LatentForge wrote")
    return state


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint folder (`step-NNNNNN/`) onto the CPU, safely (no unpickling).

    Raises CheckpointError naming the file that is missing, truncated, garbled or refused.
    """
    path = Path(path)
    train_state = read_train_state(path / STATE_FILE)
    step = int(train_state["step"])
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(path / STATE_FILE, f"says step {step} but sits in {path.name}")
    return Checkpoint(step=step, model_state=_read_file(path / MODEL_FILE, _parse_safetensors),
                      ema_state=_read_file(path / EMA_FILE, _parse_safetensors),
                      train_state=train_state, path=path)


def _misfit(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> str | None:
    """How `state` differs from the keys and shapes `expected` (the first difference), or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} key(s), e.g. {keys[0]!r}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        return ", ".join(parts)
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            return f"{key!r} is {tuple(state[key].shape)} in the file, {shape} in the model"
    return None


def check_weights_fit(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Raise CheckpointError unless both weight files hold exactly `model`'s keys and shapes.

    `model` may live on the meta device: only its state_dict's keys and shapes are compared,
    the two things a strict `load_state_dict` refuses.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, state in ((MODEL_FILE, checkpoint.model_state), (EMA_FILE, checkpoint.ema_state)):
        problem = _misfit(expected, state)
        if problem is not None:
            raise CheckpointError(checkpoint.path / name, f"does not fit the model ({problem}); "
                                                          f"written by another model version?")


def _point_latest(root: Path) -> None:
    """Point `latest` at the newest committed folder, or remove it when there is none."""
    steps = committed_steps(root)
    if steps:
        write_bytes_atomic(root / LATEST_FILE, f"{steps[-1][1].name}\n".encode())
    else:
        (root / LATEST_FILE).unlink(missing_ok=True)


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint folder that cannot be resumed to `corrupt-<name>-<time>` beside it
    (kept for the user to look at, never deleted) and repoint `latest`; return the new path."""
    root = folder.parent
    target = root / f"{CORRUPT_PREFIX}{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    if target.exists():  # set aside twice within a second (a rerun that failed the same way)
        target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:4]}")
    os.replace(folder, target)
    _fsync_dir(root)
    _point_latest(root)
    return target


def find_resume_checkpoint(ckpt_dir: str | os.PathLike[str],
                           check: Callable[[Checkpoint], None] | None = None
                           ) -> Checkpoint | None:
    """The newest checkpoint that loads whole and passes `check`, or None (start afresh).

    Every newer `step-*` folder that does not (a file missing, truncated, garbled or refused
    by the safe unpickler, or `check` raising CheckpointError) is logged as a warning naming
    the file and why, and set aside with `set_aside`; the previous one is tried next.
    """
    root = Path(ckpt_dir)
    folders = _step_folders(root)
    for _, folder in reversed(folders):
        try:
            checkpoint = load_checkpoint(folder)
            if check is not None:
                check(checkpoint)
        except CheckpointError as exc:
            moved = set_aside(folder)
            log.warning("cannot resume from %s: %s; set the folder aside as %s",
                        exc.file, exc.reason, moved.name)
            log.debug("what reading %s raised", exc.file, exc_info=exc.__cause__ or exc)
            continue
        return checkpoint
    if folders:
        log.warning("no checkpoint in %s reads back; nothing to resume", root)
    return None


def load_checkpoint_weights(ckpt_dir: str | os.PathLike[str],
                            which: Literal["ema", "model"] = "ema") -> dict[str, torch.Tensor]:
    """The newest checkpoint's EMA (default) or model weights, as CPU tensors."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', not {which!r}")
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}")
    return _read_file(path / (EMA_FILE if which == "ema" else MODEL_FILE), _parse_safetensors)


# The JSON file each stage writes beside its weights, and what it names.
STAGE_FOLDERS = {"judge.json": "judge", "tokenizer.json": "tokenizer",
                 "generator.json": "generator", "decoder.json": "post-trained decoder"}


def folder_kind(path: str | os.PathLike[str], but: str = "") -> tuple[str, str] | None:
    """(JSON file, kind) of the stage output in `path`, by the file each stage writes beside
    its weights (`but`: a file not to count), or None."""
    return next(((name, kind) for name, kind in STAGE_FOLDERS.items()
                 if name != but and (Path(path) / name).is_file()), None)


def _producing_stage(path: Path, what: str) -> str:
    """The stage that writes `path`: rl for the project's rl folder and its seeds' folders
    (generator folders, but rerunning the generator stage retrains the base), else `what`."""
    from latentforge.paths import RL

    here, rl = path.resolve(), RL.resolve()
    return "rl" if here == rl or rl in here.parents else what


def load_model_folder(path: str | os.PathLike[str], meta_name: str, what: str,
                      build: Callable[[dict[str, Any]], torch.nn.Module], missing_hint: str = ""
                      ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, meta) from a stage's output folder: `meta_name` JSON and model.safetensors.

    `build` makes the model from meta["model"] (its config); meta gains "sha256", the weights
    file's, which caches and generators record to refuse mismatched pairs. Every way the folder
    can be wrong (missing, not JSON, a config or weights of another version) is a DataError
    that names the file and says how to get a good one (`missing_hint` is added when there is
    no folder at all, e.g. how to point at another one).
    """
    from safetensors import SafetensorError

    from latentforge import paths
    from latentforge.errors import DataError
    from latentforge.storage import parse_record, sha256_file

    path = Path(path)
    meta_path, weights_path = path / meta_name, path / MODEL_FILE
    rerun = f"run the {_producing_stage(path, what)} stage to write it again"
    if not meta_path.exists():
        if not path.exists():
            stage = _producing_stage(path, what)
            also = (" (it writes seeds/seed_N for each seed after the first in rl.seeds)"
                    if stage == "rl" and path.resolve() != paths.RL.resolve() else "")
            raise DataError(f"{path}: no such folder; run the {stage} stage first{also}"
                            f"{missing_hint}")
        other = folder_kind(path, but=meta_name)
        if other:
            raise DataError(f"{path}: a {other[1]} folder ({other[0]}), not a {what} one; "
                            f"give the {what} stage's output (run the {what} stage to write "
                            f"one){missing_hint}")
        raise DataError(f"{meta_path}: no {what} here; run the {what} stage first{missing_hint}")
    try:
        text = meta_path.read_text()
        meta = parse_record(text, meta_path, rerun)
        if isinstance(meta, dict) and "rl" in meta:  # a fine-tuned generator (rl writes it)
            rerun = "run the rl stage to write it again"
            meta = parse_record(text, meta_path, rerun)  # its missing keys say so too
        model = build(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta_path}: not a {what} description this version can read "
                        f"({type(exc).__name__}: {exc}); {rerun}") from exc
    if not weights_path.exists():
        raise DataError(f"{weights_path}: missing beside {meta_path.name}; {rerun}")
    try:
        state = _load_safetensors(weights_path)
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{weights_path}: unreadable safetensors file ({exc}); {rerun}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches, listed by torch
        raise DataError(f"{weights_path}: weights do not fit the model described in "
                        f"{meta_path.name}: {exc}; {rerun}") from exc
    meta["sha256"] = sha256_file(weights_path)
    return model, meta
