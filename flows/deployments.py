"""Served deployments: the pipeline and each stage get the Prefect UI's Run button."""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import EntrypointType

from latentforge.flows.pipeline import pipeline
from latentforge.flows.stages import STAGE_FLOWS

DEPLOYMENT_NAME = "latentforge"


def build_deployments(limit: int = 1) -> list[Any]:
    """One deployment for the pipeline and one per stage. DVC allows one repro per workspace
    at a time, so each deployment runs at most `limit` (default 1) flow runs concurrently."""
    flows = [pipeline, *STAGE_FLOWS.values()]
    return [f.to_deployment(name=DEPLOYMENT_NAME, concurrency_limit=limit,
                            description=f.description, tags=["latentforge"],
                            entrypoint_type=EntrypointType.MODULE_PATH) for f in flows]


def serve_all(limit: int = 1) -> None:
    from prefect import serve

    serve(*build_deployments(limit))
