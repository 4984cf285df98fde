"""The `judge` stage: a small CNN classifier trained on the prepared train split.

Its penultimate features define FD-judge and precision/recall; its class log-probabilities
define judge accuracy, IS-judge and the default RL reward. Later stages load it by path with
`load_judge(path)` and never touch its internals.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latentforge import paths, storage
from latentforge.checkpoint import load_model_folder
from latentforge.config import JudgeConfig, Params
from latentforge.data import load_prepared
from latentforge.lineage import REGISTERED_MODELS
from latentforge.models.judge import Judge, JudgeModelConfig
from latentforge.runner import StageResult
from latentforge.tracking import Tracker
from latentforge.training import TrainSpec, loss_curve_csv, train

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


def run(params: Params, out_dir: str | Path = paths.JUDGE, prepared_dir: str | Path = paths.PREPARED,
        tracker: Tracker | None = None) -> StageResult:
    cfg: JudgeConfig = params.judge
    tracker = tracker or Tracker()
    prepared = load_prepared(prepared_dir)
    train_x, train_y = prepared.split("train")
    val_x, val_y = prepared.split("val")
    tracker.log_input("prepared", str(Path(prepared_dir).resolve()), prepared.manifest_sha256,
                      context="training")
    model_cfg = JudgeModelConfig(image_size=prepared.resolution, channels=prepared.channels,
                                 num_classes=prepared.num_classes, width=cfg.width,
                                 feature_dim=cfg.feature_dim, dropout=cfg.dropout)
    spec = TrainSpec(build_model=functools.partial(build_model, model_cfg),
                     loss_fn=functools.partial(judge_loss, shift=cfg.augment_shift),
                     data={"images": train_x, "labels": train_y})
    ckpt = paths.checkpoint_dir("judge", prepared.manifest_sha256)
    result = train(spec, cfg, params.compute, ckpt, tracker=tracker, progress=False)

    model = Judge(model_cfg)
    model.load_state_dict(result.ema_state)
    meta: dict[str, Any] = {"model": asdict(model_cfg), "class_names": prepared.class_names,
            "prepared_sha256": prepared.manifest_sha256}
    scorer = JudgeScorer(model, meta)
    _, logp = scorer.score(val_x)
    val_acc = float((logp.argmax(-1) == np.asarray(val_y)).mean()) if len(val_y) else float("nan")
    meta["val_accuracy"] = val_acc
    with storage.atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        storage.write_bytes_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        storage.write_bytes_atomic(tmp / "train_curve.csv", loss_curve_csv(result.history).encode())
    weights_sha = storage.sha256_file(Path(out_dir) / WEIGHTS)
    log.info("judge: val accuracy %.4f on %d images", val_acc, len(val_y))
    tracker.log_artifact(Path(out_dir) / META)
    tracker.log_model("judge", Path(out_dir), registered_name=REGISTERED_MODELS["judge"].name,
                      tags={"stage": "judge", "prepared_sha256": prepared.manifest_sha256,
                            "weights_sha256": weights_sha})
    metrics = {"val_accuracy": round(val_acc, 6)}
    return StageResult(
        metrics=metrics,
        summary=f"judge val accuracy **{val_acc:.4f}** on {len(val_y)} images "
                f"({result.steps} steps, {result.images_per_s:.0f} images/s)",
        digests={"judge": weights_sha},
        timings={"train_images_per_s": result.images_per_s, "train_seconds": result.seconds,
                 "resumed_from_step": result.resumed_from})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
