"""Storage: atomic local writes, atomic folders, and the same calls against a real S3 endpoint."""

from __future__ import annotations

import hashlib

import pytest

from latentforge import storage


def test_write_bytes_atomic_returns_sha_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b.bin"
    sha = storage.write_bytes_atomic(path, b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest() == storage.sha256_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]


def test_atomic_dir_keeps_previous_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with storage.atomic_dir(out) as tmp:
        (tmp / "good.txt").write_text("v1")
    with pytest.raises(RuntimeError), storage.atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left
    assert [p.name for p in out.iterdir()] == ["good.txt"]
    with storage.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("v2")
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_s3_roundtrip_through_fsspec(s3_bucket):
    url = f"s3://{s3_bucket}/dir/file.bin"
    sha = storage.write_bytes_atomic(url, b"payload" * 1000)
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"payload" * 1000
    assert storage.sha256_file(url) == sha
    assert storage.list_files(f"s3://{s3_bucket}/dir") == [url]
    assert not storage.exists(f"s3://{s3_bucket}/nope")
