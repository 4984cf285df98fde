"""The local Ray instance LatentForge starts: its workers' priority."""

from __future__ import annotations

import os

from latentforge.config import ComputeConfig


def _niceness() -> int:
    return os.nice(0)


def test_local_ray_workers_run_at_the_configured_niceness(ray_local):
    # Ray's own default is 15, under which the cache actors encoded 3-7% slower.
    remote = ray_local.remote(_niceness)
    assert ray_local.get(remote.remote()) == ComputeConfig().worker_niceness == 0
