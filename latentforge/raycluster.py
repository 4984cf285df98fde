"""Connect to Ray: a cluster address from `compute`, or one local instance per process.

Ray is imported inside the functions so that importing this module (and `latentforge --help`)
stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentforge.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from latentforge.config import ComputeConfig

log = logging.getLogger(__name__)

# Enough for the small arrays we hand to workers, small enough for a 2-core / 24 GB machine.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2

# The driver's settings a cluster's workers need to do what the driver would, sent with the
# job's runtime_env. Never credentials: runtime_env is readable by anyone with access to the
# cluster; nodes take theirs from their own environment, instance profile or ~/.aws.
# - Where S3 is: a default only. A node's own setting wins (a driver may reach MinIO through a
#   port-forward at localhost while the nodes reach it by its cluster name); a node without
#   one takes the driver's (adopt_driver_env, Ray's worker_process_setup_hook).
# - Which fp32 kernels train (models/layers.py): the driver's wins, so every worker trains
#   down the path the driver chose.
NODE_DEFAULT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                    "AWS_REGION")
DRIVER_ENV = ("LATENTFORGE_FP32_LINEAR",)
FORWARDED_ENV = NODE_DEFAULT_ENV + DRIVER_ENV
DRIVER_DEFAULTS_VAR = "LATENTFORGE_DRIVER_ENV"  # JSON of the NODE_DEFAULT_ENV set here


def cluster_runtime_env(compute: ComputeConfig) -> dict[str, Any]:
    """The runtime_env of a pipeline's Ray job on a cluster: FORWARDED_ENV as set here (see
    above), and the latentforge code with `compute.ship_code`."""
    env: dict[str, Any] = {}
    env_vars = {k: os.environ[k] for k in DRIVER_ENV if os.environ.get(k)}
    defaults = {k: os.environ[k] for k in NODE_DEFAULT_ENV if os.environ.get(k)}
    if defaults:
        env_vars[DRIVER_DEFAULTS_VAR] = json.dumps(defaults)
        env["worker_process_setup_hook"] = f"{__name__}.adopt_driver_env"
    if env_vars:
        env["env_vars"] = env_vars
    if compute.ship_code:
        env["py_modules"] = [package_folder()]
    return env


def adopt_driver_env() -> None:
    """In each Ray worker process of a cluster job, before its tasks and actors: the driver's
    S3 endpoint and region where this node has none of its own."""
    for name, value in json.loads(os.environ.get(DRIVER_DEFAULTS_VAR) or "{}").items():
        if not os.environ.get(name):
            os.environ[name] = value


def use_ray(compute: ComputeConfig) -> bool:
    """True when work goes to Ray (several workers or a cluster), False for in-process."""
    return compute.num_workers > 1 or compute.ray_address is not None


def on_cluster(compute: ComputeConfig) -> bool:
    """True when work may run on other machines: then nothing may travel as a driver path."""
    return compute.ray_address is not None


def check_storage_set(compute: ComputeConfig) -> None:
    """A ConfigError where a cluster would train with no compute.storage_path: Ray Train's
    workers on other nodes cannot report checkpoints to the driver's disk."""
    if on_cluster(compute) and compute.storage_path is None:
        raise ConfigError(
            f"compute.storage_path is null but compute.ray_address is "
            f"{compute.ray_address!r}: Ray Train workers on other nodes report checkpoints "
            f"to storage every node reaches; set compute.storage_path to an s3:// URL or "
            f"a folder every node mounts")


