"""The `tokenizer` stage: train a TiTok-style 1D tokenizer (or the 2D baseline) and measure it.

Train on the prepared train split with the shared harness; evaluate the EMA weights on val:
PSNR, SSIM, rFD-judge, judge accuracy on reconstructions, codebook usage (fsq/vq/binary), PSNR per
prefix length (nested dropout) and pFD-judge (FD of reconstructions decoded from perturbed
latents, RobustTok). Later stages load the result with `load_tokenizer(path)`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from latentforge import metrics, paths, storage
from latentforge.checkpoint import load_model_folder, save_weights
from latentforge.config import Params, TokenizerConfig
from latentforge.data import load_prepared
from latentforge.figures import prefix_plot
from latentforge.images import make_grid, save_png, to_uint8
from latentforge.lineage import REGISTERED_MODELS
from latentforge.models.tokenizer import (
    Tokenizer,
    TokenizerModelConfig,
    latent_spread,
    tokenizer_config,
)
from latentforge.runner import StageResult
from latentforge.tasks.judge import images_to_tensor, load_judge
from latentforge.tracking import Tracker
from latentforge.training import TrainSpec, loss_curve_csv, train, unwrap_model

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "tokenizer.json"
PREFIX_PLOT = paths.PLOTS / "tokenizer_prefix_psnr.csv"


class TokenizerHandle:
    """A trained tokenizer as later stages use it: images <-> latents, in eval mode."""

    def __init__(self, model: Tokenizer, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.meta = meta
        self.sha256: str = meta.get("sha256", "")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TokenizerHandle:
        """Move the model; encode/decode take and return numpy arrays on the host either way."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, C) -> {"latents" (N, K, D), and "codes" (N, K) or "mean"/"logvar"}."""
        out: dict[str, list[np.ndarray]] = {}
        device = self.device
        for start in range(0, len(images), batch_size):
            enc = self.model.encode(images_to_tensor(images[start:start + batch_size]).to(device))
            for key in ("latents", "codes", "mean", "logvar"):
                value = getattr(enc, key)
                if value is not None:
                    out.setdefault(key, []).append(value.float().cpu().numpy() if key != "codes"
                                                   else value.cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    @torch.no_grad()
    def decode(self, latents: np.ndarray | torch.Tensor, keep: int | None = None,
               batch_size: int = 256) -> np.ndarray:
        """latents (N, K, D) -> uint8 images (N, H, W, C)."""
        pics = []
        device = self.device
        for start in range(0, len(latents), batch_size):
            z = torch.as_tensor(np.asarray(latents[start:start + batch_size]), dtype=torch.float32,
                                device=device)
            pics.append(to_uint8(self.model.decode(z, keep=keep).clamp(-1, 1).cpu().numpy()))
        return np.concatenate(pics) if pics else np.zeros((0,), np.uint8)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(images)["latents"])


def load_tokenizer(path: str | Path = paths.TOKENIZER) -> TokenizerHandle:
    """Load the tokenizer stage's output folder (weights in safetensors, config in JSON)."""
    model, meta = load_model_folder(path, META, "tokenizer",
                                    lambda cfg: Tokenizer(TokenizerModelConfig(**cfg)))
    return TokenizerHandle(model, meta)


def model_config(cfg: TokenizerConfig, resolution: int, channels: int) -> TokenizerModelConfig:
    return tokenizer_config(
        cfg.size, image_size=resolution, channels=channels, layout=cfg.layout,
        patch_size=cfg.patch_size, num_tokens=cfg.num_tokens, token_dim=cfg.token_dim,
        quantizer=cfg.quantizer, fsq_levels=list(cfg.fsq_levels), codebook_size=cfg.codebook_size,
        commitment=cfg.commitment, entropy_weight=cfg.entropy_weight_value, kl_weight=cfg.kl_weight,
        register_causal=cfg.register_causal)


def build_model(model_cfg: TokenizerModelConfig) -> Tokenizer:
    return Tokenizer(model_cfg)


def perturbation_rate(step: int, steps: int, start: float, final: float, anneal: str) -> float:
    """The latent perturbation rate at update ``step`` (1 .. steps, as the harness counts):
    ``start`` at the first step, ``final`` at the last, linearly or on a half cosine."""
    if anneal == "none" or steps <= 1:
        return start
    progress = min(max((step - 1) / (steps - 1), 0.0), 1.0)
    if anneal == "linear":
        weight = progress
    elif anneal == "cosine":
        weight = 0.5 * (1.0 - math.cos(math.pi * progress))
    else:
        raise ValueError(f"perturbation_anneal must be none, linear or cosine, got {anneal!r}")
    return start + (final - start) * weight


