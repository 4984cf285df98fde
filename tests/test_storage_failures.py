"""S3 failures end in one line, in bounded time: an endpoint that accepts connections but never
answers (a socket server on 127.0.0.1 that holds every connection), missing credentials and a
missing bucket (moto's S3 server), and the same silent endpoint under `latentforge stage prepare`.

Real components only: s3fs, aiobotocore and botocore talk to real sockets; nothing is patched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from latentforge import paths, storage
from latentforge.config import StorageConfig
from latentforge.errors import DataError

SECRET = "silent-endpoint-secret-do-not-print"
SMALL = StorageConfig(connect_timeout=1, read_timeout=1, retries=1)
# The three calls `prepare` makes on a source URL (sources.py).
each_prepare_call = pytest.mark.parametrize(
    "call", [storage.read_bytes, storage.exists, storage.list_files],
    ids=["read_bytes", "exists", "list_files"])


@dataclass
class SilentEndpoint:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte back."""

    url: str
    held: list[socket.socket] = field(default_factory=list)


@pytest.fixture
def silent_endpoint(monkeypatch) -> Iterator[SilentEndpoint]:
    """A silent endpoint in AWS_ENDPOINT_URL, with dummy credentials; storage settings and
    s3fs's instance cache (whose clients keep the endpoint they started with) reset after."""
    import s3fs

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.settimeout(0.2)
    endpoint = SilentEndpoint(f"http://127.0.0.1:{listener.getsockname()[1]}")
    stop = threading.Event()

    def hold_connections() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            endpoint.held.append(conn)

    thread = threading.Thread(target=hold_connections, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "silent-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(StorageConfig())
    stop.set()
    thread.join()
    for conn in [*endpoint.held, listener]:
        conn.close()


def assert_one_safe_line(message: str, url: str) -> None:
    assert message.startswith(f"{url}: ") and "\n" not in message, message
    assert SECRET not in message and "silent-key-id" not in message, message
    assert "127.0.0.1" not in message, message  # the endpoint is a value too


@each_prepare_call
def test_silent_endpoint_fails_after_the_configured_attempts(silent_endpoint, call):
    storage.configure(SMALL)
    url = "s3://bucket/x"
    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        call(url)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "no answer within 1 s after 2 attempts" in message, message
    assert "AWS_ENDPOINT_URL" in message.split("; unset: ")[0]  # listed as set
    assert_one_safe_line(message, url)
    # One connection per attempt: s3fs's own retry loop does not multiply botocore's.
    assert len(silent_endpoint.held) == 1 + SMALL.retries
    from botocore.exceptions import ReadTimeoutError

    assert isinstance(raised.value.__cause__, ReadTimeoutError)  # kept for debug logs


def test_endpoint_that_never_accepts_fails_after_the_connect_timeout(monkeypatch):
    import s3fs

    # Linux drops connection requests to a listener whose accept queue is full, so with a
    # backlog of 0 and the queue filled, further connects wait until the client gives up.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "silent-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(SMALL)
    try:
        started = time.monotonic()
        with pytest.raises(DataError) as raised:
            storage.exists("s3://bucket/x")
        elapsed = time.monotonic() - started
    finally:
        storage.configure(StorageConfig())
        s3fs.S3FileSystem.clear_instance_cache()
        for sock in [*fillers, listener]:
            sock.close()
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert "no connection within 1 s after 2 attempts" in str(raised.value)
    assert_one_safe_line(str(raised.value), "s3://bucket/x")


@pytest.mark.slow
def test_silent_endpoint_with_default_settings_fails_within_a_minute(silent_endpoint):
    defaults = StorageConfig()
    storage.configure(defaults)
    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        storage.read_bytes("s3://bucket/x")
    elapsed = time.monotonic() - started
    print(f"silent endpoint, default storage settings: DataError after {elapsed:.1f} s")
    assert elapsed < 60, f"took {elapsed:.1f} s"
    expected = f"no answer within {defaults.read_timeout:g} s after {1 + defaults.retries} attempts"
    assert expected in str(raised.value)
    assert len(silent_endpoint.held) == 1 + defaults.retries


@pytest.fixture
def without_credentials(s3_bucket, tmp_path, monkeypatch) -> Iterator[str]:
    """An object in a moto bucket, then no credentials anywhere botocore looks: no AWS_*
    variables but the endpoint and region, empty credentials and config files, no instance
    metadata lookup. Yields the object's URL."""
    import s3fs

    url = f"s3://{s3_bucket}/imgs/a.png"
    storage.write_bytes_atomic(url, b"readable with credentials")
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        if name not in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(name)
    for name, file in (("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
                       ("AWS_CONFIG_FILE", "config")):
        (tmp_path / file).touch()
        monkeypatch.setenv(name, str(tmp_path / file))
    # On a cloud machine the metadata service could hand out the machine's own credentials.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    yield url
    s3fs.S3FileSystem.clear_instance_cache()


@each_prepare_call
def test_missing_credentials_name_the_url_and_the_settings_looked_at(without_credentials, call):
    # botocore refuses to send an unsigned request when it finds no credentials, so this fails
    # before moto (which would accept unsigned requests) sees anything.
    with pytest.raises(DataError) as raised:
        call(without_credentials)
    message = str(raised.value)
    assert f"{without_credentials}: no credentials found; " in message, message
    set_part, unset_part = message.split("; unset: ")
    for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "AWS_SHARED_CREDENTIALS_FILE (file exists)", "AWS_CONFIG_FILE (file exists)"):
        assert name in set_part, message
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        assert name in unset_part and name not in set_part, message
    assert "\n" not in message and "127.0.0.1" not in message, message


def test_missing_bucket_is_an_error_and_a_missing_key_is_not_there(s3_bucket):
    assert not storage.exists(f"s3://{s3_bucket}/no/such/key")
    assert storage.list_files(f"s3://{s3_bucket}/no/such/prefix") == []
    for call in (storage.exists, storage.read_bytes):
        with pytest.raises(DataError, match=r"^s3://lf-no-such-bucket/x: no such bucket; "):
            call("s3://lf-no-such-bucket/x")


def _run_with_source(root, url: str, *command: str) -> tuple[float, subprocess.CompletedProcess]:
    """`latentforge COMMAND` (default `run`) with prepare.path at `url` and 1 s storage limits
    with one retry, as -S gives them; (seconds, the finished process)."""
    overrides = [f"prepare.path={url}", "prepare.source=folder", "storage.connect_timeout=1",
                 "storage.read_timeout=1", "storage.retries=1"]
    argv = [sys.executable, "-m", "latentforge", *(command or ("run",))]
    argv += [arg for override in overrides for arg in ("-S", override)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    return time.monotonic() - started, proc


@pytest.mark.slow
def test_prepare_on_a_silent_endpoint_fails_in_one_line_and_leaves_nothing(make_project,
                                                                          silent_endpoint):
    root = make_project()
    url = "s3://bucket/imgs"
    elapsed, proc = _run_with_source(root, url, "stage", "prepare", "--no-dvc")
    print(f"latentforge stage prepare on a silent endpoint: exit {proc.returncode} after "
          f"{elapsed:.1f} s")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    # Python, MLflow's first database migration and the 2 x 1 s of S3 attempts: 10 s on an idle
    # machine, 29 s on a loaded 2-core one. That the -S settings reached s3fs shows in the count.
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert len(silent_endpoint.held) == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {url}: no answer within 1 s after 2 attempts"), errors
    assert SECRET not in proc.stdout + proc.stderr
    # neither data/prepared nor atomic_dir's .prepared.tmp-* (pathlib's glob matches dotfiles)
    assert not list((root / paths.PREPARED.parent).glob(f"*{paths.PREPARED.name}*"))
    assert not (root / paths.metrics_file("prepare")).exists()


@pytest.mark.slow
def test_run_with_a_source_on_a_silent_endpoint_fails_in_one_line_before_dvc(make_project,
                                                                           silent_endpoint):
    """dvc.yaml lists prepare.path as the prepare stage's input, so DVC's status would open
    the URL with its own S3 client, unbounded: `latentforge run` looks first, bounded."""
    root = make_project()
    url = "s3://bucket/imgs"
    elapsed, proc = _run_with_source(root, url)
    print(f"latentforge run, source on a silent endpoint: exit {proc.returncode} after "
          f"{elapsed:.1f} s")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert len(silent_endpoint.held) == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {url}: no answer within 1 s after 2 attempts"), proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not (root / "dvc.lock").exists() and not (root / paths.PREPARED).exists()


@pytest.mark.slow
def test_run_with_a_source_and_no_credentials_names_the_settings(make_project,
                                                                 without_credentials):
    root = make_project()
    url = without_credentials.rsplit("/", 1)[0]
    elapsed, proc = _run_with_source(root, url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {url}: no credentials found; AWS settings looked at"), proc.stderr


@pytest.mark.slow
def test_dvc_push_to_a_silent_endpoint_is_bounded_by_the_storage_timeouts(tmp_path,
                                                                          silent_endpoint):
    """The pipeline's `dvc push` writes storage.connect_timeout/read_timeout into the remote:
    1 s each ended it after 15 s here, against 81 s at DVC's and botocore's defaults."""
    from conftest import dvc_repo

    from latentforge import dvcops
    from latentforge.errors import LatentForgeError

    root = dvc_repo(tmp_path / "p", {"data.bin": os.urandom(1000)})
    started = time.monotonic()
    with pytest.raises(LatentForgeError, match=r"^dvc push to s3://bucket/dvc failed"):
        dvcops.push("s3://bucket/dvc", root, on_line=lambda line: None, timeouts=(1, 1))
    elapsed = time.monotonic() - started
    print(f"dvc push to a silent endpoint, 1 s timeouts: failed after {elapsed:.1f} s")
    assert elapsed < 50, f"took {elapsed:.1f} s"


def test_the_source_check_refuses_a_missing_source_only_where_prepare_runs(s3_bucket):
    """`latentforge run`'s look at an s3:// prepare.path before DVC's status: a key or bucket
    that is not there refuses a run of prepare in one line (DVC said only "dependency ...
    does not exist", after params.yaml was rewritten); for a run of later stages it is DVC's
    to report as a deleted input. Other schemes are not looked at here."""
    from latentforge import dvcops
    from latentforge.config import build_params
    from latentforge.errors import ConfigError

    for path, says in ((f"s3://{s3_bucket}/no/such/key", "no such key or prefix"),
                       ("s3://lf-no-such-bucket/imgs", "no such bucket (lf-no-such-bucket)")):
        params = build_params({"prepare": {"source": "folder", "path": path}})
        dvcops.check_source(params, prepare_runs=False)
        with pytest.raises(ConfigError) as refused:
            dvcops.check_source(params)
        assert str(refused.value) == (f"prepare.path = {path!r}: {says} at that endpoint; give "
                                      "the folder (prefix) or file the folder source reads")
    dvcops.check_source(build_params({"prepare": {"source": "folder", "path": "gs://b/imgs"}}))


def test_a_failed_push_is_one_line_with_dvcs_reason(tmp_path, s3_server):
    from conftest import dvc_repo

    from latentforge import dvcops
    from latentforge.errors import LatentForgeError

    root = dvc_repo(tmp_path / "p", {"data.bin": os.urandom(1000)})
    with pytest.raises(LatentForgeError) as failed:
        dvcops.push("s3://lf-no-such-bucket-push/dvc", root, on_line=lambda line: None)
    line = str(failed.value)
    assert line.startswith("dvc push to s3://lf-no-such-bucket-push/dvc failed: ") and \
        "bucket does not exist" in line, line
    assert "\n" not in line and "Having any troubles" not in line


def test_an_s3_artifact_upload_failing_mid_run_is_one_line(monkeypatch, tmp_path):
    from latentforge import tracking
    from latentforge.config import TrackingConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "refused-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "report.json").write_text("{}")
    cfg = TrackingConfig(experiment="s3art", artifact_location="s3://bkt/ml")
    with pytest.raises(DataError) as raised, \
            tracking.start_run(cfg, "prepare", {}, root=tmp_path) as tracker:
        tracker.log_artifact(tmp_path / "report.json")
    line = str(raised.value)
    assert line.startswith("s3://bkt/ml/") and "\n" not in line and SECRET not in line, line


def test_train_storage_the_driver_cannot_reach_is_refused_before_any_work(without_credentials,
                                                                         tmp_path):
    """The nodes were checked, the driver was not: workers trained and wrote checkpoints to
    S3, then the driver's first copy-back died in a botocore traceback, having none."""
    from latentforge.config import load_params
    from latentforge.errors import ConfigError
    from latentforge.preflight import check_environment, check_params

    bucket = without_credentials.split("/")[2]
    cluster = ["compute.ray_address=10.0.0.1:6379", "prepare.source=digits",
               "tracking.enabled=false"]
    params = load_params(None, [*cluster, f"compute.storage_path=s3://{bucket}/ray"])
    check_params(params, None)  # the parameters are fine: the look waits until work runs
    with pytest.raises(ConfigError) as refused:
        check_environment(params, ["judge"])
    assert str(refused.value).startswith(
        f"compute.storage_path: this machine (the driver: it copies each checkpoint back from "
        f"there) cannot reach it: s3://{bucket}/ray: no credentials found; ")
    check_environment(params, ["prepare", "cache", "rl", "evaluate"])  # no Ray Train there
    # In-process training (one worker, no cluster) never reads it: not looked at, not made
    local_run = ["compute.num_workers=1", "prepare.source=digits", "tracking.enabled=false"]
    check_environment(load_params(None, [*local_run, f"compute.storage_path=s3://{bucket}/r"]),
                      None)
    check_environment(load_params(None, [*local_run,
                                         f"compute.storage_path={tmp_path / 'unused'}"]), None)
    assert not (tmp_path / "unused").exists()

    with pytest.raises(ConfigError, match="compute.storage_path is null but compute.ray_address"):
        check_params(load_params(None, cluster), None)  # refused before prepare, not in judge
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    local = load_params(None, [*cluster, f"compute.storage_path={blocker / 'ray'}"])
    with pytest.raises(ConfigError) as refused:
        check_environment(local, ["tokenizer"])
    assert str(refused.value).startswith(
        f"compute.storage_path = '{blocker / 'ray'}': this machine cannot make or write that "
        f"folder (NotADirectoryError: ")
    writable = load_params(None, [*cluster, f"compute.storage_path={tmp_path / 'ray'}"])
    check_environment(writable, ["generator"])
    assert (tmp_path / "ray").is_dir()