def init_ray(compute: ComputeConfig, *, num_cpus: int | None = None) -> None:
    """Connect to `compute.ray_address`, or start (or reuse) a local Ray instance.

    `num_cpus` caps a new local instance (tests use 2); None lets Ray count the cores.
    Local workers import latentforge from the driver's environment (Ray hands them the
    driver's sys.path). A cluster's nodes get the code from their image (infra/Dockerfile) or,
    with `compute.ship_code`, from this driver through `runtime_env` py_modules; either way
    the cluster's Python, ray and torch versions are checked against the driver's first.
    """
    import ray

    if ray.is_initialized():
        check_capacity(compute)
        return
    # No usage-stats prompt or upload attempt from a pipeline run.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if compute.ray_address is not None:
        check_reachable(compute.ray_address)
        runtime_env = cluster_runtime_env(compute)
        log.info("connecting to Ray at %s%s%s", compute.ray_address,
                 " (shipping the latentforge code in runtime_env)" if compute.ship_code else "",
                 f"; forwarding {', '.join(k for k in FORWARDED_ENV if os.environ.get(k))}"
                 if "env_vars" in runtime_env else "")
        try:
            ray.init(address=compute.ray_address, log_to_driver=True,
                     runtime_env=runtime_env or None)
        except (ConnectionError, RuntimeError) as exc:
            # Ray's own lines before it (one a second) may say Unauthenticated: a cluster
            # started with token authentication refuses a driver without its token.
            token = "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else (
                "; if the cluster uses token authentication (`ray start` turns it on), set "
                "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
                "~/.ray/auth_token) here")
            raise ConfigError(f"compute.ray_address {compute.ray_address!r}: could not connect "
                              f"to Ray there ({type(exc).__name__}: {exc}){token}") from exc
        check_cluster(compute)
        check_capacity(compute)
        return
    log.info("starting a local Ray instance")
    # address="local": a fresh instance even if RAY_ADDRESS or a `ray start` cluster exists,
    # since `ray_address: null` promises a local one. Nothing of it listens beyond loopback.
    with loopback_only():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    check_capacity(compute)


