"""A Prefect flow per stage. Each asks DVC to reproduce its stage (DVC decides whether it is
up to date), streams the stage's log lines into the Prefect run, and publishes the stage's
Markdown summary as an artifact. The stage logic itself lives in tasks/."""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from latentforge import dvcops, tracking, workspace
from latentforge.config import DEFAULT_PARAMS_FILE, load_params, write_params_file
from latentforge.runner import read_last_run


def apply_params(params_file: str | None, overrides: list[str]) -> None:
    """Validate deployment/CLI parameters with the typed schema; persist them to params.yaml."""
    params = load_params(params_file, overrides)
    if write_params_file(params, DEFAULT_PARAMS_FILE):
        get_run_logger().info("params.yaml updated from %s", params_file or overrides)


@task(task_run_name="reproduce-{stage}")
def reproduce_stage(stage: str, force: bool = False, parent_run_id: str | None = None
                    ) -> dict[str, Any]:
    """Run `dvc repro --single-item stage` unless DVC finds it up to date."""
    logger = get_run_logger()
    started = time.time()
    if not force and not dvcops.stage_status(stage):
        last = read_last_run(stage) or {}
        logger.info("%s is up to date: skipped", stage)
        return {"stage": stage, "status": "skipped", "seconds": time.time() - started,
                "metrics": last.get("metrics", {}), "run_id": last.get("run_id")}
    env = {tracking.FLOW_RUN_ENV: str(flow_run.id or "")}
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
    else:
        env[tracking.PARENT_RUN_ENV] = ""
    dvcops.reproduce(stage, env=env, force=force, on_line=lambda line: logger.info("%s", line))
    last = read_last_run(stage) or {}
    return {"stage": stage, "status": "ran", "seconds": time.time() - started,
            "metrics": last.get("metrics", {}), "run_id": last.get("run_id"),
            "summary": last.get("summary", "")}


def _stage(stage: str, force: bool, parent_run_id: str | None) -> dict[str, Any]:
    record = reproduce_stage(stage, force=force, parent_run_id=parent_run_id)
    if record["status"] == "ran":
        create_markdown_artifact(
            f"## {stage}\n\n{record.get('summary', '')}\n\nMLflow run `{record.get('run_id')}`, "
            f"{record['seconds']:.1f} s", key=f"{stage}-summary",
            description=f"latentforge stage {stage}")
    return record


def _stage_flow(stage: str, overrides: list[str] | None, params_file: str | None, force: bool,
                parent_run_id: str | None) -> dict[str, Any]:
    """A stage flow's body: one run per workspace, parameters validated and persisted, the
    stage reproduced."""
    with workspace.lock(what=f"Prefect flow run {flow_run.id or stage}"):
        apply_params(params_file, overrides or [])
        return _stage(stage, force, parent_run_id)


def _flow(stage: str, doc: str):  # noqa: ANN202 - returns a Prefect Flow
    return flow(name=stage, description=doc, log_prints=True)


@_flow("prepare", "Read the source (digits, IDX, image folder, npz; local or s3://), resize, "
       "split train/val, write shards + manifest + preview.")
def prepare(overrides: list[str] | None = None, params_file: str | None = None,
            force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("prepare", overrides, params_file, force, parent_run_id)


@_flow("judge", "Train the small CNN classifier whose features and log-probs score the "
       "later stages (FD-judge, precision/recall, accuracy, RL reward).")
def judge(overrides: list[str] | None = None, params_file: str | None = None,
          force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("judge", overrides, params_file, force, parent_run_id)


@_flow("tokenizer", "Train the 1D (TiTok) or 2D tokenizer; PSNR, SSIM, rFD/pFD-judge, judge "
       "accuracy on reconstructions, codebook usage, PSNR per prefix length.")
def tokenizer(overrides: list[str] | None = None, params_file: str | None = None,
              force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("tokenizer", overrides, params_file, force, parent_run_id)


@_flow("cache", "Encode the prepared splits with the tokenizer on a Ray Data actor pool into a "
       "sharded, resumable latent cache keyed by (tokenizer sha256, data sha256).")
def cache(overrides: list[str] | None = None, params_file: str | None = None,
          force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("cache", overrides, params_file, force, parent_run_id)


@_flow("generator", "Train the class-conditional flow-matching transformer on the cached "
       "latents; sample with CFG; gFD-judge, precision/recall, judge accuracy, IS-judge.")
def generator(overrides: list[str] | None = None, params_file: str | None = None,
              force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("generator", overrides, params_file, force, parent_run_id)


@_flow("rl", "Flow-GRPO fine-tuning of the generator against the reward (judge log-prob by "
       "default), with a KL leash to the base model and gFD-judge watched for reward hacking.")
def rl(overrides: list[str] | None = None, params_file: str | None = None,
       force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("rl", overrides, params_file, force, parent_run_id)


@_flow("evaluate", "Evaluate tokenizer, base and RL generator on the val split with the "
       "protocol recorded; metrics, plots, side-by-side grids and report.md.")
def evaluate(overrides: list[str] | None = None, params_file: str | None = None,
             force: bool = False, parent_run_id: str | None = None) -> dict[str, Any]:
    return _stage_flow("evaluate", overrides, params_file, force, parent_run_id)


STAGE_FLOWS = {"prepare": prepare, "judge": judge, "tokenizer": tokenizer, "cache": cache,
               "generator": generator, "rl": rl, "evaluate": evaluate}

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
