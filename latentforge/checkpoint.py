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

Every `step-*` folder is complete (it only appears by rename), so the newest one is the resume
point even if a crash came between the rename and the `latest` update.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from latentforge.storage import write_bytes_atomic

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE)
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _to_safetensors_bytes(state: dict[str, torch.Tensor], step: int) -> bytes:
    """Serialise a state dict; tensors are cloned because safetensors refuses shared storage."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    return save(tensors, metadata={"step": str(step)})


def committed_steps(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint that holds all its files, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        if all((child / name).is_file() for name in CHECKPOINT_FILES):
            found.append((int(match.group(1)), child))
        else:
            # Only a hand-made or half-copied folder can get here: ours appear by rename.
            log.warning("ignoring incomplete checkpoint folder %s", child)
    return sorted(found)


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


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint folder (`step-NNNNNN/`) onto the CPU, safely (no unpickling)."""
    import torch

    path = Path(path)
    train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return Checkpoint(step=int(train_state["step"]), model_state=_load_safetensors(path / MODEL_FILE),
                      ema_state=_load_safetensors(path / EMA_FILE), train_state=train_state,
                      path=path)


def load_checkpoint_weights(ckpt_dir: str | os.PathLike[str],
                            which: Literal["ema", "model"] = "ema") -> dict[str, torch.Tensor]:
    """The newest checkpoint's EMA (default) or model weights, as CPU tensors."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', not {which!r}")
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}")
    return _load_safetensors(path / (EMA_FILE if which == "ema" else MODEL_FILE))


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

    from latentforge.errors import DataError
    from latentforge.storage import sha256_file

    path = Path(path)
    meta_path, weights_path = path / meta_name, path / MODEL_FILE
    rerun = f"run the {what} stage to write it again"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: no {what} here; run the {what} stage first{missing_hint}")
    try:
        meta = json.loads(meta_path.read_text())
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
