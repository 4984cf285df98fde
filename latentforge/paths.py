"""Every path the pipeline reads or writes, declared once; tests check dvc.yaml against it.

Paths are relative to the project root (the folder holding dvc.yaml and params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"
METRICS = Path("metrics")
STATE = Path(".latentforge")  # per-run bookkeeping (last run records); not versioned


@dataclass(frozen=True)
class StageSpec:
    """What one stage reads and writes, as dvc.yaml must declare it."""

    name: str
    code: tuple[str, ...]  # source files whose change must rerun the stage
    deps: tuple[str, ...]  # data inputs (outputs of earlier stages, or the source)
    params: tuple[str, ...]  # params.yaml sections
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...] = ()

    @property
    def cmd(self) -> str:
        return f"latentforge stage {self.name}"


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec(
        name="prepare",
        code=("tasks/prepare.py", "latentforge/sources.py"),
        deps=("${prepare.path}",),
        params=("prepare",),
        outs=(str(PREPARED),),
        metrics=(str(metrics_file("prepare")),),
    ),
}


def last_run_file(stage: str) -> Path:
    """Where the stage command records its MLflow run id, duration and metrics for the flow."""
    return STATE / "last" / f"{stage}.json"
