"""Served deployments: the pipeline and each stage get the Prefect UI's Run button.

Each deployment is named after its flow, so the UI and `prefect deployment ls` list them as
`pipeline/pipeline`, `prepare/prepare`, ... (flow name/deployment name), the same names as
infra/prefect.yaml gives them on a work pool."""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import EntrypointType

from latentforge.flows.experiment import experiment
from latentforge.flows.pipeline import pipeline
from latentforge.flows.stages import STAGE_FLOWS


def build_deployments(limit: int = 1) -> list[Any]:
    """One deployment for the pipeline, one per stage and one for DVC experiments. One run uses
    a workspace at a time (latentforge/workspace.py), so each deployment runs at most `limit`
    (default 1) flow runs concurrently."""
    flows = [pipeline, *STAGE_FLOWS.values(), experiment]
    return [f.to_deployment(name=f.name, concurrency_limit=limit,
                            description=f.description, tags=["latentforge"],
                            entrypoint_type=EntrypointType.MODULE_PATH) for f in flows]


def serve_all(limit: int = 1) -> None:
    from prefect import serve

    serve(*build_deployments(limit))
