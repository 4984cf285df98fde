"""Read and write local paths and fsspec URLs (s3:// through s3fs), atomically, with sha256.

Local paths go through pathlib; anything with `://` through fsspec, imported lazily. S3
endpoint and credentials come only from the standard AWS environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/...): never from params, never logged.

Timeouts and retries come from `storage.*` params (`configure`). Left to s3fs and botocore's
own defaults, an endpoint that accepts connections but never answers held one `exists` call
for 412 s: s3fs tries each call 5 times, botocore tries each of those 5 times, and each of
the 25 attempts waits 15 s for an answer. Here botocore alone retries (its "standard" mode
also covers throttling and 5xx answers) and s3fs tries once, so a dead endpoint fails after
(1 + storage.retries) x storage.read_timeout: measured 32 s with the defaults.
The price: a GET whose body breaks off half way is not retried; the stage fails and can be
rerun. Failures on a URL become one DataError line naming the URL, what went wrong and which
AWS settings were looked at (set or unset, never their values).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentforge.errors import DataError

if TYPE_CHECKING:
    from latentforge.config import StorageConfig

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# The AWS environment variables botocore reads for S3 (endpoint, credentials, profile,
# region); failure messages say which are set, never their values.
AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
AWS_FILES = {
    "AWS_SHARED_CREDENTIALS_FILE": "~/.aws/credentials",
    "AWS_CONFIG_FILE": "~/.aws/config",
}

# Module-wide rather than passed along: the source readers and every stage's writers call
# this module with paths only, and a process runs one stage, which calls `configure` first.
# None means StorageConfig's defaults (a process that never ran a stage, e.g. a test).
_config: StorageConfig | None = None


def configure(cfg: StorageConfig) -> None:
    """Use `cfg`'s timeouts and retries for every URL this process opens from now on."""
    global _config
    _config = cfg


def current_config() -> StorageConfig:
    if _config is None:
        from latentforge.config import StorageConfig

        return StorageConfig()
    return _config


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def is_s3(url: str) -> bool:
    return url.split("://", 1)[0] in ("s3", "s3a")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; S3 ones with `configure`d time limits."""
    import fsspec

    if not is_s3(url):
        return fsspec.core.url_to_fs(url)
    cfg = current_config()
    # fsspec caches one instance per distinct set of options, so other settings get their own.
    fs, fs_path = fsspec.core.url_to_fs(
        url,
        config_kwargs={
            "connect_timeout": cfg.connect_timeout,
            "read_timeout": cfg.read_timeout,
            "retries": {"total_max_attempts": 1 + cfg.retries, "mode": "standard"},
        },
    )
    fs.retries = 1  # s3fs's own retry loop (not an __init__ option); botocore retries instead
    return fs, fs_path


def error_code(exc: BaseException) -> str | None:
    """The S3 error code ("NoSuchBucket", "AccessDenied", ...) behind an exception, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        seen = seen.__cause__ or seen.__context__
    return None


def _problem(exc: BaseException) -> str | None:
    """What went wrong, in words that hold no endpoint, key or secret; None: not a storage
    failure (the caller re-raises it unchanged)."""
    from botocore import exceptions as boto

    cfg = current_config()
    attempts = f"{1 + cfg.retries} attempt{'s' if cfg.retries else ''}"
    code = error_code(exc)
    if isinstance(exc, boto.ConnectTimeoutError):
        return (
            f"no connection within {cfg.connect_timeout:g} s after {attempts} "
            "(storage.connect_timeout, storage.retries)"
        )
    if isinstance(exc, boto.ReadTimeoutError):
        return (
            f"no answer within {cfg.read_timeout:g} s after {attempts} "
            "(storage.read_timeout, storage.retries)"
        )
    if isinstance(exc, boto.EndpointConnectionError):
        return f"could not connect to the endpoint after {attempts}"
    if isinstance(exc, boto.ConnectionClosedError):
        return f"the endpoint closed the connection without answering after {attempts}"
    if isinstance(exc, boto.NoCredentialsError):
        return "no credentials found"
    if isinstance(exc, boto.PartialCredentialsError):
        return "incomplete credentials (a key id without its secret, or the reverse)"
    if isinstance(exc, boto.ProfileNotFound):
        return "the AWS profile named by AWS_PROFILE is not in the config files"
    if isinstance(exc, boto.NoRegionError):
        return "no region set"
    if isinstance(exc, boto.BotoCoreError):
        return f"{type(exc).__name__} from botocore"
    if isinstance(exc, PermissionError):
        return f"access denied ({code or 'no S3 error code'})"
    if isinstance(exc, FileNotFoundError):
        return "no such bucket" if code == "NoSuchBucket" else "not found"
    if code is not None:
        return f"the endpoint answered {code}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return None


