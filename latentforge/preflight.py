"""What a run checks before its first stage: things the schema cannot know (they depend on
this machine, the project folder or the user's files) that would otherwise fail a stage
minutes in, or break DVC for every later run.

`check_params` runs before params.yaml records the run's parameters (a path DVC cannot take
would stay there and break `dvc status` for every later run); `check_environment` runs once
the run knows it will execute something (an up-to-date pipeline answers without it). A
ConfigError (exit 2) names the key; a server that does not answer is exit 1.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from latentforge import dvcops
from latentforge.config import DVC_REMOTE_PLUGINS, Params
from latentforge.errors import ConfigError

_within_pipeline = 0  # > 0 while a pipeline flow that checked runs its stage subflows


def runs(stage: str, stages: list[str] | None) -> bool:
    return stages is None or stage in stages


def check_params(params: Params, stages: list[str] | None) -> None:
    """What the parameters name outside the schema: the source path (and an s3:// source's
    endpoint, within storage.*'s limits), the DVC remote's plugin, the Inception weights file
    and user reward modules, for a run of `stages` (None: every stage)."""
    dvcops.check_source(params, prepare_runs=runs("prepare", stages))
    remote = params.storage.remote
    scheme = remote.split("://", 1)[0] if remote and "://" in remote else ""
    if scheme and importlib.util.find_spec(DVC_REMOTE_PLUGINS[scheme]) is None:
        raise ConfigError(f"storage.remote = {remote!r}: DVC's {scheme}:// remotes need "
                          f"`pip install {DVC_REMOTE_PLUGINS[scheme].replace('_', '-')}`")
    if any(runs(stage, stages) for stage in TRAINED_ON_RAY):
        from latentforge.raycluster import check_storage_set

        check_storage_set(params.compute)
    if runs("evaluate", stages):
        check_inception_weights(params.evaluate.inception_weights)
    if runs("rl", stages):
        from latentforge import rewards

        rewards.check_names(params.rl.rewards, Path.cwd())


# The stages whose training runs on Ray Train workers once compute asks for several or a
# cluster: their checkpoints go through compute.storage_path.
TRAINED_ON_RAY = ("judge", "tokenizer", "generator", "posttrain")


def check_train_storage(params: Params, stages: list[str] | None) -> None:
    """compute.storage_path as this machine (the driver, which copies every checkpoint back
    from there) sees it, once something will run and only where training goes to Ray Train
    (in-process training never reads it): an s3:// URL this machine reaches (endpoint,
    credentials, bucket), a folder it can make and write. Each node is asked the same about
    an s3:// one once the cluster is joined (raycluster); a null one on a cluster was refused
    with the parameters (check_params)."""
    import os

    from latentforge import storage
    from latentforge.errors import DataError
    from latentforge.raycluster import use_ray

    compute = params.compute
    url = compute.storage_path
    if url is None or not use_ray(compute) or \
            not any(runs(stage, stages) for stage in TRAINED_ON_RAY):
        return
    if storage.is_url(url):
        if storage.is_s3(url):
            storage.configure(params.storage)
            try:
                storage.exists(url)
            except DataError as exc:
                raise ConfigError(f"compute.storage_path: this machine (the driver: it copies "
                                  f"each checkpoint back from there) cannot reach it: {exc}"
                                  ) from None
        return
    folder = Path(url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {folder}")
    except OSError as exc:
        raise ConfigError(f"compute.storage_path = {url!r}: this machine cannot make or write "
                          f"that folder ({type(exc).__name__}: {exc}); give a folder every "
                          f"node mounts and can write, or an s3:// URL") from None


def check_environment(params: Params, stages: list[str] | None) -> None:
    """This machine and the services the run writes to: the GPU `compute.use_gpu` asks for
    where no Ray cluster gives it (for any stage but prepare) and the MLflow tracking server."""
    compute = params.compute
    if compute.use_gpu and compute.ray_address is None and \
            (stages is None or set(stages) - {"prepare"}):
        from latentforge.training import local_device

        local_device(compute)
    check_train_storage(params, stages)
    if params.tracking.enabled:
        from latentforge import tracking

        tracking.check_server(tracking.tracking_uri())


def check_inception_weights(weights: str | None) -> None:
    """evaluate.inception_weights names a local file or is null (weights are never
    downloaded); the evaluate stage asks again when it starts."""
    if weights and not Path(weights).is_file():
        raise ConfigError(f"evaluate.inception_weights = {weights!r}: no such local file "
                          "(Inception weights are never downloaded); set it to null for "
                          "FD-judge only")


@contextlib.contextmanager
def pipeline_checked() -> Iterator[None]:
    """While a pipeline flow that ran the checks runs its stage subflows: they skip them."""
    global _within_pipeline
    _within_pipeline += 1
    try:
        yield
    finally:
        _within_pipeline -= 1


def checked_by_pipeline() -> bool:
    return _within_pipeline > 0
