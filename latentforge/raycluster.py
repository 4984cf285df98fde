"""Connect to Ray: a cluster address from `compute`, or one local instance per process.

Ray is imported inside the functions so that importing this module (and `latentforge --help`)
stays cheap.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
