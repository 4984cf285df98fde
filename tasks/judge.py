"""The `judge` stage: two small CNN classifiers trained on the prepared train split.

The judge's class log-probabilities are the RL rewards (and its features the tokenizer's
rFD-judge). The evaluator, trained on the same data with another seed and width, grades every
generated sample: its penultimate features define gFD and precision/recall, its class
log-probabilities accuracy and IS. A reward network that also grades its own result is no
evidence (RL learns the judge's class directions), hence two networks. Later stages load
either by path with `load_judge(path)` and never touch their internals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latentforge import paths, storage
from latentforge.checkpoint import load_model_folder, save_weights
from latentforge.config import JudgeConfig, Params
from latentforge.data import Prepared, load_prepared
from latentforge.lineage import REGISTERED_MODELS
from latentforge.models.judge import Judge, JudgeModelConfig
from latentforge.runner import StageResult
from latentforge.tracking import Tracker
from latentforge.training import TrainResult, TrainSpec, loss_curve_csv, train

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "judge.json"


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]; float tensors pass through."""
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        return images.float()
    arr = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: memmaps are read-only
    return arr.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class JudgeScorer:
    """The judge as later stages use it: features and class log-probs of images."""

    def __init__(self, model: Judge, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.meta = meta
        self.class_names: list[str] = meta["class_names"]
        self.sha256: str = meta.get("sha256", "")

    @torch.no_grad()
    def score(self, images: np.ndarray | torch.Tensor, batch_size: int = 512
              ) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, F), log_probs (N, classes)) as float64 numpy arrays."""
        feats, logps = [], []
        for start in range(0, len(images), batch_size):
            x = images_to_tensor(images[start:start + batch_size])
            f = self.model.features(x)
            feats.append(f.double().numpy())
            logps.append(F.log_softmax(self.model.head(f), dim=-1).double().numpy())
        if not feats:
            return np.zeros((0, self.meta["model"]["feature_dim"])), np.zeros((0, len(self.class_names)))
        return np.concatenate(feats), np.concatenate(logps)


def load_judge(path: str | Path = paths.JUDGE) -> JudgeScorer:
    """Load the judge stage's output folder (weights in safetensors, config in JSON)."""
    model, meta = load_model_folder(path, META, "judge",
                                    lambda cfg: Judge(JudgeModelConfig(**cfg)))
    return JudgeScorer(model, meta)


def build_model(model_cfg: JudgeModelConfig) -> Judge:
    return Judge(model_cfg)


