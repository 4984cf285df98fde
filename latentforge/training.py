"""The training loop every stage shares: AdamW, warm-up + cosine, clipping, EMA, checkpoints.

A stage describes its problem as a `TrainSpec` (how to build the model, the loss, the arrays)
and calls `train(spec, cfg, compute, ckpt_dir, tracker)`. The same loop runs in this process
(one worker, no cluster address) or in each Ray Train worker (DDP), and:

- resumes by itself from the newest committed checkpoint in `ckpt_dir` that reads back whole
  and fits the model (newer ones are set aside with a warning; see checkpoint.py); a run whose
  checkpoint already reached `cfg.steps` returns at once; checkpoints of a different
  configuration (anything but save_every/keep_last/log_every, or other data shapes) are discarded;
- is exactly reproducible on the CPU, across crashes: the global batch of update `step` is a
  pure function of (seed, step), and before every update the torch (CPU and CUDA), numpy and
  `random` global generators are seeded from (seed, step, rank), so a loss function may draw
  noise (torch.randn, dropout) and a resumed run draws the same. The noise differs between
  ranks, so with random losses a 2-worker run matches a 1-worker run only in distribution;
- splits each global batch into contiguous per-rank slices; with mean losses and DDP's
  gradient averaging, N workers follow the 1-worker run up to float reduction order;
- writes metric rows to `ckpt_dir/metrics.jsonl` and forwards them to the tracker from the
  driver only (in-process: as they come; on Ray Train: rank 0 sends them through a Ray queue);
- on Ray Train touches nothing of the driver's disk: arrays travel as object-store refs (or
  memmaps when the workers share the driver's node), the checkpoint to resume from as bytes;
  workers report checkpoints to `compute.storage_path` (S3 or a shared mount on a cluster)
  with `ray.train.report`, and the driver copies each one into `ckpt_dir` as it arrives;
- trains in fp32 or bf16 autocast (`bf16: true`, or compute.precision bf16, or auto measured
  where the workers run: latentforge/precision.py), the precision part of the checkpoints'
  fingerprint; with compute.compile the model's forward goes through torch.compile. AdamW is
  fused and the EMA a foreach update: per-tensor loops were 10% of a tiny model's step.

Steps count from 1: after update `step` the weights are those of checkpoint `step-NNNNNN`, and
`loss_fn(model, batch, step)` computes update `step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import mmap
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from latentforge import checkpoint as ckpt
from latentforge.checkpoint import load_checkpoint_weights
from latentforge.errors import ConfigError
from latentforge.malloc import tune_malloc
from latentforge.raycluster import init_ray, use_ray
from latentforge.storage import read_json_dict, write_bytes_atomic
from latentforge.tracking import TAG_PREFIX, Tracker

if TYPE_CHECKING:
    from latentforge.config import ComputeConfig, TrainConfig

__all__ = ["EMA", "GlobalBatchSampler", "TrainResult", "TrainSpec", "build_optimizer",
           "clip_gradients", "default_collate", "load_checkpoint_weights", "load_optimizer_state",
           "lr_at", "read_metrics", "resolve_precision", "seed_step", "train", "train_step",
           "unwrap_model"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Fields that change bookkeeping, not the weights: a checkpoint written under other values of
# these is still resumed.
BOOKKEEPING_FIELDS = ("save_every", "keep_last", "log_every")

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, Any]]]
Collate = Callable[[dict[str, np.ndarray], torch.device], Batch]


def default_collate(arrays: dict[str, np.ndarray], device: torch.device) -> Batch:
    """uint8 (B, H, W, C) arrays -> float (B, C, H, W) in [-1, 1]; other arrays as they are."""
    batch = {}
    for key, value in arrays.items():
        # Move to the device before converting, so that uint8 (a quarter of the bytes) travels.
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(device, non_blocking=True)
        if value.dtype == np.uint8 and value.ndim == 4:
            tensor = tensor.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
            tensor = tensor.div_(127.5).sub_(1.0)
        batch[key] = tensor
    return batch


@dataclass
class TrainSpec:
    """What to train: the model, its loss and the arrays it learns from."""

    build_model: Callable[[], nn.Module]
    """Builds the model on the CPU; picklable for Ray (a top-level function or functools.partial)."""
    loss_fn: LossFn
    """(model, batch, step) -> (scalar mean loss, metrics). `model` is DDP-wrapped on several
    workers: call it (model(x)) rather than its methods, or gradients are not averaged; use
    `unwrap_model` for attributes. Metrics may be floats or 0-dim tensors; they are averaged
    over the logging window and the workers."""
    data: dict[str, np.ndarray]
    """Arrays indexed along axis 0, e.g. {"images": uint8 (N, H, W, C), "labels": int64 (N,)};
    np.memmap files are reopened by Ray workers (shared filesystem), other arrays are shipped."""
    collate: Collate = default_collate
    """(arrays of one rank's batch, device) -> batch tensors on the device."""
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
    """Optional (EMA model in eval mode on the CPU, step) -> metrics, run by rank 0 every
    `eval_every` steps (not at the last step: the stage evaluates the final weights itself).
    Picklable for Ray. The rows reach the tracker like the training metrics."""
    eval_every: int = 0
    code: str = ""
    """A digest of the code behind the model and loss (`paths.code_sha256(stage)`): a
    checkpoint written by other code is not resumed, nor handed back as finished."""


@dataclass
class TrainResult:
    """What `train` hands back; weights are CPU tensors from the final checkpoint."""

    ema_state: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    steps: int
    resumed_from: int
    images_per_s: float
    seconds: float
    nodes: list[str] = dataclasses.field(default_factory=list)  # Ray Train workers' node ids
    precision: str = "fp32"  # what the run trained in: fp32 or bf16 (autocast)
    compiled: bool = False  # whether the model's forward went through torch.compile
    # Where the updates ran (rank 0), which decides the last digits: torch's thread count and
    # the fp32 Linear backend (models/layers.py); a run found finished reads them from its
    # checkpoint folder (empty where that run did not record them).
    numerics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def training_meta(self) -> dict[str, Any]:
        """How the weights were trained, for a stage's output meta."""
        return {"precision": self.precision, "compile": self.compiled, **self.numerics}


# --------------------------------------------------------------------------------------------
# Pieces of one update (small, pure, tested on their own).
# --------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (1-based): linear warm-up, then cosine to lr*min_lr_ratio."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(parameters: Any, max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0: leave them); return the norm."""
    # With an infinite bound torch still reports the norm and scales by exactly 1.
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))