def capacity_shortfall(compute: ComputeConfig, nodes: list[dict[str, float]]) -> str | None:
    """How `compute.num_workers` workers of `compute.cpus_per_worker` CPUs (and one GPU each
    with `compute.use_gpu`) do not fit on `nodes` (each node's total resources); None: they
    fit."""
    per_worker = {"CPU": float(compute.cpus_per_worker), "GPU": 1.0 if compute.use_gpu else 0.0}
    fits = sum(int(min(node.get(k, 0.0) // v for k, v in per_worker.items() if v)) for node in
               nodes)
    if fits >= compute.num_workers:
        return None
    cpus = sorted((int(node.get("CPU", 0)) for node in nodes), reverse=True)
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    return (f"compute.num_workers = {compute.num_workers} workers of compute.cpus_per_worker = "
            f"{compute.cpus_per_worker} CPU(s)" + (" and one GPU" if compute.use_gpu else "") +
            f" each, but Ray has {len(nodes)} node(s) with {'+'.join(map(str, cpus)) or 0} "
            f"CPU(s)" + (f" and {gpus} GPU(s)" if compute.use_gpu else "") +
            f", room for {fits}")


def check_capacity(compute: ComputeConfig) -> None:
    """Ray Train and Ray Data wait for every worker's resources without end: where the local
    instance cannot hold them, a ConfigError naming the keys; on a cluster a warning only (an
    autoscaling one adds nodes on demand: infra/ray-cluster.yaml's GPU workers start at 0)."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    short = capacity_shortfall(compute, nodes)
    if not short:
        return
    if not on_cluster(compute):
        raise ConfigError(f"{short}: the workers would wait for it forever; lower "
                          "compute.num_workers or compute.cpus_per_worker" +
                          (", or set compute.use_gpu false" if compute.use_gpu else ""))
    if short not in _warned:  # init_ray runs several times a stage: said once
        _warned.add(short)
        log.warning("%s: Ray waits until the cluster has room (an autoscaling cluster adds "
                    "nodes); if it cannot, stop the run and lower compute.num_workers", short)


_warned: set[str] = set()


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within the body, a new local Ray instance listens on 127.0.0.1 only.

    Ray 2.x resolves a local node's address from 127.0.0.1 to the machine's outward IP and binds
    its servers (GCS, raylet, object manager, workers' gRPC, runtime-env agent) there or on all
    interfaces. Ray's single-machine switch (named for macOS/Windows, where Ray declines
    clusters) makes the node address 127.0.0.1, and every server then binds to it; the raylet
    and the workers take the address from the driver, so the driver's constant is enough
    (tests/test_signals.py lists the sockets). Restored afterwards: the environment variable
    of that switch would stop a later `ray start --address` from joining a cluster. A second
    driver joining such an instance by address needs the switch too
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); a `ray start` cluster needs nothing.
    """
    import ray._private.ray_constants as ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


REACH_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing answers at a `host:port` Ray address.

    ray.init retries an unreachable GCS for minutes; a TCP connect says the same in seconds.
    "auto" and addresses without a port are left to Ray (which finds or refuses them itself).
    """
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"compute.ray_address {address!r}: not host:port ({exc})") from exc
    if not host or port is None:
        return
    try:
        heard = _grpc_handshake(host, port, timeout)
    except OSError as exc:
        within = "" if isinstance(exc, ConnectionRefusedError) else f" within {timeout:.0f} s"
        raise ConfigError(f"compute.ray_address {address!r}: no Ray head answers at "
                          f"{host}:{port}{within} ({exc}); start the cluster "
                          f"(ray start --head / ray up infra/ray-cluster.yaml) or fix the "
                          f"address") from exc
    if heard is not None:  # a port of something else: ray.init would wait there for minutes
        raise ConfigError(f"compute.ray_address {address!r}: {host}:{port} is not a Ray "
                          f"head's GCS port ({heard}); give the port `ray start --head` "
                          f"printed (6379 unless --port said otherwise; the dashboard's 8265 "
                          f"is not it)")


# The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _grpc_handshake(host: str, port: int, timeout: float) -> str | None:
    """None when the server at host:port speaks HTTP/2, as the GCS's gRPC server does (it
    answers the client preface with a SETTINGS frame); else what it did instead. OSError
    when nothing accepts the connection. A TLS-only cluster (RAY_USE_TLS) is not asked."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None
        sock.settimeout(timeout)
        try:
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except TimeoutError:
            return f"it accepted the connection but sent nothing back within {timeout:.0f} s"
        except OSError as exc:  # reset by a server that reads one protocol only
            return f"it dropped the connection ({exc})"
    if len(head) == 9 and head[3] == 0x04:  # a SETTINGS frame: HTTP/2
        return None
    if head[:1] in (b"\x15", b"\x16"):  # a TLS alert or handshake record
        return ("it speaks TLS: a cluster started with RAY_USE_TLS=1 needs RAY_USE_TLS=1 and "
                "its RAY_TLS_* files here too")
    if head.startswith((b"HTTP/", b"<")):  # a status line, or an error page without one
        return "an HTTP/1 server answers there"
    return "it closed the connection" if not head else f"it answered {head[:9]!r}, not HTTP/2"


def package_folder() -> str:
    """A folder holding the whole latentforge package, for runtime_env py_modules.

    An installed wheel has it in site-packages; an editable install maps latentforge.tasks,
    .flows and .models to the card's top-level folders, so those are staged into one
    temporary package (Ray uploads and caches it by content hash).
    """
    import atexit
    import shutil
    import tempfile

    import latentforge
    import latentforge.flows
    import latentforge.models
    import latentforge.tasks

    root = Path(latentforge.__path__[0])
    subs = {"tasks": latentforge.tasks, "flows": latentforge.flows,
            "models": latentforge.models}
    if all(Path(m.__path__[0]).parent == root for m in subs.values()):
        return str(root)
    scratch = tempfile.mkdtemp(prefix="latentforge-code-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # Ray has uploaded it by then
    staged = Path(scratch) / "latentforge"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root, staged, ignore=ignore)
    for name, module in subs.items():
        shutil.copytree(module.__path__[0], staged / name, ignore=ignore, dirs_exist_ok=True)
    return str(staged)


def check_cluster(compute: ComputeConfig, timeout: float = 120.0) -> dict[str, dict[str, str]]:
    """One zero-CPU task per alive node: the same Python, ray and torch as this driver,
    latentforge importable there, and an s3:// `compute.storage_path` reachable from there
    (its endpoint, credentials and bucket, as that node sees them). A ConfigError names the
    node and what differs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from latentforge import storage

    url = compute.storage_path if compute.storage_path and storage.is_s3(compute.storage_path) \
        else None

    def probe(url: str | None, limits: Any) -> dict[str, str]:
        import importlib.util
        import platform

        import ray
        import torch

        found = {"python": platform.python_version(), "ray": ray.__version__,
                 "torch": torch.__version__.split("+")[0],
                 "latentforge": "yes" if importlib.util.find_spec("latentforge") else "no"}
        if url is not None and found["latentforge"] == "yes":
            from latentforge import storage
            from latentforge.errors import DataError

            storage.configure(limits)  # the driver's time limits and retries
            try:  # a missing key is fine (training writes it); no bucket, no credentials
                storage.exists(url)  # or no answer is not
                found["storage"] = "ok"
            except Exception as exc:  # noqa: BLE001 (reported by the driver, naming the node)
                found["storage"] = str(exc) if isinstance(exc, DataError) else \
                    f"{type(exc).__name__}: {exc}"
        return found

    remote = ray.remote(num_cpus=0)(probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    limits = storage.current_config()
    refs = {n["NodeID"]: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(url, limits) for n in nodes}
    found = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout), strict=True))
    here = {k: v for k, v in probe(None, None).items() if k != "latentforge"}  # the driver
    for node, theirs in found.items():
        differ = [f"{k} {theirs[k]} on the cluster, {v} here" for k, v in here.items()
                  if theirs[k] != v]
        if differ:
            raise ConfigError(f"compute.ray_address {compute.ray_address!r}: node {node[:12]} "
                              f"runs {'; '.join(differ)}; run the driver in the cluster's image "
                              f"(infra/Dockerfile) or install matching versions")
        if theirs["latentforge"] != "yes":
            raise ConfigError(f"compute.ray_address {compute.ray_address!r}: node {node[:12]} "
                              f"cannot import latentforge; set compute.ship_code: true or run "
                              f"the cluster from infra/Dockerfile")
        if theirs.get("storage", "ok") != "ok":
            raise ConfigError(f"compute.storage_path: node {node[:12]} cannot reach it: "
                              f"{theirs['storage']} (a node without an endpoint or region of "
                              f"its own takes this driver's; credentials come from each "
                              f"node's own environment, instance profile or ~/.aws)")
    log.info("Ray cluster: %d node(s), python %s, ray %s, torch %s on each", len(found),
             here["python"], here["ray"], here["torch"])
    return found


def node_id() -> str:
    """The Ray node this process runs on (the driver's, or an actor's / a worker's)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def record_nodes(tracker: Any, what: str, nodes: Iterable[str]) -> list[str]:
    """Tag the stage's MLflow run with the Ray nodes `what` (cache actors, sampling actors,
    Ray Train workers) ran on: `latentforge.ray_nodes.<what>` = comma-separated node ids."""
    ids = sorted(set(nodes))
    if ids:
        tracker.set_tags({f"latentforge.ray_nodes.{what}": ",".join(ids)})
    return ids


def start_ray_data(compute: ComputeConfig) -> None:
    """Connect to (or start) Ray and import Ray Data: start-up that is not the work's time."""
    import ray.data  # noqa: F401  (pulls in pyarrow and pandas: a second or two)

    init_ray(compute)  # which checks that the actors fit


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
