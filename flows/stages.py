"""A Prefect flow per stage. Each asks DVC to reproduce its stage (DVC decides whether it is
up to date), streams the stage's log lines into the Prefect run, and publishes a Markdown
summary artifact (ran, or skipped as up to date, with a link to the MLflow run). The stage
logic itself lives in tasks/.

A failed stage (or a bad parameter) is one ERROR line in its flow run, the cause first
(`stage 'x' failed: ...`), with the traceback at DEBUG; the flow then returns a Failed state
that carries the exception, so its caller (the pipeline flow, `latentforge run`) still gets
the LatentForgeError. An exception raised out of a flow or task is logged by Prefect at ERROR
with a 30-line traceback, and a task that returns a Failed state still logs one, so the stage
runs inside the flow itself, not in a Prefect task.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed, State
from pydantic import Field

from latentforge import dvcops, preflight, procs, tracking, workspace
from latentforge.config import DEFAULT_PARAMS_FILE, Params, load_params, write_params_file
from latentforge.errors import LatentForgeError
from latentforge.runner import read_last_run, skipped_record
from latentforge.schema import as_overrides, form_model
from latentforge.summaries import (  # noqa: F401 - the flows' public names
    local_store_uri,
    mlflow_run_markdown,
    mlflow_server,
    mlflow_ui_hint,
    stage_summary_markdown,
)

# Written out (not built from latentforge.paths.STAGES) so that mypy checks it; the tests check
# that it names the stages of paths.STAGES and dvc.yaml, in order. Prefect's Run form offers
# the names of a Literal as choices.
StageName = Literal["prepare", "judge", "tokenizer", "cache", "generator", "posttrain", "rl",
                    "evaluate"]

# Prefect's Run form shows a parameter's type, its description and its examples. Prefect 3.9
# builds the form's schema from the signature with pydantic but sets each field's description
# itself (from the docstring's Args section), so a description inside Annotated[..., Field()]
# would be dropped; the examples and types survive.
Overrides = Annotated[list[str] | None,
                      Field(examples=[["prepare.resolution=32", "generator.steps=200"]])]
ParamsFile = Annotated[str | None, Field(examples=["presets/gpu.yaml"])]

# The Run form's "params": every section and key of params.yaml with its doc, default and
# bounds, built from latentforge/config.py (latentforge/schema.py). mypy sees Any.
# Its default is an empty form (every key empty), not None: pydantic refuses None for a model.
if TYPE_CHECKING:
    ParamChanges = Any
else:
    ParamChanges = form_model()
NO_CHANGES: Any = form_model()()

PARAMETERS_DOC = """
    overrides: Parameter changes, one KEY=VALUE per item: a dotted params.yaml key and its
        value, e.g. prepare.resolution=32 (what `latentforge run -S` takes). They are
        validated, then written into params.yaml before anything runs (as `dvc exp run -S`
        does), so a later `dvc repro` sees the same parameters. Empty: params.yaml as is.
    params_file: A parameters file to use instead of params.yaml, e.g. presets/gpu.yaml
        (keys it leaves out take their defaults; the overrides apply on top). The result
        is validated and written into params.yaml before anything runs. Empty: params.yaml.
    force: Rerun even when DVC finds a stage up to date (`dvc repro --force`).
    params: Parameter changes, section by section: every params.yaml key with its doc,
        default and bounds. Fill in only what should change; an empty key keeps params.yaml's
        value. Applied before the overrides, and like them written into params.yaml first.
        (To set a key to null, use overrides: KEY=null.)
    wait: When another run holds this workspace (one run at a time per workspace), wait
        for it to finish, saying so every minute, instead of failing at once."""

STAGE_FLOW_DOC = """Reproduce the stage through DVC.

Args:""" + PARAMETERS_DOC + """
    parent_run_id: MLflow run to nest this stage's run under; the pipeline flow sets it.
        Leave it empty when running one stage.