def tokenizer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, *,
                   cfg: TokenizerConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pixel loss (l2/l1) + the quantizer's weighted terms, on prefixes when nested dropout,
    from latents perturbed at this step's rate (RobustTok)."""
    x = batch["images"]
    tok = cast(Tokenizer, unwrap_model(model))
    keep = (tok.sample_keep(x.shape[0], device=x.device, lengths=cfg.nested_dropout_lengths)
            if cfg.nested_dropout else None)
    rate = perturbation_rate(step, cfg.steps, cfg.latent_perturbation, cfg.perturbation_final,
                             cfg.perturbation_anneal)
    recon, enc = model(x, keep=keep, perturb=rate, perturb_sigma=cfg.perturbation_sigma,
                       perturb_images=cfg.perturbation_images)
    pixel = F.mse_loss(recon, x) if cfg.loss == "l2" else F.l1_loss(recon, x)
    stats = {k: v for k, v in enc.stats.items()}
    if cfg.perturbation_anneal != "none":
        stats["perturbation_rate"] = rate
    return pixel + enc.aux_loss, {"recon_loss": pixel.detach(), "aux_loss": enc.aux_loss.detach(),
                                  **stats}


def evaluate(handle: TokenizerHandle, cfg: TokenizerConfig, images: np.ndarray,
             labels: np.ndarray, judge: Any) -> tuple[dict[str, float], np.ndarray,
                                                     list[tuple[int, float]]]:
    """Metrics on val; returns (metrics, reconstructions uint8, [(prefix length, PSNR)])."""
    x = images_to_tensor(images)
    enc = handle.encode(images)
    recon = handle.decode(enc["latents"])
    r = images_to_tensor(recon)
    m: dict[str, float] = {
        "val_psnr": float(metrics.psnr(r, x).clamp(max=100).mean()),
        "val_ssim": float(metrics.ssim(r, x).mean()),
    }
    feats_x, logp_x = judge.score(images)
    feats_r, logp_r = judge.score(recon)
    m["rfd_judge"] = metrics.fd_from_features(feats_x, feats_r)
    m["judge_acc_originals"] = metrics.accuracy(logp_x, labels)
    m["judge_acc_recon"] = metrics.accuracy(logp_r, labels)
    m["judge_acc_ratio"] = m["judge_acc_recon"] / max(m["judge_acc_originals"], 1e-9)
    generator = torch.Generator().manual_seed(1234)
    if handle.model.is_discrete:
        codes = torch.as_tensor(enc["codes"])
        # Counts of the codes that occur only: binary has up to 2^30 codes.
        counts = np.unique(enc["codes"], return_counts=True)[1]
        p = counts / counts.sum()
        m["codebook_usage"] = len(counts) / handle.model.vocab_size
        m["codebook_perplexity"] = float(np.exp(-(p * np.log(p)).sum()))
        with torch.no_grad():
            moved = handle.model.perturb_codes(codes, cfg.eval_perturbation, generator=generator)
            perturbed = handle.model.codes_to_latents(moved)
    else:
        # sigma in units of each dimension's std over the val latents, as in training: the
        # same pFD setting then perturbs tokenizers with wide and narrow latents alike.
        latents = torch.as_tensor(enc["latents"])
        perturbed = handle.model.perturb_latents(latents, cfg.eval_perturbation,
                                                 cfg.perturbation_sigma, generator=generator,
                                                 scale=latent_spread(latents))
    feats_p, _ = judge.score(handle.decode(perturbed))
    m["pfd_judge"] = metrics.fd_from_features(feats_x, feats_p)
    prefix = []
    lengths = range(1, handle.model.num_tokens + 1) if cfg.layout == "1d" else [handle.model.num_tokens]
    for k in lengths:
        rk = images_to_tensor(handle.decode(enc["latents"], keep=k))
        prefix.append((k, float(metrics.psnr(rk, x).clamp(max=100).mean())))
    return {k: round(v, 6) for k, v in m.items()}, recon, prefix


COLLAPSE_SHARE = 0.05  # a codebook perplexity below this share of min(codes, tokens) warns
COLLAPSE_HINTS = {
    "fsq": "tokenizer.lr 0.001 (fsq lost most of its codes in 2 of 5 seeds at 3e-3, in none "
           "at 1e-3; README, under binary latents)",
    "vq": "tokenizer.entropy_weight > 0",
    "binary": "a larger tokenizer.entropy_weight",
}


def codebook_collapse(quantizer: str, metrics: dict[str, float], vocab_size: int,
                      tokens: int) -> str | None:
    """A one-line warning when the val codes' perplexity is under COLLAPSE_SHARE of what the
    codebook and the val tokens allow, else None. Collapsed fsq runs on the default digits read
    9-18 (of 1000 codes over 2864 tokens); healthy fsq, vq and binary runs 100-310."""
    perplexity = metrics.get("codebook_perplexity")
    reach = min(vocab_size, tokens)
    if perplexity is None or perplexity >= COLLAPSE_SHARE * reach:
        return None
    return (f"tokenizer: the {quantizer} codebook has collapsed: val code perplexity "
            f"{perplexity:.1f} over {tokens} tokens ({metrics['codebook_usage']:.1%} of the "
            f"{vocab_size} codes occur), under {COLLAPSE_SHARE:.0%} of min(codes, tokens) = "
            f"{reach}; try {COLLAPSE_HINTS[quantizer]} or another tokenizer.seed")


