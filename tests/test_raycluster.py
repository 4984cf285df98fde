"""How work is cut into Ray Data actor calls; how a cluster is reached and checked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentforge.errors import ConfigError
from latentforge.raycluster import block_sizes, check_reachable, package_folder


@pytest.mark.parametrize(("n", "workers"), [(79, 1), (79, 2), (100, 4), (5, 1), (1, 1), (2, 3)])
def test_block_sizes_cover_every_item_in_even_blocks_then_shrinking_ones(n, workers):
    sizes = block_sizes(n, workers, calls_per_actor=8)
    assert sum(sizes) == n and min(sizes) >= 1
    assert max(sizes) == -(-n // (8 * workers))  # no block above the even share
    assert sizes == sorted(sizes, reverse=True)  # full blocks first, the tail shrinks
    assert sizes[-1] == 1  # the last call, which nothing overlaps, is one item


def test_block_sizes_of_the_default_cache_run():
    # 20k images in 256-image batches on one actor: 7 full blocks of 10, then 5, 2, 1, 1
    # (the last call was a full 10-batch block before: tiny encoder, the tail after it measured
    # 70-90 ms then, 45-58 ms now).
    assert block_sizes(79, 1, calls_per_actor=8) == [10] * 7 + [5, 2, 1, 1]
    assert block_sizes(0, 2, calls_per_actor=8) == []


def test_an_unreachable_ray_address_fails_fast_naming_it():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # In a fresh process: this one may hold the session's local Ray instance already.
    code = ("from latentforge.config import ComputeConfig; "
            "from latentforge.raycluster import init_ray; "
            f"init_ray(ComputeConfig(ray_address='127.0.0.1:{port}'))")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert time.monotonic() - started < 30
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "no Ray head answers" in out.stderr
    # A host that swallows packets (TEST-NET-1, RFC 5737): bounded by the connect timeout.
    started = time.monotonic()
    with pytest.raises(ConfigError, match="192.0.2.1:6379"):
        check_reachable("ray://192.0.2.1:6379", timeout=2)
    assert time.monotonic() - started < 30
    with pytest.raises(ConfigError, match="not host:port"):
        check_reachable("127.0.0.1:notaport")


def test_a_port_of_another_service_is_refused_fast_and_the_gcs_port_passes(ray_local):
    """A mistyped port where something else listens (the dashboard, an S3 endpoint) passed
    the TCP check, and ray.init then waited there for minutes."""
    import http.server
    import threading

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        for port, says in ((web.server_address[1], "an HTTP/1 server answers there"),
                           (silent.getsockname()[1], "sent nothing back within 2 s")):
            started = time.monotonic()
            with pytest.raises(ConfigError) as refused:
                check_reachable(f"127.0.0.1:{port}", timeout=2)
            assert time.monotonic() - started < 10
            assert f"127.0.0.1:{port} is not a Ray head's GCS port (" in str(refused.value)
            assert says in str(refused.value)
    finally:
        web.shutdown()
        silent.close()
    check_reachable(ray_local.get_runtime_context().gcs_address, timeout=5)  # a real GCS


def test_a_ray_client_address_is_refused_saying_what_to_give():
    from latentforge.config import load_params

    with pytest.raises(ConfigError) as refused:
        load_params(None, ["compute.ray_address=ray://head:10001"])
    message = str(refused.value)
    assert "compute: ray_address = 'ray://head:10001' is a Ray Client address" in message
    assert "ray start --address HEAD:6379" in message and "\n" not in message


def test_the_code_shipped_in_runtime_env_is_the_whole_package(tmp_path):
    folder = Path(package_folder())
    assert folder.name == "latentforge"
    for module in ("raycluster.py", "tasks/cache.py", "models/tokenizer.py", "flows/__init__.py"):
        assert (folder / module).is_file(), module
    assert not list(folder.rglob("__pycache__"))
    # ...and it imports from there, without the installed package's path mapping.
    code = (f"import sys; sys.path.insert(0, {str(folder.parent)!r}); "
            "import latentforge.tasks.cache as c; print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(folder))


def test_the_cluster_check_probes_every_node_with_python_ray_torch(ray_local):  # noqa: F811
    import platform

    import ray
    import torch

    from latentforge.config import ComputeConfig
    from latentforge.raycluster import check_cluster

    found = check_cluster(ComputeConfig(ray_address="local"))
    assert set(found) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for versions in found.values():
        assert versions == {"python": platform.python_version(), "ray": ray.__version__,
                            "torch": torch.__version__.split("+")[0], "latentforge": "yes"}


def test_a_local_ray_instance_listens_on_loopback_only(ray_local):  # noqa: F811
    """raycluster.init_ray's local instance: its GCS, raylet and agents listen on loopback
    only (the default pipeline starts none; several workers or a sampling pool start one)."""
    import psutil
    from test_signals import is_loopback

    ray_names = ("gcs_server", "raylet", "dashboard", "agent", "ray::")
    listening = {}
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        try:
            name = " ".join(psutil.Process(conn.pid).cmdline())[:120]
        except psutil.Error:
            continue
        if any(n in name for n in ray_names):
            listening[(conn.laddr.ip, conn.laddr.port)] = name
    assert any("gcs_server" in n or "raylet" in n for n in listening.values()), listening
    outside = {k: v for k, v in listening.items() if not is_loopback(k[0])}
    assert not outside, f"listening beyond loopback: {outside}"


def test_the_cluster_job_carries_the_drivers_s3_settings_as_defaults_only(monkeypatch):
    """The kernel choice travels as the driver set it; the S3 endpoint and region are filled
    in on a worker only where its node has none of its own (the node's wins); credentials
    never travel. (tests/test_cluster.py runs a pipeline on a node without an endpoint.)"""
    from latentforge import raycluster
    from latentforge.config import ComputeConfig

    for name in raycluster.FORWARDED_ENV + (raycluster.DRIVER_DEFAULTS_VAR,):
        monkeypatch.delenv(name, raising=False)
    assert raycluster.cluster_runtime_env(ComputeConfig()) == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://driver:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-sent")
    monkeypatch.setenv("LATENTFORGE_FP32_LINEAR", "blas")
    env = raycluster.cluster_runtime_env(ComputeConfig())
    assert env["worker_process_setup_hook"] == "latentforge.raycluster.adopt_driver_env"
    assert "never-sent" not in str(env)
    assert env["env_vars"]["LATENTFORGE_FP32_LINEAR"] == "blas"
    # On a worker: its node has a region of its own, no endpoint.
    monkeypatch.setenv(raycluster.DRIVER_DEFAULTS_VAR,
                       env["env_vars"][raycluster.DRIVER_DEFAULTS_VAR])
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")
    raycluster.adopt_driver_env()
    assert os.environ["AWS_ENDPOINT_URL"] == "http://driver:9000"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-2"


def test_workers_that_do_not_fit_are_counted_per_node():
    from latentforge.config import ComputeConfig
    from latentforge.raycluster import capacity_shortfall

    two_nodes = [{"CPU": 2.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert capacity_shortfall(ComputeConfig(num_workers=2, cpus_per_worker=2), two_nodes) is None
    # 5 CPUs in all, but a 3-CPU worker fits on one node only.
    assert capacity_shortfall(ComputeConfig(num_workers=2, cpus_per_worker=3), two_nodes) == (
        "compute.num_workers = 2 workers of compute.cpus_per_worker = 3 CPU(s) each, but Ray "
        "has 2 node(s) with 3+2 CPU(s), room for 1")
    assert capacity_shortfall(ComputeConfig(num_workers=1, use_gpu=True), two_nodes) is None
    assert capacity_shortfall(ComputeConfig(num_workers=2, use_gpu=True), two_nodes).endswith(
        "and one GPU each, but Ray has 2 node(s) with 3+2 CPU(s) and 1 GPU(s), room for 1")


@pytest.mark.parametrize("compute, key", [
    ({"num_workers": 2, "cpus_per_worker": 2}, "compute.cpus_per_worker = 2"),
    ({"num_workers": 3}, "compute.num_workers = 3"),
    ({"num_workers": 3, "use_gpu": True}, "set compute.use_gpu false"),
])
def test_workers_the_local_instance_cannot_hold_are_refused_not_waited_for(
        ray_local, compute, key, caplog):  # noqa: F811
    """Ray Train and Ray Data wait for every worker's CPUs without end (the judge stage hung
    with 2 workers of 2 CPUs on a 2-CPU machine)."""
    from latentforge.config import ComputeConfig
    from latentforge.raycluster import check_capacity, init_ray, start_ray_data

    for start in (init_ray, start_ray_data):
        with pytest.raises(ConfigError, match="the workers would wait for it forever") as err:
            start(ComputeConfig(**compute))
        assert key in str(err.value) and "room for " in str(err.value)
    init_ray(ComputeConfig(num_workers=2))  # fits: 2 CPUs
    # A cluster may add nodes (its GPU workers may start at 0): said, not refused.
    with caplog.at_level("WARNING", logger="latentforge.raycluster"):
        for _ in range(2):  # init_ray runs several times a stage: said once
            check_capacity(ComputeConfig(**compute, ray_address="auto"))
    assert caplog.text.count("Ray waits until the cluster has room") == 1


def test_each_node_looks_at_an_s3_storage_path_as_it_sees_it(ray_local, s3_server):
    """check_cluster's probe runs on every node (here the local instance's one) and a node
    that cannot reach compute.storage_path is named in one line."""
    from latentforge.config import ComputeConfig
    from latentforge.raycluster import check_cluster

    with pytest.raises(ConfigError) as refused:
        check_cluster(ComputeConfig(ray_address="auto",
                                    storage_path="s3://lf-no-such-bucket-here/ray"))
    message = str(refused.value)
    # The local instance's workers have the environment of when it started: with the S3
    # server's settings (no such bucket), or, started before it, without (no credentials).
    assert message.startswith("compute.storage_path: node ") and \
        "cannot reach it: s3://lf-no-such-bucket-here/ray: " in message, message


def test_a_lost_worker_ends_training_in_one_line_saying_where_a_rerun_resumes(tmp_path):
    """A node lost mid-training ended the stage with 16 lines of Ray's wrapper around gloo's
    socket error; now one line: what was lost, the innermost error, the step a rerun takes."""
    from latentforge.errors import LatentForgeError
    from latentforge.training import describe_train_failure

    class TrainingFailedError(RuntimeError):  # Ray Train's wrapper, by name
        pass

    gloo = TrainingFailedError(
        "Training failed due to worker errors:\n[Rank 1]\nTraceback (most recent call last):\n"
        '  File "loop.py", line 3, in step\nRuntimeError: [gloo/transport/tcp/pair.cc:537] '
        "Read error [127.0.0.1]:60641: Connection reset by peer")
    line = str(describe_train_failure(gloo, [(20, tmp_path / "a"), (40, tmp_path / "b")]))
    assert line == ("Ray Train stopped (a worker, its node or the link between workers was "
                    "lost): RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error "
                    "[127.0.0.1]:60641: Connection reset by peer; a rerun resumes from step 40, "
                    "the last checkpoint copied here")
    other = str(describe_train_failure(ValueError("bad shape"), []))
    assert other == ("Ray Train stopped (run with -v for the traceback): ValueError: bad shape; "
                     "no checkpoint reached this machine: a rerun starts afresh")
    ours = ConfigError("compute.storage_path: ...")
    assert describe_train_failure(ours, []) is ours  # already one line
    assert isinstance(describe_train_failure(gloo, []), LatentForgeError)