def _aws_settings() -> str:
    """Which AWS settings are set (names only, never values), for failure messages."""
    set_: list[str] = []
    unset: list[str] = []
    for name in AWS_VARIABLES:
        (set_ if os.environ.get(name) else unset).append(name)
    for name, default in AWS_FILES.items():
        path = os.environ.get(name)
        found = Path(os.path.expanduser(path or default)).is_file()
        if path:
            set_.append(f"{name} ({'file exists' if found else 'no such file'})")
        else:
            unset.append(f"{name} ({default} {'exists' if found else 'missing'})")
    return (
        f"AWS settings looked at (values not shown): set: {', '.join(set_) or 'none'}; "
        f"unset: {', '.join(unset) or 'none'}"
    )


def another_clients_error(exc: BaseException, what: str) -> str | None:
    """One line for an S3 failure of a client other than ours (MLflow's boto3 reading a
    model's artifacts: our limits and retries are not its own), naming `what` was read and
    the AWS settings looked at; None for any other error."""
    from botocore import exceptions as boto

    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, boto.BotoCoreError | boto.ClientError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    if isinstance(seen, boto.EndpointConnectionError | boto.ConnectionClosedError):
        problem = "could not connect to the S3 endpoint"
    elif isinstance(seen, boto.ConnectTimeoutError | boto.ReadTimeoutError):
        problem = "the S3 endpoint did not answer in time"
    else:
        problem = _problem(seen) or f"{type(seen).__name__} from botocore"
    return f"{what}: {problem}; {_aws_settings()}"


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Raise a failure of the S3 calls inside as one DataError line naming `url`; other
    URLs' errors pass through as their fsspec backend raised them."""
    try:
        yield
    except Exception as exc:
        problem = _problem(exc) if is_s3(url) else None
        if problem is None:
            raise
        raise DataError(f"{url}: {problem}; {_aws_settings()}") from exc


def join(base: str | os.PathLike[str], *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file or URL, streamed."""
    digest = hashlib.sha256()
    with open_binary(path) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def open_binary(path: str | os.PathLike[str]) -> Iterator[Any]:
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        # Only this module's own readers use the file, so what fails inside is a read.
        with storage_errors(str(path)), fs.open(fs_path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open_binary(path) as f:
        return f.read()


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether a local path or URL exists. An S3 URL in a bucket the endpoint does not have,
    or one that cannot be checked (no answer, no credentials), raises DataError instead."""
    if not is_url(path):
        return Path(path).exists()
    fs, fs_path = filesystem(str(path))
    # Not fs.exists: for a bare bucket s3fs answers False to any failure, a timeout included.
    with storage_errors(str(path)):
        try:
            fs.info(fs_path)
        except FileNotFoundError as exc:
            if error_code(exc) == "NoSuchBucket":
                raise
            return False
    return True


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Write `data` so that readers see the old file or the whole new one; return its sha256.

    Local: a temporary file in the same folder, fsync, rename. S3: a single PUT or a completed
    multipart upload, which S3 makes visible only when whole.
    """
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        with storage_errors(str(path)), fs.open(fs_path, "wb") as f:
            f.write(data)
        return sha256_bytes(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600 whatever the umask: give it the mode open() would, so
        # that teammates, another uid in a container and web servers can read the outputs. A
        # file being replaced keeps its mode, as an editor keeps it, unless that is the 0600
        # this function left before it set modes.
        mode = 0o666 & ~process_umask()
        with contextlib.suppress(OSError):
            kept = stat.S_IMODE(os.stat(path).st_mode)
            mode = mode if kept == 0o600 else kept
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and naming(exc, path) is not exc:
            raise naming(exc, path) from exc
        raise
    return sha256_bytes(data)


def naming(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """`exc`, or where it names no file (a write or fsync error: a full disk), the same error
    naming `path`, the file being written."""
    if exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


class StageRecord(dict[str, Any]):
    """A JSON object a stage wrote (a manifest, a model's meta): reading a key it lacks (a
    hand edit, a file of another version) is a DataError naming the file, the key and how to
    write the file again, not a KeyError traceback. `.get` and `in` work as for any dict."""

    def __init__(self, items: Any = (), source: str = "a stage's JSON file",
                 rerun: str = "rerun the stage that writes it") -> None:
        super().__init__(items)
        self.source, self.rerun = source, rerun

    def __missing__(self, key: str) -> Any:
        raise DataError(f"{self.source}: has no {key!r} (edited by hand, or written by another "
                        f"version); {self.rerun}")


def parse_record(text: str | bytes, source: str | os.PathLike[str], rerun: str) -> Any:
    """`text` parsed as JSON with every object a StageRecord of `source` (ValueError where it
    is not JSON)."""
    return json.loads(text, object_hook=lambda items: StageRecord(items, str(source), rerun))


def read_json_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A local JSON object that is only bookkeeping (a cache, a record): {} where the file is
    missing, damaged or holds something else, and the caller computes it anew."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@functools.cache
def process_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, which would race with threads creating files meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def upload_file(local: str | os.PathLike[str], url: str) -> None:
    """Copy a local file to a URL (S3 makes it visible only once the upload completes)."""
    fs, fs_path = filesystem(url)
    with storage_errors(url):
        fs.put_file(str(local), fs_path)


def list_files(path: str | os.PathLike[str]) -> list[str]:
    """All files below a local folder or URL prefix, as full paths/URLs, sorted."""
    if is_url(path):
        fs, fs_path = filesystem(str(path))
        protocol = str(path).split("://", 1)[0]
        with storage_errors(str(path)):
            found = fs.find(fs_path)
        return sorted(f"{protocol}://{p}" for p in found)
    return sorted(str(p) for p in _walk_files(Path(path)))


def _walk_files(root: Path) -> Iterator[Path]:
    """Files below `root`, through symlinked folders too (a data set of linked class folders),
    each real folder once (a link cycle ends there)."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        # Real folders first, each level in name order: a link to a folder also reached by its
        # own name (kitty -> cat) is the one skipped, on every filesystem alike.
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(folder, d)), d))
        for name in files:
            path = Path(folder, name)
            if path.is_file():  # a broken link is no file
                yield path


