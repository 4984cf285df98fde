"""What a run checks before its first stage, and before params.yaml records its parameters:
things that the schema cannot know (they depend on this machine, the project folder or the
user's files) but that would otherwise fail a stage minutes in, or break DVC for every later
run. Each failure is a ConfigError (exit 2) naming the key."""

from __future__ import annotations

from pathlib import Path

from latentforge import dvcops
from latentforge.config import ComputeConfig, Params
from latentforge.errors import ConfigError


def check_run(params: Params, stages: list[str] | None) -> None:
    """Everything below, for a run of `stages` (None: every stage)."""
    dvcops.check_source(params)
    check_local_gpu(params.compute)
    check_stage_inputs(params, stages)
    if params.tracking.enabled:
        from latentforge import tracking

        tracking.check_server(tracking.tracking_uri())
        check_artifact_store(params)


def check_artifact_store(params: Params) -> None:
    """An s3:// tracking.artifact_location must answer within storage.*'s limits: MLflow's own
    S3 client waits at botocore's defaults (60 s per attempt) and fails with a traceback after
    the first stage did its work."""
    from latentforge import storage

    location = params.tracking.artifact_location
    if location is None or not storage.is_s3(location):
        return
    storage.configure(params.storage)
    storage.exists(location)


def check_local_gpu(compute: ComputeConfig) -> None:
    """compute.use_gpu for work in this machine's processes (no Ray cluster): the GPU must be
    here, known before any stage runs rather than when the first training stage starts."""
    if compute.use_gpu and compute.ray_address is None:
        from latentforge.training import local_device

        local_device(compute)


def check_stage_inputs(params: Params, stages: list[str] | None) -> None:
    """What the later stages of this run read from the user's own files, looked at before
    the first stage: a mistyped path or reward module failed only when rl or evaluate began."""
    from latentforge import rewards

    def runs(stage: str) -> bool:
        return stages is None or stage in stages

    weights = params.evaluate.inception_weights
    if runs("evaluate") and weights and not Path(weights).is_file():
        raise ConfigError(f"evaluate.inception_weights = {weights!r}: no such local file "
                          "(Inception weights are never downloaded); set it to null for "
                          "FD-judge only")
    if runs("rl"):
        rewards.check_names(params.rl.rewards, Path.cwd())