class EMA:
    """Exponential moving average of a model's state; with decay 0 it is the model itself."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self._model = model
        live = model.state_dict()
        self._state = {k: v.detach().clone() for k, v in live.items()} if decay > 0 else None
        # state_dict() tensors share storage with the model, so these pairs stay current.
        self._pairs = list(zip(self._state.values(), live.values(), strict=True)) if self._state else []
        floats = [(avg, now) for avg, now in self._pairs if avg.is_floating_point()]
        self._float_avgs, self._float_now = [a for a, _ in floats], [n for _, n in floats]

    @torch.no_grad()
    def update(self) -> None:
        """Step the EMA towards the current model: ema = decay * ema + (1 - decay) * weights."""
        # One foreach call rather than a lerp_ per tensor: the same kernel, a third of the time.
        if self._float_avgs:
            torch._foreach_lerp_(self._float_avgs, self._float_now, 1.0 - self.decay)
        for avg, now in self._pairs:
            if not avg.is_floating_point():  # integer buffers (counters) are copied, not averaged
                avg.copy_(now)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state if self._state is not None else self._model.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self._state is None:
            return
        for key, avg in self._state.items():
            avg.copy_(state[key])


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters: fused (one kernel for every parameter) where torch has
    the kernel for their device, else foreach.

    Measured on the CPU (1 thread): the per-tensor loop took 6.6 ms per step for the tiny
    tokenizer's 66 tensors, foreach 4.8 ms, fused 1.6 ms (of a ~60 ms step); fused rounds
    differently from the loop (1 ulp), foreach not at all.
    """
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state but keep this optimizer's implementation (fused/foreach):
    load_state_dict takes those flags from the saved groups, and a resumed run must step as
    an uninterrupted one does."""
    impl: dict[str, Any] = {k: optimizer.defaults[k] for k in ("fused", "foreach")
                            if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(impl)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class GlobalBatchSampler:
    """The global batch of every update as a pure function of (seed, step), so nothing to save.

    Epochs are seeded permutations of all examples read back to back; update `step` takes the
    next `batch_size` positions (a batch may span two epochs). Every rank computes the same
    global batch and takes its contiguous slice.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError("no training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 1:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, epoch, 0xDA7A])
            self._cache[epoch] = rng.permutation(self.num_examples)
        return self._cache[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of update `step`'s global batch, (batch_size,)."""
        positions = np.arange((step - 1) * self.batch_size, step * self.batch_size)
        epochs = positions // self.num_examples
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.num_examples]
        return out

    def rank_indices(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """This rank's contiguous slice of the global batch, sorted for memmap locality."""
        per_rank = self.batch_size // world_size
        return np.sort(self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank])


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random for update `step` on `rank`."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def capture_rng() -> dict[str, Any]:
    """The global RNG states as tensors and plain containers (torch.load weights_only reads them)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    _, keys, pos, has_gauss, cached = legacy
    version, py_state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Put back what `capture_rng` took."""
    torch.set_rng_state(states["torch"])
    npy = states["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def run_fingerprint(cfg: TrainConfig, data: dict[str, np.ndarray], code: str = "") -> str:
    """What must match for a checkpoint to be resumed: the config (less bookkeeping), data
    shapes, and the code's digest where the stage gives one."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BOOKKEEPING_FIELDS}
    fields["data"] = {k: [str(v.dtype), list(v.shape)] for k, v in data.items()}
    if code:
        fields["code"] = code
    return json.dumps(fields, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Metric rows: rank 0 appends, the driver reads.
# --------------------------------------------------------------------------------------------


def read_metrics(ckpt_dir: str | Path) -> list[dict[str, float]]:
    """All metric rows in `ckpt_dir/metrics.jsonl` (a torn last line is skipped)."""
    path = Path(ckpt_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append_metrics(ckpt_dir: Path, row: dict[str, float]) -> None:
    with open(ckpt_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _keep_metrics_upto(ckpt_dir: Path, step: int) -> None:
    """Drop rows of updates after `step`: a crashed attempt logged them and they will be redone."""
    rows = [r for r in read_metrics(ckpt_dir) if r["step"] <= step]
    write_bytes_atomic(ckpt_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _forward(tracker: Tracker, rows: list[dict[str, float]]) -> None:
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))


# --------------------------------------------------------------------------------------------
# The loop, identical in-process and in a Ray worker.
# --------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    """Where the loop runs: rank, world size, device, and how to wrap the model (DDP or not)."""

    rank: int
    world_size: int
    device: torch.device
    wrap: Callable[[nn.Module], nn.Module]


@dataclass
class _LoopStats:
    steps_run: int
    seconds: float
    images_per_s: float
    nodes: tuple[str, ...] = ()
    numerics: dict[str, Any] = dataclasses.field(default_factory=dict)  # see TrainResult


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None,
               loss_fn: LossFn, batch: Batch, step: int, cfg: TrainConfig
               ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """One update (the learning rate already set): the loss under bf16 autocast if
    `cfg.bf16`, backward, clipping, AdamW, EMA. Returns (loss, the loss's metrics, grad norm)."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss, metrics = loss_fn(model, batch, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update()
    return loss, metrics, grad_norm


def _reduce_mean(values: list[torch.Tensor | float], worker: _Worker) -> list[float]:
    """Average a few scalars over the workers (one all-reduce)."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=worker.device).detach()
                          for v in values])
    if worker.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(packed)
        packed /= worker.world_size
    return packed.tolist()


def compile_in_place(model: nn.Module) -> None:
    """torch.compile the model's forward (state_dict keys stay), its random numbers drawn by
    torch's own kernels (inductor's `fallback_random`, for this model only): the compiled code
    then draws what eager draws, and on CPU inductor's own generator cost a tiny maskgit step
    ~8 ms of dropout masks (38 ms compiled against ~21 eager; 25 with the fallback)."""
    model.compile(options={"fallback_random": True})


def _run_loop(spec: TrainSpec, cfg: TrainConfig, ckpt_dir: Path, worker: _Worker,
              progress: bool, on_row: Callable[[dict[str, float]], None] | None,
              on_save: Callable[[int, Path | None], None] | None = None,
              compile_model: bool = False) -> _LoopStats:
    """Train from the newest checkpoint (or from scratch) to `cfg.steps`; rank 0 writes files.

    `on_save(step, folder)` runs on every rank after each save (rank 0 gets the checkpoint's
    folder, the others None): Ray Train's report is a call all workers make together.
    `compile_model`: torch.compile the model's forward (in place, so state_dict keys stay).
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts)
    model = spec.build_model()
    latest = ckpt.latest_checkpoint(ckpt_dir)
    resume = ckpt.load_checkpoint(latest) if latest is not None else None
    if resume is not None:
        model.load_state_dict(resume.model_state)
    model = worker.wrap(model)
    if compile_model:
        compile_in_place(unwrap_model(model))
    ema = EMA(unwrap_model(model), cfg.ema_decay)
    optimizer = build_optimizer(model, cfg)
    start = 0
    if resume is not None:
        load_optimizer_state(optimizer, resume.train_state["optimizer"])
        ema.load_state_dict(resume.ema_state)
        # Steps reseed anyway; restoring keeps the global generators where the saving run left them.
        restore_rng(resume.train_state["rng"])
        start = resume.step
        del resume
    fingerprint = run_fingerprint(cfg, spec.data, spec.code)
    sampler = GlobalBatchSampler(len(next(iter(spec.data.values()))), cfg.batch_size, cfg.seed)
    model.train()

    sums: dict[str, torch.Tensor | float] = {}
    window_steps, window_start = 0, time.perf_counter()
    loop_start = window_start
    for step in range(start + 1, cfg.steps + 1):
        seed_step(cfg.seed, step, worker.rank)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sampler.rank_indices(step, worker.rank, worker.world_size)
        batch = spec.collate({k: v[idx] for k, v in spec.data.items()}, worker.device)
        loss, metrics, grad_norm = train_step(model, optimizer, ema, spec.loss_fn, batch, step,
                                              cfg)

        # Sum as tensors: no device sync until a row is logged.
        for key, value in {**metrics, "loss": loss, "grad_norm": grad_norm}.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            sums[key] = sums.get(key, 0.0) + value
        window_steps += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            keys = sorted(sums)
            means = _reduce_mean([sums[k] / window_steps for k in keys], worker)
            now = time.perf_counter()
            row = {"step": step, **dict(zip(keys, means, strict=True)), "lr": lr,
                   "images_per_s": window_steps * cfg.batch_size / max(now - window_start, 1e-9)}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {step}")
            if worker.rank == 0:
                _append_metrics(ckpt_dir, row)
                if on_row is not None:
                    on_row(row)
                eta = (now - loop_start) / (step - start) * (cfg.steps - step)
                line = (f"step {step}/{cfg.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                        f"{row['images_per_s']:.0f} img/s ETA {_format_eta(eta)}")
                log.info(line)
                if progress:
                    print(line, file=sys.stderr, flush=True)
            sums, window_steps, window_start = {}, 0, time.perf_counter()

        if (worker.rank == 0 and spec.evaluate is not None and spec.eval_every
                and step % spec.eval_every == 0 and step != cfg.steps):
            row = {"step": step, **_evaluate_ema(spec, ema, step)}
            _append_metrics(ckpt_dir, row)
            if on_row is not None:
                on_row(row)
            log.info("step %d eval: %s", step, ", ".join(
                f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

        if step % cfg.save_every == 0 or step == cfg.steps:
            folder = None
            if worker.rank == 0:
                folder = ckpt.save_checkpoint(
                    ckpt_dir, step, unwrap_model(model).state_dict(), ema.state_dict(),
                    {"optimizer": optimizer.state_dict(), "rng": capture_rng(),
                     "fingerprint": fingerprint}, keep_last=cfg.keep_last)
            if on_save is not None:
                on_save(step, folder)

    seconds = time.perf_counter() - loop_start
    steps_run = cfg.steps - start
    return _LoopStats(steps_run, seconds, steps_run * cfg.batch_size / max(seconds, 1e-9),
                      numerics=loop_numerics(worker.device))


NUMERICS_FILE = "numerics.json"


def loop_numerics(device: torch.device) -> dict[str, Any]:
    """What decides a training process's last digits besides its params: its torch threads
    and, on the CPU, where fp32 Linear layers run."""
    from latentforge.models.layers import fp32_linear_backend

    numerics: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cpu":
        numerics["fp32_linear"] = fp32_linear_backend()
    return numerics


def _evaluate_ema(spec: TrainSpec, ema: EMA, step: int) -> dict[str, float]:
    """Run the stage's periodic evaluation on a CPU copy of the EMA weights, leaving the
    training RNG streams untouched (each step reseeds them anyway)."""
    assert spec.evaluate is not None
    model = spec.build_model()
    model.load_state_dict({k: v.detach().cpu() for k, v in ema.state_dict().items()})
    model.eval()
    rng = capture_rng()
    try:
        with torch.no_grad():
            return {f"eval/{k}": float(v) for k, v in spec.evaluate(model, step).items()}
    finally:
        restore_rng(rng)


# --------------------------------------------------------------------------------------------
# Running it: in-process or on Ray Train.
# --------------------------------------------------------------------------------------------


def _shapes_model(spec: TrainSpec) -> nn.Module:
    """The model on the meta device: its state_dict's keys and shapes, no memory, no init time."""
    try:
        with torch.device("meta"):
            return spec.build_model()
    except Exception:  # an __init__ that reads tensor values cannot run on meta tensors
        log.debug("build_model fails on the meta device; building it on the CPU", exc_info=True)
        return spec.build_model()


def _check_resumable(checkpoint: ckpt.Checkpoint, model: nn.Module) -> None:
    """Raise CheckpointError unless `_run_loop` can load `checkpoint` into `model` and its AdamW."""
    ckpt.check_weights_fit(checkpoint, model)
    state_file = checkpoint.path / ckpt.STATE_FILE
    missing = [k for k in ("optimizer", "rng") if k not in checkpoint.train_state]
    if missing:
        raise ckpt.CheckpointError(state_file, f"lacks {', '.join(missing)}; not a training state")
    optimizer = checkpoint.train_state["optimizer"]
    params = [tuple(p.shape) for p in model.parameters()]
    try:
        # AdamW numbers the parameters in model.parameters() order; a wrong count is refused by
        # load_state_dict, wrong moment shapes only at the next step, mid-run.
        counted = sum(len(group["params"]) for group in optimizer["param_groups"])
        shapes = {(int(i), tuple(v.shape)) for i, moments in optimizer["state"].items()
                  for v in moments.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(state_file, "its optimizer state is not AdamW's") from exc
    if counted != len(params):
        raise ckpt.CheckpointError(state_file, f"its optimizer state is for {counted} parameters, "
                                               f"the model has {len(params)}")
    wrong = sorted(i for i, shape in shapes if not 0 <= i < len(params) or params[i] != shape)
    if wrong:
        raise ckpt.CheckpointError(state_file, f"its optimizer moments of parameter(s) {wrong[:5]} "
                                               f"do not have the parameters' shapes")


def _prepare_ckpt_dir(ckpt_dir: Path, cfg: TrainConfig, spec: TrainSpec) -> int:
    """Clean leftovers, set aside checkpoints that cannot be read back, discard checkpoints of
    another configuration; return the resume step (0: start afresh).

    A resumable checkpoint is read whole here, on the driver, so that a bad one is set aside
    before a worker (in-process or on Ray Train, which gets the folder's bytes) loads it.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(ckpt_dir)
    fingerprint = run_fingerprint(cfg, spec.data, spec.code)
    shapes_model = functools.cache(functools.partial(_shapes_model, spec))  # once, if needed

    def check(checkpoint: ckpt.Checkpoint) -> None:
        # Another configuration's checkpoint (e.g. another model size, whose shapes differ) is
        # not broken: it is discarded below with all the others, not set aside.
        if checkpoint.train_state.get("fingerprint") == fingerprint:
            _check_resumable(checkpoint, shapes_model())

    resume = ckpt.find_resume_checkpoint(ckpt_dir, check)
    if resume is None:
        (ckpt_dir / METRICS_FILE).unlink(missing_ok=True)
        return 0
    if resume.train_state.get("fingerprint") != fingerprint:
        log.warning("checkpoints in %s belong to another configuration, data or code; starting "
                    "afresh", ckpt_dir)
        ckpt.prune_checkpoints(ckpt_dir, keep_last=0)
        (ckpt_dir / ckpt.LATEST_FILE).unlink(missing_ok=True)
        (ckpt_dir / METRICS_FILE).unlink(missing_ok=True)
        return 0
    _keep_metrics_upto(ckpt_dir, resume.step)
    return resume.step


def local_device(compute: ComputeConfig) -> torch.device:
    """The device for work in this process: the GPU with `compute.use_gpu`, else the CPU."""
    if compute.use_gpu and not torch.cuda.is_available():
        raise ConfigError("compute.use_gpu is true but torch sees no CUDA device here (a CPU "
                          f"build of torch {torch.__version__}, or no GPU visible): set "
                          "compute.use_gpu false, or compute.ray_address to a cluster with GPUs")
    return torch.device("cuda" if compute.use_gpu else "cpu")


def driver_device(compute: ComputeConfig, what: str) -> torch.device:
    """The device for work only the stage's own process does (`what`: RL fine-tuning, the
    evaluation's Inception features): the GPU with `compute.use_gpu` where this process sees
    one, else the CPU, saying so where use_gpu asked for a GPU. On a cluster, use_gpu is for
    the Ray workers; a driver on a machine without a GPU (a laptop, a CPU head node) still
    runs the stage, on its CPUs, where local_device would refuse."""
    if compute.use_gpu and not torch.cuda.is_available():
        log.warning("compute.use_gpu is set but this process (the driver) sees no CUDA device: "
                    "%s runs on its CPUs", what)
        return torch.device("cpu")
    return local_device(compute)


def _probe_step(spec: TrainSpec, cfg: TrainConfig, device: torch.device,
                batch_size: int) -> Callable[[bool], object]:
    """One training update of a fresh model on the first `batch_size` examples, as
    `step(bf16)`, for timing the two precisions (precision.choose_precision)."""
    model = spec.build_model().to(device)
    optimizer = build_optimizer(model, cfg)
    rows = np.arange(batch_size) % len(next(iter(spec.data.values())))
    batch = spec.collate({k: v[rows] for k, v in spec.data.items()}, device)
    configs = {bf16: dataclasses.replace(cfg, bf16=bf16) for bf16 in (False, True)}
    return lambda bf16: train_step(model, optimizer, None, spec.loss_fn, batch, 1, configs[bf16])


def _choose_precision_here(spec: TrainSpec, cfg: TrainConfig, device: torch.device,
                           batch_size: int) -> str:
    """compute.precision auto, measured in this process on `device`."""
    from latentforge.precision import choose_precision

    model = _shapes_model(spec)
    workload = (f"{type(model).__module__}.{type(model).__qualname__} "
                f"{sum(p.numel() for p in model.parameters())} params, batch {batch_size} "
                + ", ".join(f"{k} {v.dtype}{list(v.shape[1:])}" for k, v in sorted(spec.data.items())))
    rng = capture_rng()
    try:
        return choose_precision(device, workload,
                                functools.partial(_probe_step, spec, cfg, device, batch_size))
    finally:
        restore_rng(rng)


def _choose_precision_on_worker(spec: TrainSpec, cfg: TrainConfig, batch_size: int,
                                cpus: int, use_gpu: bool) -> str:
    """A Ray task with a training worker's resources: auto measured where the workers run."""
    torch.set_num_threads(cpus)
    device = torch.device("cuda" if use_gpu else "cpu")
    return _choose_precision_here(spec, cfg, device, batch_size)


def resolve_precision(spec: TrainSpec, cfg: TrainConfig, compute: ComputeConfig) -> str:
    """'fp32' or 'bf16': the stage's `bf16: true`, else compute.precision, with auto measured
    (or read from the cache) on the device the training runs on (latentforge/precision.py)."""
    requested = "bf16" if cfg.bf16 else compute.precision
    if requested != "auto":
        return requested
    if not use_ray(compute):
        return _choose_precision_here(spec, cfg, local_device(compute), cfg.batch_size)
    import ray

    # The driver may run on another machine than the workers (a cluster): ask one of them.
    init_ray(compute)
    per_rank = cfg.batch_size // compute.num_workers
    rows = np.arange(per_rank) % len(next(iter(spec.data.values())))
    sample = dataclasses.replace(spec, data={k: np.asarray(v[rows]) for k, v in spec.data.items()},
                                 evaluate=None)
    task = ray.remote(_choose_precision_on_worker).options(
        num_cpus=compute.cpus_per_worker, num_gpus=1 if compute.use_gpu else 0)
    return cast(str, ray.get(task.remote(sample, cfg, per_rank, compute.cpus_per_worker,
                                         compute.use_gpu)))


def _train_in_process(spec: TrainSpec, cfg: TrainConfig, compute: ComputeConfig, ckpt_dir: Path,
                      tracker: Tracker, progress: bool) -> _LoopStats:
    device = local_device(compute)
    # In-process training keeps the process's torch thread count: cpus_per_worker sizes Ray
    # workers, and the driver process owns the whole machine here.
    worker = _Worker(rank=0, world_size=1, device=device, wrap=lambda m: m.to(device))
    return _run_loop(spec, cfg, ckpt_dir, worker, progress,
                     on_row=lambda row: _forward(tracker, [row]), compile_model=compute.compile)


def _share_array(array: np.ndarray, same_node: bool) -> Any:
    """A picklable handle Ray workers turn back into the array (see `_open_array`).

    `same_node`: the workers run on this machine (the local instance), so a whole np.memmap
    (its buffer is the mapping itself) is reopened from its file. Anything else, and
    everything on a cluster, whose nodes do not see this disk, goes through the object store.
    """
    if (same_node and isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)
            and array.filename):
        return ("memmap", str(array.filename), array.dtype.str, array.shape, int(array.offset),
                "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C")
    import ray

    return ("ref", [ray.put(np.asarray(array))])  # in a list: Ray must not resolve it early


def _open_array(handle: Any) -> np.ndarray:
    if handle[0] == "memmap":
        _, filename, dtype, shape, offset, order = handle
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=tuple(shape),
                         offset=offset, order=order)
    import ray

    return ray.get(handle[1][0])


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: set threads, rebuild the spec, run the loop.

    Nothing here touches the driver's disk: the data arrive as object-store refs (or memmaps
    on the driver's own node), the checkpoint to resume from as bytes or from Ray Train's
    storage, and the worker's own checkpoints go to a scratch folder on its node, then to
    Ray Train's storage through `ray.train.report`. Metric rows, the node id and the final
    stats travel to the driver through a Ray queue.
    """
    import shutil
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    from latentforge.raycluster import node_id

    tune_malloc()  # a Ray Train worker is a fresh process; see latentforge/malloc.py
    torch.set_num_threads(config["cpus_per_worker"])
    context = ray.train.get_context()
    rank, queue = context.get_world_rank(), config["queue"]
    queue.put(("node", rank, node_id()))
    spec = dataclasses.replace(config["spec"],
                               data={k: _open_array(h) for k, h in config["data"].items()})
    device = ray.train.torch.get_device()
    # Some parameters only take part under some options (the tokenizer's mask and dropped
    # tokens with nested dropout / latent perturbation): DDP must not wait for their grads.
    wrap = functools.partial(ray.train.torch.prepare_model,
                             parallel_strategy_kwargs={"find_unused_parameters": True})
    worker = _Worker(rank=rank, world_size=context.get_world_size(), device=device, wrap=wrap)
    cfg = config["cfg"]
    scratch = Path(tempfile.mkdtemp(prefix="latentforge-train-"))
    try:
        restored = ray.train.get_checkpoint()  # set when Ray Train restarted the workers
        if restored is not None:
            with restored.as_directory() as folder:
                files = ckpt.checkpoint_files(folder)
                step = ckpt.read_train_state(Path(folder) / ckpt.STATE_FILE)["step"]
            ckpt.install_checkpoint_files(scratch, step, files)
        elif config["resume"] is not None:
            step, ref = config["resume"]
            ckpt.install_checkpoint_files(scratch, step, ray.get(ref[0]))

        def on_save(step: int, folder: Path | None) -> None:
            from ray.train import Checkpoint

            checkpoint = Checkpoint.from_directory(str(folder)) if folder is not None else None
            ray.train.report({"step": step}, checkpoint=checkpoint,
                             checkpoint_dir_name=ckpt.step_dir_name(step))
            if rank == 0:
                queue.put(("checkpoint", step))

        # No print here: Ray Train already forwards the workers' log records to the driver,
        # and a print on top showed every progress line three times.
        stats = _run_loop(spec, cfg, scratch, worker, progress=False,
                          on_row=(lambda row: queue.put(("row", row))) if rank == 0 else None,
                          on_save=on_save, compile_model=config["compile"])
        if rank == 0:
            queue.put(("stats", dataclasses.asdict(stats)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ray_storage(compute: ComputeConfig, ckpt_dir: Path) -> tuple[str, Any, Any, bool]:
    """(storage_path for RunConfig, its pyarrow filesystem or None, an fsspec filesystem to
    read it back, whether to remove it afterwards) for Ray Train's checkpoints."""
    import fsspec

    from latentforge.raycluster import check_storage_set
    from latentforge.storage import filesystem, is_url

    url = compute.storage_path
    if url is None:
        check_storage_set(compute)
        # Ray Train's own run state beside the checkpoints; removed after the run.
        local = ckpt_dir / f".ray-{uuid.uuid4().hex[:8]}"
        return str(local), None, fsspec.filesystem("file"), True
    if is_url(url):
        import pyarrow.fs

        fs, path = filesystem(url)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), fs, False
    return str(Path(url).resolve()), None, fsspec.filesystem("file"), False


def _fetch_checkpoint(fs: Any, folder: str, ckpt_dir: Path, step: int, keep_last: int,
                      url: str | None = None) -> None:
    """Copy a checkpoint Ray Train stored at `folder` (of `url`, compute.storage_path) into the
    driver's `ckpt_dir`; a storage failure is one line naming the URL (storage_errors)."""
    from latentforge.storage import storage_errors

    files = {}
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.STATE_FILE):
        with storage_errors(f"{url or folder} (checkpoint step {step})"), \
                fs.open(f"{folder}/{name}", "rb") as f:
            files[name] = f.read()
    ckpt.install_checkpoint_files(ckpt_dir, step, files, keep_last=keep_last)


# What Ray Train's failure says when a worker, its node or the link between workers went
# away (the survivors' collective read fails; Ray reports the dead actor or node).
_LOST = ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ActorUnavailableError",
         "Connection reset by peer", "Connection closed by peer", "Broken pipe")


