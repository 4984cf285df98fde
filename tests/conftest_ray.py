"""One local Ray instance per test session (ray.init costs ~5 s here).

tests/conftest.py makes the fixture visible to every test module with
`from conftest_ray import ray_local  # noqa: F401`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A 2-CPU local Ray instance started through latentforge's own `init_ray`; yields `ray`.

    Workers can import test modules (whose functions a TrainSpec refers to by name): the
    local raylet and its workers inherit PYTHONPATH as it is when Ray starts.
    """
    import ray

    from latentforge.config import ComputeConfig
    from latentforge.raycluster import init_ray

    started_here = not ray.is_initialized()
    before = os.environ.get("PYTHONPATH")
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, before) if p)
    try:
        init_ray(ComputeConfig(), num_cpus=2)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    yield ray
    if started_here:
        ray.shutdown()
