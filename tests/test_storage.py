"""Storage: atomic local writes, atomic folders, and the same calls against a real S3 endpoint."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from latentforge import storage


def test_write_bytes_atomic_returns_sha_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b.bin"
    sha = storage.write_bytes_atomic(path, b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest() == storage.sha256_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_take_the_umask_not_mkstemps_0600(tmp_path, umask, mode):
    """Outputs are read by teammates, another uid in a container, a web server: a file
    written atomically gets the mode open() would give it."""
    out = tmp_path / "a.json"
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); "
                    "from latentforge import storage; "
                    f"storage.write_bytes_atomic({str(out)!r}, b'x')"], check=True)
    assert out.stat().st_mode & 0o777 == mode
    # Replaced, a file keeps the mode it was given (0600 excepted: what earlier versions left).
    os.chmod(out, 0o640)
    storage.write_bytes_atomic(out, b"y")
    assert out.stat().st_mode & 0o777 == 0o640


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


BUILDER = textwrap.dedent("""
    import sys, time
    from latentforge import storage
    with storage.atomic_dir(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print(tmp.name, flush=True)
        time.sleep(600)
""")


def start_builder(out) -> tuple[subprocess.Popen, str]:
    """A process building `out` in atomic_dir, stopped mid-write; returns it and its temp name."""
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(out)], stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_write_is_swept_by_the_next_and_a_live_one_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with storage.atomic_dir(out) as tmp:
        (tmp / "good.txt").write_text("v1")
    killed, killed_tmp = start_builder(out)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed_tmp.startswith(f".out.tmp-{killed.pid}-") and (tmp_path / killed_tmp).is_dir()
    live, live_tmp = start_builder(out)  # its own write sweeps the killed one's folder
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == [live_tmp, "out"]
        with storage.atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("v2")
        # The running writer's folder is untouched.
        assert sorted(p.name for p in tmp_path.iterdir()) == [live_tmp, "out"]
        assert [p.name for p in out.iterdir()] == ["new.txt"]
        assert [p.name for p in (tmp_path / live_tmp).iterdir()] == ["half.bin"]
    finally:
        live.kill()
        live.wait()


def test_an_output_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Killed between its two renames: the previous output sits at .NAME.old-*, NAME is gone."""
    out, host = tmp_path / "out", storage._host_tag()
    aside = tmp_path / f".out.old-{dead_pid()}-{host}-0123abcd"
    aside.mkdir()
    (aside / "good.txt").write_text("v1")
    half = tmp_path / f".out.tmp-{dead_pid()}-{host}-4567abcd"
    half.mkdir()
    removed = storage.sweep_leftovers(out)
    assert removed == [half] and (out / "good.txt").read_text() == "v1"
    # Beside a committed NAME, a dead writer's .old is removed; another host's is not touched
    # (a disk two machines share), nor a name that is not a side folder of NAME.
    stale = tmp_path / f".out.old-{dead_pid()}-{host}-89abcdef"
    other_host = tmp_path / f".out.tmp-{dead_pid()}-{'0' * 8 if host != '0' * 8 else '1' * 8}-01234567"
    unrelated = tmp_path / f".outer.tmp-{dead_pid()}-{host}-01234567"
    for folder in (stale, other_host, unrelated):
        folder.mkdir()
    assert storage.sweep_leftovers(out) == [stale]
    assert other_host.is_dir() and unrelated.is_dir() and (out / "good.txt").exists()


def test_leftovers_of_earlier_versions_are_swept_once_a_day_old(tmp_path):
    out = tmp_path / "out"
    old, recent = tmp_path / ".out.tmp-0123abcd", tmp_path / ".out.tmp-4567abcd"
    for folder in (old, recent):
        folder.mkdir()
    day_ago = time.time() - storage.OLD_STYLE_AGE_S - 60
    os.utime(old, (day_ago, day_ago))
    assert storage.sweep_leftovers(out) == [old] and recent.is_dir()


def test_s3_roundtrip_through_fsspec(s3_bucket):
    url = f"s3://{s3_bucket}/dir/file.bin"
    sha = storage.write_bytes_atomic(url, b"payload" * 1000)
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"payload" * 1000
    assert storage.sha256_file(url) == sha
    assert storage.list_files(f"s3://{s3_bucket}/dir") == [url]
    assert not storage.exists(f"s3://{s3_bucket}/nope")
