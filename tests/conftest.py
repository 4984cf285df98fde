"""Shared fixtures: real Prefect (test harness), real S3 protocol (moto server on 127.0.0.1),
real git + DVC projects in temporary folders, MLflow on SQLite inside each project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_AUTHOR_NAME", "LatentForge Tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@latentforge.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "LatentForge Tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@latentforge.invalid")
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# A `latentforge` command without PREFECT_API_URL starts a server per command here, not the
# background server that outlives it (tests/test_prefect_background.py tests that one, in a
# temporary PREFECT_HOME).
os.environ["LATENTFORGE_PREFECT_SERVER"] = "temporary"


@pytest.fixture
def single_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on busy 2-core machines the
    spinning worker threads make tiny-model tests ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database and API server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol endpoint (moto's server) on 127.0.0.1, with dummy credentials in the
    standard AWS environment variables, which is where s3fs, boto3, DVC and MLflow read them."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; returns its name."""
    import boto3
    import s3fs

    name = "lf-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def dvc_repo(root: Path, files: dict[str, bytes] | None = None) -> Path:
    """A new git + DVC repository at `root` (no LatentForge project), with `files` written
    and `dvc add`ed."""
    root.mkdir(parents=True)
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    for name, data in (files or {}).items():
        (root / name).write_bytes(data)
        subprocess.run([sys.executable, "-m", "dvc", "add", "-q", name], cwd=root, check=True)
    return root


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    from latentforge import paths

    produced = [str(p) for s in paths.STAGES.values() for p in (*s.outs, *s.metrics, *s.plots)]
    skip = ("tests/", "bench/", "dvc.lock", str(paths.STATE), *produced)
    return [f for f in out if not f.startswith(skip) and (REPO / f).is_file()]


@pytest.fixture
def make_project(tmp_path):
    """Copy the project (what git tracks or would track) into a new git + DVC repository."""
    counter = iter(range(100))

    def make(params: dict | None = None) -> Path:
        root = tmp_path / f"project{next(counter)}"
        for rel in project_files():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest)
        if params is not None:  # as `latentforge run --params FILE` would write it
            from latentforge.config import build_params, write_params_file

            write_params_file(build_params(params), root / "params.yaml")
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        if not (root / ".dvc").is_dir():
            subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)
        return root

    return make


from conftest_ray import ray_local  # noqa: E402, F401  (session-scoped local Ray instance)