# Names of the folders atomic_dirs builds and swaps out: `.NAME.tmp-PID-HOST-RANDOM` and
# `.NAME.old-PID-HOST-RANDOM`, HOST a digest of the host name, so that the next write of NAME
# can tell one a killed process left (its PID is gone on this host) from one being written.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-"
                       r"[0-9a-f]{8}")
_OLD_STYLE = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-[0-9a-f]{8}")
OLD_STYLE_AGE_S = 24 * 3600  # names without a PID (earlier versions): swept once this old


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _side_name(final: Path, what: str) -> Path:
    return final.parent / f".{final.name}.{what}-{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _abandoned(entry: Path, final: Path, now: float) -> str | None:
    """The kind, tmp or old, when `entry` is a side folder of `final` that nobody writes."""
    match = _LEFTOVER.fullmatch(entry.name)
    if match and match["name"] == final.name:
        if match["host"] != _host_tag() or _pid_alive(int(match["pid"])):
            return None  # another machine's (shared disk), or still being written
        return match["what"]
    match = _OLD_STYLE.fullmatch(entry.name)
    if match and match["name"] == final.name:
        with contextlib.suppress(OSError):
            if now - entry.lstat().st_mtime > OLD_STYLE_AGE_S:
                return match["what"]
    return None


def sweep_leftovers(final: str | os.PathLike[str]) -> list[Path]:
    """Clear what a killed write of folder `final` left beside it; return what was removed.

    A process killed while building leaves `.NAME.tmp-*` (removed); one killed between its two
    renames leaves the previous output as `.NAME.old-*` with no NAME (put back in place: the
    new one was never committed), or beside the new NAME (removed). Side folders of a live
    process, or of another host sharing the disk, are left alone.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    now = time.time()
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in final.parent.iterdir():
        if entry.name.startswith(f".{final.name}."):
            what = _abandoned(entry, final, now)
            if what:
                found[what].append(entry)
    if found["old"] and not final.exists():
        with contextlib.suppress(FileNotFoundError):  # another sweep got there first
            newest = max(found["old"], key=lambda p: p.lstat().st_mtime)
            os.replace(newest, final)
            found["old"].remove(newest)
            log.warning("%s: put back the previous output that an interrupted write had moved "
                        "aside (%s)", final, newest.name)
    removed = found["tmp"] + found["old"]
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if removed:
        log.info("%s: removed %d folder(s) an interrupted write left beside it", final,
                 len(removed))
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name; on success swap it in, on failure leave no trace.

    The previous folder (a good earlier output) stays untouched until the new one is complete;
    the swap is two renames on the same filesystem.
    """
    with atomic_dirs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_dirs(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """`atomic_dir` for outputs that belong together (a stage's two models): every folder is
    built first, and only then are all swapped in, one right after another; a failure while
    building any of them leaves every previous folder as it was."""
    finals = [Path(p) for p in paths]
    tmps = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep_leftovers(final)
            tmp = _side_name(final, "tmp")
            tmp.mkdir()
            tmps.append(tmp)
        yield tmps
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    olds = []
    try:
        for final, tmp in zip(finals, tmps, strict=True):
            old = _side_name(final, "old")
            had = final.exists()
            if had:
                os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                if had:  # the previous folder goes back in place
                    os.replace(old, final)
                raise
            if had:
                olds.append(old)
    finally:  # a rename that failed (rare: same filesystem) leaves no temporary folder behind
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
