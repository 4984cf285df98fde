"""Read and write local paths and fsspec URLs (s3:// through s3fs), atomically, with sha256.

Local paths go through pathlib; anything with `://` through fsspec, imported lazily. S3
endpoint and credentials come only from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/...): never from params, never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL."""
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(url)
    return fs, fs_path


def join(base: str | os.PathLike[str], *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file or URL, streamed."""
    digest = hashlib.sha256()
    with open_binary(path) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def open_binary(path: str | os.PathLike[str]) -> Iterator[Any]:
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        with fs.open(fs_path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open_binary(path) as f:
        return f.read()


def exists(path: str | os.PathLike[str]) -> bool:
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        return bool(fs.exists(fs_path))
    return Path(path).exists()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Write `data` so that readers see the old file or the whole new one; return its sha256.

    Local: a temporary file in the same folder, fsync, rename. S3: a single PUT or a completed
    multipart upload, which S3 makes visible only when whole.
    """
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        with fs.open(fs_path, "wb") as f:
            f.write(data)
        return sha256_bytes(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return sha256_bytes(data)


def upload_file(local: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to a URL (S3 makes it visible only once the upload completes)."""
    fs, fs_path = filesystem(url)
    fs.put_file(str(local), fs_path)


def list_files(path: str | os.PathLike[str]) -> list[str]:
    """All files below a local folder or URL prefix, as full paths/URLs, sorted."""
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        protocol = str(path).split("://", 1)[0]
        return sorted(f"{protocol}://{p}" for p in fs.find(fs_path))
    root = Path(path)
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name; on success swap it in, on failure leave no trace.

    The previous folder (a good earlier output) stays untouched until the new one is complete;
    the swap is two renames on the same filesystem.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