def describe_train_failure(exc: BaseException, committed: list[tuple[int, Path]]
                           ) -> BaseException:
    """The error a failed Ray Train run ends the stage with: ours as they are (a worker's
    ConfigError, a storage line); Ray's and torch's as one line saying what was lost and where
    a rerun resumes, the traceback in the debug log."""
    from latentforge.errors import LatentForgeError

    if isinstance(exc, LatentForgeError | KeyboardInterrupt | SystemExit):
        return exc
    cause: BaseException | None = exc
    while cause is not None:  # a worker's own one-line error, as Ray chained it
        if isinstance(cause, LatentForgeError):
            return cause
        cause = cause.__cause__ or cause.__context__
    log.debug("Ray Train failed", exc_info=exc)
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The worker's error, not Ray's paragraph around it: the last exception line there.
    said = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[0])
    lost = any(word in text for word in _LOST)
    what = ("a worker, its node or the link between workers was lost" if lost
            else "run with -v for the traceback")
    resume = (f"a rerun resumes from step {committed[-1][0]}, the last checkpoint copied here"
              if committed else "no checkpoint reached this machine: a rerun starts afresh")
    return LatentForgeError(f"Ray Train stopped ({what}): {said[:300]}; {resume}")


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt|Failed\w*):? ")


def _train_on_ray(spec: TrainSpec, cfg: TrainConfig, compute: ComputeConfig, ckpt_dir: Path,
                  tracker: Tracker, progress: bool) -> _LoopStats:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from latentforge.raycluster import node_id, on_cluster, record_nodes

    # `progress` has no say here: Ray forwards the workers' log lines to the driver by itself.
    init_ray(compute)
    storage_path, storage_fs, fs, remove_after = _ray_storage(compute, ckpt_dir)
    run_name = f"train-{uuid.uuid4().hex[:8]}"
    run_root = f"{storage_path.rstrip('/')}/{run_name}"
    committed = ckpt.committed_steps(ckpt_dir)
    resume = None
    if committed:  # shipped as bytes: the workers' nodes do not see ckpt_dir
        step, folder = committed[-1]
        resume = (step, [ray.put(ckpt.checkpoint_files(folder))])
    # On the driver's node: a worker node that dies must not take the driver's inbox with it.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy":
                                 NodeAffinitySchedulingStrategy(node_id(), soft=False)})
    config = {"spec": dataclasses.replace(spec, data={}), "cfg": cfg,
              "data": {k: _share_array(v, same_node=not on_cluster(compute))
                       for k, v in spec.data.items()},
              "resume": resume, "queue": queue, "cpus_per_worker": compute.cpus_per_worker,
              "compile": compute.compile}
    trainer = TorchTrainer(
        _ray_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last)))

    # fit() blocks; it runs in a thread so that this (driver) thread can forward metric rows
    # to the tracker and commit the reported checkpoints while training goes on (MLflow's
    # active run is per thread).
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the driver thread below
            failure.append(exc)

    stats: dict[str, Any] = {}
    nodes: dict[int, str] = {}

    def handle(item: tuple) -> None:
        if item[0] == "row":
            _append_metrics(ckpt_dir, item[1])
            _forward(tracker, [item[1]])
        elif item[0] == "checkpoint":
            step = item[1]
            _fetch_checkpoint(fs, f"{run_root}/{ckpt.step_dir_name(step)}", ckpt_dir, step,
                              cfg.keep_last, compute.storage_path)
        elif item[0] == "node":
            nodes[item[1]] = item[2]
        elif item[0] == "stats":
            stats.update(item[1])

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while True:
            alive = thread.is_alive()
            try:
                handle(queue.get(timeout=0.5))
                continue
            except Empty:
                if not alive:
                    break
    finally:
        thread.join(timeout=5)
        ray.kill(cast(Any, queue.actor))
        # Failed or not: a rerun resumes from the driver's copies (shipped as bytes) and
        # trains under a new run name, so nothing reads this run's folder again (failed
        # runs' folders piled up in shared storage).
        with contextlib.suppress(OSError, FileNotFoundError):
            fs.rm(run_root if not remove_after else storage_path, recursive=True)
    if nodes:
        ids = record_nodes(tracker, "train", nodes.values())
        log.info("Ray Train: %d worker(s) on node(s) %s", len(nodes),
                 ", ".join(n[:12] for n in ids))
    if failure:
        raise describe_train_failure(failure[0], ckpt.committed_steps(ckpt_dir))
    if not stats:
        raise RuntimeError("Ray Train finished without the workers' final statistics")
    return _LoopStats(**{**stats, "nodes": tuple(sorted(set(nodes.values())))})


