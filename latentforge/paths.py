"""Every path the pipeline reads or writes, declared once; tests check dvc.yaml against it.

Paths are relative to the project root (the folder holding dvc.yaml and params.yaml).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"
# What the stages after prepare depend on: the manifest pins every shard by sha256 (each stage
# checks them), so a rerun of prepare that leaves the data as it was (a new .DS_Store in the
# source, another on_bad_image: only report.json differs) reruns nothing after it.
PREPARED_MANIFEST = PREPARED / "manifest.json"
CACHE = DATA / "cache"
METRICS = Path("metrics")
ARTIFACTS = Path("artifacts")
JUDGE = ARTIFACTS / "judge"
EVALUATOR = ARTIFACTS / "evaluator"  # the judge stage's second classifier: grades, never rewards
TOKENIZER = ARTIFACTS / "tokenizer"
GENERATOR = ARTIFACTS / "generator"
DECODER = ARTIFACTS / "decoder"  # posttrain: the tokenizer's decoder fine-tuned on generated latents
RL = ARTIFACTS / "rl"
REPORT = Path("reports") / "evaluate"
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
        code=("tasks/judge.py", "models/judge.py", "models/layers.py", "latentforge/training.py"),
        deps=(str(PREPARED_MANIFEST),),
        params=("judge", "compute.precision"),  # bf16 changes the numbers
        outs=(str(JUDGE), str(EVALUATOR)),
        metrics=(str(metrics_file("judge")),),
    ),
    "tokenizer": StageSpec(
        name="tokenizer",
        code=("tasks/tokenizer.py", "models/tokenizer.py", "models/layers.py",
              "latentforge/training.py", "latentforge/figures.py"),
        deps=(str(PREPARED_MANIFEST), str(JUDGE)),
        params=("tokenizer", "compute.precision"),  # bf16 changes the numbers
        outs=(str(TOKENIZER),),
        metrics=(str(metrics_file("tokenizer")),),
        plots=(str(PLOTS / "tokenizer_prefix_psnr.csv"),),
    ),
    "cache": StageSpec(
        name="cache",
        code=("tasks/cache.py", "models/tokenizer.py", "models/layers.py"),
        deps=(str(PREPARED_MANIFEST), str(TOKENIZER)),
        params=("cache",),
        outs=(str(CACHE),),
        metrics=(str(metrics_file("cache")),),
    ),
    "generator": StageSpec(
        name="generator",
        code=("tasks/generator.py", "models/generator.py", "models/token_generator.py",
              "models/layers.py", "latentforge/flow.py", "latentforge/tokens.py",
              "latentforge/training.py"),
        deps=(str(CACHE), str(TOKENIZER), str(EVALUATOR), str(PREPARED_MANIFEST)),
        params=("generator", "compute.precision"),  # bf16 changes the numbers
        outs=(str(GENERATOR),),
        metrics=(str(metrics_file("generator")),),
    ),
    "posttrain": StageSpec(
        name="posttrain",
        code=("tasks/posttrain.py", "models/tokenizer.py", "models/layers.py",
              "latentforge/flow.py", "latentforge/tokens.py", "latentforge/training.py",
              "latentforge/intervals.py"),
        deps=(str(GENERATOR), str(TOKENIZER), str(EVALUATOR), str(PREPARED_MANIFEST)),
        params=("posttrain", "generator.cfg_scale", "generator.sample_steps",
                "generator.sampler", "compute.precision"),
        outs=(str(DECODER),),
        metrics=(str(metrics_file("posttrain")),),
    ),
    "rl": StageSpec(
        name="rl",
        code=("tasks/rl.py", "latentforge/rewards.py", "latentforge/flow.py",
              "latentforge/tokens.py", "tasks/posttrain.py"),
        deps=(str(GENERATOR), str(JUDGE), str(EVALUATOR), str(TOKENIZER), str(DECODER),
              str(PREPARED_MANIFEST)),
        params=("rl", "generator.sample_steps", "generator.sampler"),
        outs=(str(RL),),
        metrics=(str(metrics_file("rl")),),
        plots=(str(PLOTS / "rl_reward.csv"),),
    ),
    "evaluate": StageSpec(
        name="evaluate",
        code=("tasks/evaluate.py", "tasks/compare.py", "latentforge/intervals.py",
              "latentforge/figures.py", "tasks/posttrain.py"),
        deps=(str(PREPARED_MANIFEST), str(JUDGE), str(EVALUATOR), str(TOKENIZER), str(DECODER),
              str(GENERATOR), str(RL),
              str(PLOTS / "rl_reward.csv")),
        params=("evaluate", "rl.rewards", "rl.cfg_scale", "generator.cfg_scale",
                "tokenizer.eval_perturbation", "tokenizer.perturbation_sigma"),
        outs=(str(REPORT),),
        metrics=(str(metrics_file("evaluate")),),
    ),
}


def last_run_file(stage: str) -> Path:
    """Where the stage command records its MLflow run id, duration and metrics for the flow."""
    return STATE / "last" / f"{stage}.json"


# What the last successful push of `latentforge run` sent where (dvcops.pushed): an up-to-date
# pipeline whose outputs the remote lacks (a remote set since, a push that failed) takes the
# flow path, which pushes, instead of answering as a no-op.
PUSHED_FILE = STATE / "last" / "pushed.json"


def params_read_file(stage: str) -> Path:
    """params.yaml as the stage command read it, for `latentforge run` to record in dvc.lock
    what the stage ran with (an edit after `dvc repro` started but before the stage read it
    counts as used; dvcops.reproduce)."""
    return STATE / "last" / f"{stage}.params.yaml"


def checkpoint_dir(stage: str, data_sha256: str) -> Path:
    """Training checkpoints of `stage`, keyed by its input data so that a rerun resumes only a
    run on the same data (the harness also checks the training config)."""
    return STATE / "checkpoints" / stage / data_sha256[:16]


def work_dir(stage: str, key: str) -> Path:
    """Scratch space for a stage's resumable work (e.g. cache shards), keyed like its inputs."""
    return STATE / "work" / stage / key[:16]


def source_file(rel: str) -> Path:
    """Where a code file dvc.yaml names (tasks/judge.py) lives as this process imports it: the
    card's folders are subpackages of `latentforge` (latentforge.tasks.judge), in a source
    checkout (editable install) and an installed package alike."""
    top, _, rest = rel.partition("/")
    package = "latentforge" if top == "latentforge" else f"latentforge.{top}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{rel}: the package {package} is not importable")
    return Path(next(iter(spec.submodule_search_locations))) / rest


@functools.cache
def code_sha256(stage: str) -> str:
    """sha256 of the stage's code files (STAGES[stage].code) as this process imports them.

    Resumable state (training checkpoints, cache shards, finished RL seeds) carries it: DVC
    reruns a stage whose code changed, and the rerun must then compute anew rather than hand
    back what the old code left (a fixed model or loss would otherwise never take effect)."""
    digest = hashlib.sha256()
    for rel in STAGES[stage].code:
        digest.update(rel.encode() + b"\0" + hashlib.sha256(source_file(rel).read_bytes()).digest())
    return digest.hexdigest()
