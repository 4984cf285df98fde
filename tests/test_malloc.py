"""The allocator settings every model-running process applies (latentforge/malloc.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from latentforge.malloc import tune_malloc; print(tune_malloc(), tune_malloc())"


def run_check(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", CHECK], env={**clean, **env}, check=True,
                          capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_thresholds_are_set_once_per_process_on_glibc():
    assert run_check() == ["True", "True"]


def test_a_users_malloc_environment_wins():
    assert run_check(MALLOC_MMAP_THRESHOLD_="131072") == ["False", "False"]
