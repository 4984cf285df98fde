"""Every path the pipeline reads or writes, declared once; tests check dvc.yaml against it.

Paths are relative to the project root (the folder holding dvc.yaml and params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"
METRICS = Path("metrics")
ARTIFACTS = Path("artifacts")
JUDGE = ARTIFACTS / "judge"
TOKENIZER = ARTIFACTS / "tokenizer"
PLOTS = Path("plots")
STATE = Path(".latentforge")  # run records and training checkpoints; not versioned


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
    "judge": StageSpec(
        name="judge",
        code=("tasks/judge.py", "models/judge.py", "latentforge/training.py"),
        deps=(str(PREPARED),),
        params=("judge",),
        outs=(str(JUDGE),),
        metrics=(str(metrics_file("judge")),),
    ),
    "tokenizer": StageSpec(
        name="tokenizer",
        code=("tasks/tokenizer.py", "models/tokenizer.py", "latentforge/training.py"),
        deps=(str(PREPARED), str(JUDGE)),
        params=("tokenizer",),
        outs=(str(TOKENIZER),),
        metrics=(str(metrics_file("tokenizer")),),
        plots=(str(PLOTS / "tokenizer_prefix_psnr.csv"),),
    ),
}


def last_run_file(stage: str) -> Path:
    """Where the stage command records its MLflow run id, duration and metrics for the flow."""
    return STATE / "last" / f"{stage}.json"


def checkpoint_dir(stage: str, data_sha256: str) -> Path:
    """Training checkpoints of `stage`, keyed by its input data so that a rerun resumes only a
    run on the same data (the harness also checks the training config)."""
    return STATE / "checkpoints" / stage / data_sha256[:16]