def recon_grid(images: np.ndarray, recon: np.ndarray, n: int = 16) -> np.ndarray:
    """Originals above their reconstructions, in pairs of rows."""
    rows, names = [], []
    for start in range(0, min(n * 2, len(images)), n):
        rows += [images[start:start + n], recon[start:start + n]]
        names += ["x", "r"]
    return make_grid(rows, labels=names)


def run(params: Params, out_dir: str | Path = paths.TOKENIZER,
        prepared_dir: str | Path = paths.PREPARED, judge_dir: str | Path = paths.JUDGE,
        plot_file: str | Path = PREFIX_PLOT, tracker: Tracker | None = None) -> StageResult:
    cfg: TokenizerConfig = params.tokenizer
    tracker = tracker or Tracker()
    prepared = load_prepared(prepared_dir, verify=True)
    judge = load_judge(judge_dir)
    train_x, _ = prepared.split("train")
    val_x, val_y = prepared.split("val")
    tracker.log_input("prepared", str(Path(prepared_dir).resolve()), prepared.manifest_sha256,
                      context="training")
    tracker.log_input("judge", str(Path(judge_dir).resolve()), judge.sha256, context="judge")
    model_cfg = model_config(cfg, prepared.resolution, prepared.channels)
    loss_fn = functools.partial(tokenizer_loss, cfg=cfg)
    spec = TrainSpec(build_model=functools.partial(build_model, model_cfg), loss_fn=loss_fn,
                     data={"images": train_x}, code=paths.code_sha256("tokenizer"))
    result = train(spec, cfg, params.compute,
                   paths.checkpoint_dir("tokenizer", prepared.manifest_sha256), tracker=tracker,
                   progress=False)

    model = Tokenizer(model_cfg)
    model.load_state_dict(result.ema_state)
    meta: dict[str, Any] = {"model": asdict(model_cfg), "prepared_sha256": prepared.manifest_sha256,
                            "judge_sha256": judge.sha256, "latent_shape": [model.num_tokens,
                                                                           model.token_dim],
                            "training": result.training_meta()}
    handle = TokenizerHandle(model, meta)
    m, recon, prefix = evaluate(handle, cfg, np.asarray(val_x), np.asarray(val_y), judge)
    meta["metrics"] = m
    with storage.atomic_dir(out_dir) as tmp:
        save_weights(model.state_dict(), tmp / WEIGHTS)
        storage.write_bytes_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        storage.write_bytes_atomic(tmp / "train_curve.csv", loss_curve_csv(result.history).encode())
        save_png(recon_grid(np.asarray(val_x), recon), tmp / "recon.png")
        storage.write_bytes_atomic(tmp / "prefix_psnr.png", prefix_plot(prefix))
    csv = "tokens,psnr\n" + "".join(f"{k},{v:.6f}\n" for k, v in prefix)
    storage.write_bytes_atomic(plot_file, csv.encode())
    out_dir = Path(out_dir)
    weights_sha = storage.sha256_file(out_dir / WEIGHTS)
    for name in (META, "recon.png", "prefix_psnr.png"):
        tracker.log_artifact(out_dir / name)
    tracker.log_model("tokenizer", out_dir, registered_name=REGISTERED_MODELS["tokenizer"].name,
                      tags={"stage": "tokenizer", "prepared_sha256": prepared.manifest_sha256,
                            "judge_sha256": judge.sha256, "weights_sha256": weights_sha,
                            "layout": cfg.layout, "quantizer": cfg.quantizer})
    log.info("tokenizer: val PSNR %.2f dB, SSIM %.3f, rFD-judge %.3f, judge acc on recon %.4f "
             "(%.1f%% of originals)", m["val_psnr"], m["val_ssim"], m["rfd_judge"],
             m["judge_acc_recon"], 100 * m["judge_acc_ratio"])
    vocab = model.vocab_size  # None for kl
    collapse = (codebook_collapse(cfg.quantizer, m, vocab, len(val_x) * model.num_tokens)
                if vocab else None)
    if collapse:
        log.warning(collapse)
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in m.items())
    return StageResult(
        metrics=m,
        summary=f"{cfg.layout} tokenizer, {cfg.quantizer}, {model.num_tokens} tokens x "
                f"{model.token_dim}\n\n" + (f"**{collapse}**\n\n" if collapse else "")
                + f"| metric | value |\n|---|---|\n{table}",
        digests={"tokenizer": weights_sha},
        timings={"train_images_per_s": result.images_per_s, "train_seconds": result.seconds,
                 "resumed_from_step": result.resumed_from})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
