"""Connect to Ray: a cluster address from `compute`, or one local instance per process.

Ray is imported inside the functions so that importing this module (and `latentforge --help`)
stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from latentforge.config import ComputeConfig

log = logging.getLogger(__name__)

# Enough for the small arrays we hand to workers, small enough for a 2-core / 24 GB machine.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def use_ray(compute: ComputeConfig) -> bool:
    """True when work goes to Ray (several workers or a cluster), False for in-process."""
    return compute.num_workers > 1 or compute.ray_address is not None


def init_ray(compute: ComputeConfig, *, num_cpus: int | None = None) -> None:
    """Connect to `compute.ray_address`, or start (or reuse) a local Ray instance.

    `num_cpus` caps a new local instance (tests use 2); None lets Ray count the cores.
    Workers import latentforge from the same environment as the driver (editable install),
    and Ray hands the driver's sys.path to local workers, so no runtime_env is needed here.
    """
    import ray

    if ray.is_initialized():
        return
    # No usage-stats prompt or upload attempt from a pipeline run.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if compute.ray_address is not None:
        log.info("connecting to Ray at %s", compute.ray_address)
        ray.init(address=compute.ray_address, log_to_driver=True)
        return
    log.info("starting a local Ray instance")
    # address="local": a fresh instance even if RAY_ADDRESS or a `ray start` cluster exists,
    # since `ray_address: null` promises a local one.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES)


def start_ray_data(compute: ComputeConfig) -> None:
    """Connect to (or start) Ray and import Ray Data: start-up that is not the work's time."""
    import ray
    import ray.data  # noqa: F401  (pulls in pyarrow and pandas: a second or two)

    init_ray(compute)
    if compute.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError("compute.use_gpu is set but the Ray cluster has no GPU; the actors "
                           "would wait for one forever")


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Stages log their own progress; Ray Data's live bars only garble DVC/Prefect logs."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    # ...and Ray Data answers with a WARNING that bars are off, which reads like a problem.
    progress_log = logging.getLogger("ray.data._internal.progress")
    level = progress_log.level
    progress_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars = before
        progress_log.setLevel(level)


def block_sizes(n_items: int, workers: int, calls_per_actor: int) -> list[int]:
    """How many consecutive items each actor call takes: even blocks, then shrinking ones.

    Blocks hold at most ceil(n / (calls_per_actor * workers)) items, so that a faster actor
    can take more of them and results (the cache's committed shards) come back all along.
    Once less than two full blocks per worker is left, each block takes half of what is left
    per worker (guided scheduling), down to one item: the last call, whose forward pass,
    transfer and commit nothing overlaps, is one batch instead of a full block. Sums to
    n_items.
    """
    most = max(1, -(-n_items // (calls_per_actor * workers)))
    sizes, left = [], n_items
    while left > 0:
        size = min(most, max(1, -(-left // (2 * workers))))
        sizes.append(size)
        left -= size
    return sizes


def map_on_actor_pool(items: list[dict[str, int]], actor_cls: type, actor_kwargs: dict[str, Any],
                      compute: ComputeConfig, calls_per_actor: int = 8,
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Stream actor_cls(**actor_kwargs)(rows) over `items` on `compute.num_workers` actors.

    Each actor reserves `compute.cpus_per_worker` CPUs and, with `compute.use_gpu`, one GPU.
    A call takes a block of consecutive items (Ray Data costs ~15 ms per call, a third of a
    256-image batch of a tiny model), sized by `block_sizes`. Results come back as numpy
    batches in any order.
    """
    import pyarrow as pa
    import ray.data

    if not items:
        return
    start_ray_data(compute)
    # One Arrow table per block: Ray Data's own splitting (from_items with
    # override_num_blocks) only makes even blocks.
    tables, at = [], 0
    for size in block_sizes(len(items), compute.num_workers, calls_per_actor):
        tables.append(pa.Table.from_pylist(items[at:at + size]))
        at += size
    # Two calls per actor at once: while one runs the model (one at a time: Ray Data keeps
    # the UDF itself single-threaded), the other turns the previous output into a block and
    # fetches the next input. Measured on 2 CPUs, tiny encoder: 5.3% -> 3.6-4.2% of
    # steady-state actor time outside the forward pass.
    pool = ray.data.ActorPoolStrategy(size=compute.num_workers, max_concurrent_calls_per_actor=2)
    with quiet_progress_bars():
        ds = ray.data.from_arrow(tables).map_batches(
            actor_cls, fn_constructor_kwargs=actor_kwargs, batch_size=None,
            batch_format="numpy", compute=pool, num_cpus=compute.cpus_per_worker,
            num_gpus=1 if compute.use_gpu else 0)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