def train(spec: TrainSpec, cfg: TrainConfig, compute: ComputeConfig, ckpt_dir: str | Path,
          tracker: Tracker | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume, or return a finished run) and hand back the final weights and metrics.

    In-process when `compute` asks for one worker and no cluster, else on Ray Train. The
    tracker receives every metric row of the run, earlier attempts' rows included, from this
    (the driver's) thread only. Progress lines go to the `latentforge.training` logger, and
    in-process with `progress` also to stderr; Ray forwards its workers' log lines itself.
    """
    tracker = tracker if tracker is not None else Tracker()
    ckpt_dir = Path(ckpt_dir).resolve()
    world_size = compute.num_workers if use_ray(compute) else 1
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over "
                         f"{world_size} workers")
    lengths = {k: len(v) for k, v in spec.data.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f"spec.data needs arrays of one common length, got {lengths}")

    if cfg.warmup_steps >= cfg.steps:  # lowering only steps for a quick run does this
        log.warning("warmup_steps = %d is not below steps = %d (%s): the learning rate is still "
                    "rising when training stops and never decays; lower the stage's "
                    "warmup_steps with its steps", cfg.warmup_steps, cfg.steps, ckpt_dir.name)
    started = time.perf_counter()
    precision = resolve_precision(spec, cfg, compute)
    # The loop reads cfg.bf16; the fingerprint then keeps an fp32 run from resuming a bf16 one.
    cfg = dataclasses.replace(cfg, bf16=precision == "bf16")
    resumed_from = _prepare_ckpt_dir(ckpt_dir, cfg, spec)
    _forward(tracker, read_metrics(ckpt_dir))
    if resumed_from >= cfg.steps:
        log.info("%s already holds step %d of %d; nothing to train", ckpt_dir, resumed_from,
                 cfg.steps)
        stats = _LoopStats(0, 0.0, 0.0)
    else:
        if resumed_from:
            log.info("resuming %s from step %d", ckpt_dir, resumed_from)
        run = _train_on_ray if use_ray(compute) else _train_in_process
        stats = run(spec, cfg, compute, ckpt_dir, tracker, progress)

    # The training process's (a Ray worker's on a cluster; the stage's own tags describe the
    # stage's process), kept beside the checkpoints: a rerun that finds the run finished
    # writes the same meta as the run that trained.
    numerics_file = ckpt_dir / NUMERICS_FILE
    if stats.numerics:
        write_bytes_atomic(numerics_file, json.dumps(stats.numerics, sort_keys=True).encode())
    numerics = stats.numerics or read_json_dict(numerics_file)  # {}: unknown
    if numerics:
        tracker.set_tags({f"{TAG_PREFIX}train_{k}": str(v) for k, v in numerics.items()})
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is None:  # only if something deleted the folder while we trained
        raise FileNotFoundError(f"training ended without a checkpoint in {ckpt_dir}")
    final = ckpt.load_checkpoint(latest)
    return TrainResult(ema_state=final.ema_state, model_state=final.model_state,
                       history=read_metrics(ckpt_dir), steps=final.step,
                       resumed_from=resumed_from, images_per_s=stats.images_per_s,
                       seconds=time.perf_counter() - started, nodes=list(stats.nodes),
                       precision=precision, compiled=compute.compile, numerics=numerics)


def loss_curve_csv(history: list[dict[str, float]]) -> str:
    """`step,loss` rows of the training history (not timings, which vary run to run)."""
    rows = [r for r in history if "loss" in r]
    return "step,loss\n" + "".join(f"{int(r['step'])},{r['loss']:.6f}\n" for r in rows)