def judge_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, shift: int
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cross-entropy on randomly shifted images (the harness seeds torch per step)."""
    x, y = batch["images"], batch["labels"]
    if shift > 0:
        # Pad with background (-1) and crop back at a random offset per sample.
        b, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
        dx, dy = torch.randint(0, 2 * shift + 1, (2, b))
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    acc = (logits.argmax(-1) == y).float().mean()
    return loss, {"train_accuracy": acc.detach()}


class _Prefixed(Tracker):
    """Training metrics as `prefix/name`: the judge's and the evaluator's share one run."""

    def __init__(self, tracker: Tracker, prefix: str) -> None:
        self._tracker, self._prefix = tracker, prefix

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._tracker.log_metrics({f"{self._prefix}{k}": v for k, v in metrics.items()}, step)


@dataclass
class _Trained:
    role: str
    out_dir: Path
    val_accuracy: float
    result: TrainResult
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    weights_sha256: str = ""

    def write(self, folder: Path) -> None:
        save_weights(self.state, folder / WEIGHTS)
        storage.write_bytes_atomic(folder / META,
                                   json.dumps(self.meta, indent=2, sort_keys=True).encode())
        storage.write_bytes_atomic(folder / "train_curve.csv",
                                   loss_curve_csv(self.result.history).encode())


def _train_one(role: str, cfg: JudgeConfig, params: Params, prepared: Prepared, out_dir: Path,
               tracker: Tracker) -> _Trained:
    """Train the judge or the evaluator (cfg already carries the role's seed and width)."""
    train_x, train_y = prepared.split("train")
    val_x, val_y = prepared.split("val")
    model_cfg = JudgeModelConfig(image_size=prepared.resolution, channels=prepared.channels,
                                 num_classes=prepared.num_classes, width=cfg.width,
                                 feature_dim=cfg.feature_dim, dropout=cfg.dropout)
    spec = TrainSpec(build_model=functools.partial(build_model, model_cfg),
                     loss_fn=functools.partial(judge_loss, shift=cfg.augment_shift),
                     data={"images": train_x, "labels": train_y},
                     code=paths.code_sha256("judge"))
    ckpt = paths.checkpoint_dir(role, prepared.manifest_sha256)
    log.info("%s: training (width %d, seed %d)", role, cfg.width, cfg.seed)
    result = train(spec, cfg, params.compute, ckpt, tracker=tracker, progress=False)

    model = Judge(model_cfg)
    model.load_state_dict(result.ema_state)
    meta: dict[str, Any] = {"model": asdict(model_cfg), "class_names": prepared.class_names,
                            "prepared_sha256": prepared.manifest_sha256, "role": role,
                            "seed": cfg.seed, "training": result.training_meta()}
    scorer = JudgeScorer(model, meta)
    _, logp = scorer.score(val_x)
    val_acc = float((logp.argmax(-1) == np.asarray(val_y)).mean()) if len(val_y) else float("nan")
    meta["val_accuracy"] = val_acc
    log.info("%s: val accuracy %.4f on %d images", role, val_acc, len(val_y))
    return _Trained(role, out_dir, val_acc, result,
                    {k: v.contiguous() for k, v in model.state_dict().items()}, meta)


def run(params: Params, out_dir: str | Path = paths.JUDGE, prepared_dir: str | Path = paths.PREPARED,
        tracker: Tracker | None = None, evaluator_dir: str | Path | None = None) -> StageResult:
    """Train the judge into `out_dir` and the evaluator into `evaluator_dir` (default: the
    folder `evaluator` beside `out_dir`)."""
    cfg: JudgeConfig = params.judge
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    evaluator_dir = Path(evaluator_dir) if evaluator_dir else out_dir.parent / "evaluator"
    prepared = load_prepared(prepared_dir, verify=True)
    tracker.log_input("prepared", str(Path(prepared_dir).resolve()), prepared.manifest_sha256,
                      context="training")
    # The evaluator's config swaps seed and width with the judge's (the check that they differ
    # then still holds); its training metrics are logged as evaluator/NAME.
    evaluator_cfg = dataclasses.replace(cfg, seed=cfg.evaluator_seed, width=cfg.evaluator_width,
                                        evaluator_seed=cfg.seed, evaluator_width=cfg.width)
    trained = [_train_one("judge", cfg, params, prepared, out_dir, tracker),
               _train_one("evaluator", evaluator_cfg, params, prepared, evaluator_dir,
                          _Prefixed(tracker, "evaluator/"))]
    # Both are written only once both trained: a failure in between (the evaluator's training,
    # a full disk) leaves the previous pair, never a new judge beside an old evaluator.
    with storage.atomic_dirs(*(t.out_dir for t in trained)) as folders:
        for t, folder in zip(trained, folders, strict=True):
            t.write(folder)
    for t in trained:
        t.weights_sha256 = storage.sha256_file(t.out_dir / WEIGHTS)
    for t, role_cfg in zip(trained, (cfg, evaluator_cfg), strict=True):
        tracker.log_artifact(t.out_dir / META, artifact_path=t.role)
        tracker.log_model(t.role, t.out_dir, registered_name=REGISTERED_MODELS[t.role].name,
                          tags={"stage": "judge", "role": t.role, "width": str(role_cfg.width),
                                "seed": str(role_cfg.seed),
                                "prepared_sha256": prepared.manifest_sha256,
                                "weights_sha256": t.weights_sha256})
    judge, evaluator = trained
    metrics = {"val_accuracy": round(judge.val_accuracy, 6),
               "evaluator_val_accuracy": round(evaluator.val_accuracy, 6)}
    n_val = len(prepared.split("val")[1])
    return StageResult(
        metrics=metrics,
        summary=f"judge (the reward) val accuracy **{judge.val_accuracy:.4f}**, evaluator (the "
                f"grader) **{evaluator.val_accuracy:.4f}** on {n_val} images "
                f"({judge.result.steps} steps each, "
                + (f"{judge.result.images_per_s:.0f} images/s)" if judge.result.images_per_s
                   else "from finished checkpoints: nothing trained)"),
        digests={"judge": judge.weights_sha256, "evaluator": evaluator.weights_sha256},
        timings={"train_images_per_s": judge.result.images_per_s,
                 "train_seconds": judge.result.seconds + evaluator.result.seconds,
                 "resumed_from_step": judge.result.resumed_from})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker, evaluator_dir=paths.EVALUATOR)