"""

WRITES_PARAMS = ("A run first writes the chosen params (params_file, overrides) into "
                 "params.yaml, like `dvc exp run -S`.")


def apply_params(params_file: str | None, overrides: list[str], changes: Any = None,
                 stages: list[str] | None = None, check: bool = True) -> Params:
    """Validate deployment/CLI parameters with the typed schema; persist them to params.yaml.
    `changes` (the Run form's `params`) apply first, as overrides. With `check`, what a run of
    `stages` (None: all) needs is looked at first (preflight), so params.yaml never records
    parameters that cannot run."""
    overrides = [*as_overrides(changes), *overrides]
    params = load_params(params_file, overrides)
    if check:
        preflight.check_params(params, stages)
    if write_params_file(params, DEFAULT_PARAMS_FILE):
        get_run_logger().info("params.yaml updated from %s",
                              " ".join(filter(None, [params_file, *overrides])))
    return params


# How a flow run that finds the workspace busy queues instead: the CLI's flag, or, started
# from the UI, the Run form's `wait` parameter.
FORM_WAIT = "pass --wait (in the Run form: set wait)"


LOGGED_MARK = "_latentforge_logged"  # set by failed_state on the error it logged


def _logged_once(record: logging.LogRecord) -> bool:
    """A filter for Prefect's flow-run logger: drop the engine's second report of an error
    `failed_state` logged already ("Engine execution exited with unexpected exception" and
    its traceback, at ERROR: what a served deployment's run logs for each failure)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (getattr(exc, LOGGED_MARK, False)
                and record.getMessage().startswith("Engine execution exited"))


# Installed once, when the flows are imported: by the CLI, `latentforge serve` and the
# runner's subprocess that loads a deployment's flow before running it.
logging.getLogger("prefect.flow_runs").addFilter(_logged_once)


def failed_state(exc: LatentForgeError) -> State:
    """Log `exc` as one ERROR line, its cause first (further lines and the traceback at
    DEBUG), and return the Failed state that ends the flow run and re-raises `exc` to the
    flow's caller."""
    logger = get_run_logger()
    first, _, rest = str(exc).partition("\n")
    logger.error("%s", first)
    logger.debug("%s", rest or "traceback:", exc_info=exc)
    setattr(exc, LOGGED_MARK, True)  # the engine's second report of it is dropped
    return Failed(message=first, data=exc)


def mlflow_experiment_id(tracking_uri: str | None, params: Params) -> str | None:
    """The experiment's id on an MLflow server, for links; None for a local store or if the
    server does not say."""
    if not (params.tracking.enabled and mlflow_server(tracking_uri)):
        return None
    import mlflow

    try:
        exp = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(params.tracking.experiment)
    except Exception:  # a link without the experiment id still works; never fail a run for it
        get_run_logger().debug("no experiment id for the MLflow links", exc_info=True)
        return None
    return exp.experiment_id if exp is not None else None


def reproduce_stage(stage: str, force: bool = False, parent_run_id: str | None = None,
                    tracked: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run `dvc repro --single-item stage` unless DVC finds it up to date. `tracked`: the
    (tracking URI, experiment) the stage logs to, where a killed stage's run is ended."""
    logger = get_run_logger()
    started = time.time()
    if not force and not dvcops.stage_status(stage):
        logger.info("%s is up to date: skipped", stage)
        return skipped_record(stage, seconds=time.time() - started)
    # The stage inside DVC learns from workspace.HOLDER_ENV (set while this flow holds the
    # workspace lock) that it must not take the lock itself. An invocation id groups the
    # stage's MLflow run with this flow's, also where no `latentforge` command started this
    # process (a Prefect worker's flow run process, a test).
    env = {tracking.FLOW_RUN_ENV: str(flow_run.id or ""),
           tracking.PARENT_RUN_ENV: parent_run_id or "",
           procs.INVOCATION_ENV: os.environ.get(procs.INVOCATION_ENV) or uuid.uuid4().hex[:12]}
    try:
        dvcops.reproduce(stage, env=env, force=force, on_line=lambda line: logger.info("%s", line))
    except LatentForgeError:
        # A stage that raised ended its own run FAILED; one that was killed (SIGKILL, the
        # out-of-memory killer) could not, and its run would stay RUNNING for ever.
        if ended := procs.end_stage_runs(stage, env[procs.INVOCATION_ENV],
                                         [tracked] if tracked else []):
            logger.info("ended %d MLflow run(s) of %s that its process left RUNNING", ended, stage)
        raise
    last = read_last_run(stage) or {}
    return {"stage": stage, "status": "ran", "seconds": time.time() - started,
            "metrics": last.get("metrics", {}), "run_id": last.get("run_id"),
            "summary": last.get("summary", "")}


def _stage_flow(stage: str, overrides: list[str] | None, params_file: str | None, force: bool,
                parent_run_id: str | None, changes: Any = None, wait: bool = False
                ) -> dict[str, Any]:
    """A stage flow's body: one run per workspace, parameters validated and persisted, the
    stage reproduced, its summary published."""
    try:
        with workspace.lock(what=f"Prefect flow run {flow_run.id or stage}", wait=wait or None,
                            say=get_run_logger().warning,
                            wait_hint=FORM_WAIT), procs.flow_run_watched():
            # Started alone (the UI): checked here; as the pipeline's subflow: checked there.
            alone = not parent_run_id and not preflight.checked_by_pipeline()
            params = apply_params(params_file, overrides or [], changes, [stage], check=alone)
            if alone:
                preflight.check_environment(params, [stage])
            tracked = ((tracking.tracking_uri(), params.tracking.experiment)
                       if params.tracking.enabled else None)
            record = reproduce_stage(stage, force=force, parent_run_id=parent_run_id,
                                     tracked=tracked)
    except LatentForgeError as exc:  # a busy workspace, bad parameters, the stage failed
        return failed_state(exc)  # type: ignore[return-value]  # Prefect raises exc
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    create_markdown_artifact(
        stage_summary_markdown(record, uri, mlflow_experiment_id(uri, params)),
        key=f"{stage}-summary",
        description=f"latentforge stage {stage}: "
                    + ("ran" if record["status"] == "ran" else "skipped (up to date)"))
    return record


def _flow(stage: str, doc: str):  # noqa: ANN202 - returns a decorator of Prefect flows
    def decorate(fn):  # noqa: ANN001, ANN202
        fn.__doc__ = STAGE_FLOW_DOC  # before @flow, which reads the descriptions from it
        return flow(name=stage, description=f"{doc} {WRITES_PARAMS}", log_prints=True)(fn)

    return decorate


@_flow("prepare", "Read the source (digits, shapes, IDX, image folder, npz; local or s3://), "
       "resize, split train/val, write shards + manifest + preview.")
def prepare(overrides: Overrides = None, params_file: ParamsFile = None,
            force: bool = False, parent_run_id: str | None = None,
            params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("prepare", overrides, params_file, force, parent_run_id, params, wait)


@_flow("judge", "Train two small CNN classifiers: the judge (the RL reward, the tokenizer's "
       "FD-judge) and the evaluator (another seed and width), which grades generated samples.")
def judge(overrides: Overrides = None, params_file: ParamsFile = None,
          force: bool = False, parent_run_id: str | None = None,
          params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("judge", overrides, params_file, force, parent_run_id, params, wait)


@_flow("tokenizer", "Train the 1D (TiTok) or 2D tokenizer; PSNR, SSIM, rFD/pFD-judge, judge "
       "accuracy on reconstructions, codebook usage, PSNR per prefix length.")
def tokenizer(overrides: Overrides = None, params_file: ParamsFile = None,
              force: bool = False, parent_run_id: str | None = None,
              params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("tokenizer", overrides, params_file, force, parent_run_id, params, wait)


@_flow("cache", "Encode the prepared splits with the tokenizer on a Ray Data actor pool into a "
       "sharded, resumable latent cache keyed by (tokenizer sha256, data sha256).")
def cache(overrides: Overrides = None, params_file: ParamsFile = None,
          force: bool = False, parent_run_id: str | None = None,
          params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("cache", overrides, params_file, force, parent_run_id, params, wait)


@_flow("generator", "Train the class-conditional generator on the cache (generator.kind: "
       "flow matching on the latents, or maskgit / ar over the codes); sample with CFG; the "
       "evaluator's gFD-eval, precision/recall, accuracy, IS-eval.")
def generator(overrides: Overrides = None, params_file: ParamsFile = None,
              force: bool = False, parent_run_id: str | None = None,
              params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("generator", overrides, params_file, force, parent_run_id, params, wait)


@_flow("posttrain", "Decoder post-training (off by default: posttrain.enabled): fine-tune only "
       "the tokenizer's decoder on latents the generator makes from real images' latents; gFD-eval "
       "and accuracy of the same samples through both decoders, with paired intervals.")
def posttrain(overrides: Overrides = None, params_file: ParamsFile = None,
              force: bool = False, parent_run_id: str | None = None,
              params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("posttrain", overrides, params_file, force, parent_run_id, params, wait)


@_flow("rl", "Flow-GRPO (or, for maskgit / ar, GRPO over tokens) fine-tuning of the "
       "generator against the reward (judge log-prob by "
       "default), with a KL leash to the base model and the evaluator's gFD-eval watched for "
       "reward hacking.")
def rl(overrides: Overrides = None, params_file: ParamsFile = None,
       force: bool = False, parent_run_id: str | None = None,
       params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("rl", overrides, params_file, force, parent_run_id, params, wait)


@_flow("evaluate", "Evaluate tokenizer, base and RL generator on the val split with the "
       "protocol recorded; metrics, plots, side-by-side grids and report.md.")
def evaluate(overrides: Overrides = None, params_file: ParamsFile = None,
             force: bool = False, parent_run_id: str | None = None,
             params: ParamChanges = NO_CHANGES, wait: bool = False) -> dict[str, Any]:
    return _stage_flow("evaluate", overrides, params_file, force, parent_run_id, params, wait)


STAGE_FLOWS = {"prepare": prepare, "judge": judge, "tokenizer": tokenizer, "cache": cache,
               "generator": generator, "posttrain": posttrain, "rl": rl, "evaluate": evaluate}

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
