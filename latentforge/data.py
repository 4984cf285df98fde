"""Reading the prepared data set: sharded uint8 .npy arrays plus manifest.json.

Layout of a prepared folder:
    manifest.json                 counts, classes, resolution, shard sha256s, source fingerprint
    train-00000.images.npy        (n, R, R, C) uint8, memory-mappable
    train-00000.labels.npy        (n,) int64
    val-00000.images.npy ...
    preview.png, report.json      a grid per class; every conversion, label decision,
                                  warning and skipped image with its reason
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentforge import storage
from latentforge.errors import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# The fewest images of a split the pipeline's stages can measure on: evaluate's precision and
# recall take each image's 3 nearest neighbours (tasks/evaluate.py's MIN_VAL_IMAGES; a test
# keeps the two equal). The prepare stage fails before writing anything below it.
MIN_SPLIT_IMAGES = 4
# The fewest classes: the judge is a classifier and the generators are class-conditional
# (models/judge.py refuses fewer). The prepare stage fails before writing anything below it.
MIN_CLASSES = 2


def shard_names(split: str, index: int) -> tuple[str, str]:
    stem = f"{split}-{index:05d}"
    return f"{stem}.images.npy", f"{stem}.labels.npy"


@dataclass
class Prepared:
    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, R, R, C) uint8, labels (N,) int64); one shard stays memory-mapped."""
        shards = self.manifest["splits"][name]["shards"]
        images = [load_array(self.root / s["images"], RERUN_PREPARE) for s in shards]
        labels = [load_array(self.root / s["labels"], RERUN_PREPARE) for s in shards]
        if not shards:
            r, c = self.resolution, self.channels
            return np.zeros((0, r, r, c), np.uint8), np.zeros((0,), np.int64)
        if len(shards) == 1:
            return images[0], labels[0]
        return np.concatenate(images), np.concatenate(labels)


RERUN_PREPARE = "rerun the prepare stage (`latentforge stage prepare` or `dvc repro prepare`)"


def load_array(path: Path, rerun: str) -> np.ndarray:
    """A shard's .npy, memory-mapped; a missing, truncated or garbled one is a DataError naming
    it and the stage that writes it (numpy's own message names neither)."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {rerun}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: truncated or garbled ({exc}); {rerun}") from None


def read_manifest(path: Path, raw: bytes, rerun: str) -> dict[str, Any]:
    """A manifest.json's content; a garbled one is a DataError naming it."""
    try:
        manifest = storage.parse_record(raw, path, rerun)
    except ValueError as exc:
        raise DataError(f"{path}: garbled ({exc}); {rerun}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}; {rerun}")
    return manifest


def load_prepared(root: str | Path, verify: bool = False) -> Prepared:
    """Open a prepared folder; with `verify`, check every shard's sha256 against the manifest."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: no manifest; run the prepare stage first")
    raw = path.read_bytes()
    manifest = read_manifest(path, raw, RERUN_PREPARE)
    if verify:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                for key in ("images", "labels"):
                    check_shard(root / shard[key], shard[f"{key}_sha256"], RERUN_PREPARE)
    return Prepared(root, manifest, storage.sha256_bytes(raw))


def check_shard(path: Path, expected: str, rerun: str) -> None:
    """A DataError naming `path` unless its sha256 is the one its manifest recorded: missing,
    truncated or garbled (numpy's reason), or changed in place (a damaged disk, an edit),
    which would otherwise train on the damage while MLflow records the manifest's digest."""
    if not path.is_file():
        raise DataError(f"{path}: missing; {rerun}")
    actual = storage.sha256_file(path)
    if actual != expected:
        load_array(path, rerun)  # truncated or garbled: numpy says how
        raise DataError(f"{path}: sha256 {actual[:16]}... is not the {expected[:16]}... its "
                        f"manifest recorded: the file changed after its stage wrote it; {rerun}")
