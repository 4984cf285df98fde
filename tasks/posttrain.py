"""The `posttrain` stage: decoder post-training ("Image Tokenizer Needs Post-Training", 2025).

A tokenizer's decoder learns to read the encoder's latents. A generator's latents lie near
them, not on them, and what the decoder makes of the difference shows in every sample. The
stage fine-tunes the decoder alone (dec_proj, its positional tables, the decoder blocks and
to_pixels; the encoder and quantizer stay frozen, so the latent cache and the generator stay
valid) to map latents back to the real images they came from. Each batch decodes three kinds
of latent, each with its own image as the target:

- generator-made latents of the image (`generated_fraction`), with a strength s drawn from
  U[strength_min, strength_max] per latent, `copies` per image, made once before training:
  flow: the image's latent noised back to time 1 - s of the generator's path and integrated
  to 1 by its ODE (Euler, `sample_steps` over that span; SDEdit); maskgit: s of its codes
  masked and drawn from the generator's prediction given the rest; ar: s of its codes
  replaced by draws from the generator's teacher-forced next-code distribution given the
  real prefix;
- perturbed latents of the image (`perturbed_fraction`): RobustTok's nearby codes (kl: noise
  in units of each dimension's spread over the batch), as the tokenizer stage perturbs;
- the image's own latents (the rest), so that reconstruction does not drift.

Evaluation: the generator's own samples (`eval_per_class` per class at generator.cfg_scale,
seed `eval_seed`) decoded by the tokenizer's decoder and by the post-trained one. They are the
same latents, so the differences pair: gFD-eval, KID and evaluator accuracy of both, with 95%
bootstrap intervals for each and for the difference (intervals.bootstrap_intervals); val PSNR
of reconstructions through both decoders shows what reconstruction gave up.

Output (artifacts/decoder): the decoder's weights alone (decoder.safetensors) and decoder.json,
which names the tokenizer and generator they belong to; with posttrain.enabled false only
decoder.json saying so. `apply_decoder` puts the weights into a loaded tokenizer: rl,
evaluate and `latentforge sample` decode with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from latentforge import flow, paths, storage, tokens
from latentforge.checkpoint import save_weights
from latentforge.config import Params, PostTrainConfig
from latentforge.data import load_prepared
from latentforge.errors import DataError
from latentforge.images import save_png
from latentforge.intervals import PerSample, bootstrap_intervals, with_interval
from latentforge.metrics import fd_from_features, psnr
from latentforge.models.tokenizer import Tokenizer, TokenizerEncoding, TokenizerModelConfig
from latentforge.runner import StageResult
from latentforge.tasks.generator import (
    TOKEN_KINDS,
    GeneratorHandle,
    grade_features,
    load_generator,
)
from latentforge.tasks.judge import images_to_tensor, load_judge
from latentforge.tasks.tokenizer import TokenizerHandle, recon_grid
from latentforge.tracking import Tracker
from latentforge.training import TrainSpec, loss_curve_csv, train, unwrap_model

log = logging.getLogger(__name__)

WEIGHTS, META = "decoder.safetensors", "decoder.json"
# The Tokenizer's parameters that decode (models/tokenizer.py); everything else encodes.
DECODER_PARTS = ("dec_proj", "dec_latent_pos", "dropped_token", "mask_token", "dec_patch_pos",
                 "decoder", "to_pixels")
MAKE_BATCH = 256
# The training latents' noise streams start here, apart from the evaluation samples' (eval_seed).
MAKE_SEED_OFFSET = 7919


def is_decoder_key(name: str) -> bool:
    """True for a Tokenizer state_dict key of the decoder."""
    return name.split(".", 1)[0] in DECODER_PARTS


def decoder_state(model: Tokenizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if is_decoder_key(k)}


# --------------------------------------------------------------------------------------------
# Using a post-trained decoder
# --------------------------------------------------------------------------------------------


def read_meta(decoder_dir: str | Path) -> dict[str, Any] | None:
    """decoder.json of a posttrain output, or None where there is none."""
    path = Path(decoder_dir) / META
    if not path.is_file():
        return None
    try:
        return cast(dict[str, Any], storage.parse_record(path.read_text(), path,
                                                         "rerun the posttrain stage"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); rerun the posttrain stage") from None


def apply_decoder(tok: TokenizerHandle, decoder_dir: str | Path | None) -> TokenizerHandle:
    """`tok` decoding with the post-trained decoder in `decoder_dir` (in place), or unchanged
    where that folder is missing or says post-training is off. The decoder must have been
    trained for this tokenizer (same sha256): another tokenizer's latents mean other things."""
    if decoder_dir is None:
        return tok
    meta = read_meta(decoder_dir)
    if meta is None or not meta.get("enabled"):
        return tok
    if meta.get("tokenizer_sha256") != tok.sha256:
        raise DataError(f"{decoder_dir} holds a decoder post-trained for tokenizer "
                        f"{str(meta.get('tokenizer_sha256'))[:12]}, not for tokenizer "
                        f"{tok.sha256[:12]}; rerun the posttrain stage")
    path = Path(decoder_dir) / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: missing; {decoder_dir / Path(META)} says the decoder was "
                        "post-trained (rerun the posttrain stage)")
    actual = storage.sha256_file(path)
    if meta.get("sha256") and actual != meta["sha256"]:
        raise DataError(f"{path}: sha256 {actual[:12]} is not the "
                        f"{str(meta['sha256'])[:12]} {META} records (changed or damaged since "
                        "it was written); rerun the posttrain stage")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type, naming no file
        raise DataError(f"{path}: unreadable ({exc}); rerun the posttrain stage") from None
    expected = {k for k in tok.model.state_dict() if is_decoder_key(k)}
    if set(state) != expected:
        raise DataError(f"{path}: holds {len(state)} tensors, not the {len(expected)} of this "
                        "tokenizer's decoder; rerun the posttrain stage")
    tok.model.load_state_dict(state, strict=False)
    tok.meta = {**tok.meta, "decoder": {"posttrained": True, "sha256": meta.get("sha256", ""),
                                        "folder": str(decoder_dir)}}
    return tok


def decoder_for(handle: GeneratorHandle, decoder_dir: str | Path = paths.DECODER
                ) -> tuple[Path | None, str]:
    """The post-trained decoder in `decoder_dir` that `handle` belongs with, if it is there,
    and why (for the user): an RL model's own (the one its rollouts were decoded through, as
    its meta records), or, for a base generator, one post-trained on that generator's samples.
    A decoder post-trained for another generator is left out: its numbers were not measured
    with this one."""
    if "decoder" in handle.tokenizer.meta:
        return None, "the post-trained decoder logged with the model"
    meta = read_meta(decoder_dir) or {}
    here = meta.get("sha256") if meta.get("enabled") else None
    rl = handle.meta.get("rl")
    if rl is not None:
        wanted = rl.get("decoder_sha256")
        if not wanted:
            return None, "the tokenizer's own decoder, which RL fine-tuned through"
        if here == wanted:
            return Path(decoder_dir), f"the post-trained decoder RL fine-tuned through ({decoder_dir})"
        log.warning("this RL generator was fine-tuned through post-trained decoder %s, which %s "
                    "does not hold (it holds %s): decoding with the tokenizer's own decoder; "
                    "pass --decoder with that decoder's folder", wanted[:12], decoder_dir,
                    here[:12] if here else "none")
        return None, "the tokenizer's own decoder (its RL decoder is not here)"
    if here and meta.get("generator_sha256") == handle.meta.get("sha256"):
        return Path(decoder_dir), f"the decoder post-trained for this generator ({decoder_dir})"
    return None, "the tokenizer's own decoder"


# --------------------------------------------------------------------------------------------
# Generator-made latents of real images
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def regenerate_flow(handle: GeneratorHandle, latents: torch.Tensor, labels: torch.Tensor,
                    strength: torch.Tensor, noise: torch.Tensor, steps: int,
                    cfg_scale: float) -> torch.Tensor:
    """SDEdit on the generator's path: each latent (B, K, D) normalised as the generator was
    trained, mixed with `noise` back to time t0 = 1 - strength (t = 0 is noise, 1 data), then
    integrated from t0 to 1 in `steps` Euler steps of its own span. Strength 0 returns the
    latent, 1 a fresh sample from `noise`."""
    shift, scale = handle.shift.to(latents.device), handle.scale.to(latents.device)
    t0 = (1.0 - strength).to(latents.dtype)  # (B,)
    data = (latents - shift) / scale
    x = (1 - t0)[:, None, None] * noise + t0[:, None, None] * data
    dt = (1.0 - t0) / steps  # (B,)
    for i in range(steps):
        t = t0 + i * dt
        x = x + dt[:, None, None] * handle.model.forward_with_cfg(x, t, labels, cfg_scale)
    return x * scale + shift


@torch.no_grad()
def regenerate_codes(handle: GeneratorHandle, codes: torch.Tensor, labels: torch.Tensor,
                     strength: torch.Tensor, noise: tokens.SampleNoise,
                     cfg_scale: float) -> torch.Tensor:
    """maskgit: round(strength * K) codes of each row (B, K) masked and drawn from the model's
    guided prediction given the others; ar: as many positions replaced by draws from the
    teacher-forced distribution given the real prefix. The other codes stay."""
    model = handle.model
    n, k = codes.shape
    order = noise.uniform(k).argsort(1)  # a random order of positions per row
    count = (strength * k).round().long().clamp(0, k)  # (B,)
    chosen = torch.zeros_like(codes, dtype=torch.bool).scatter(
        1, order, torch.arange(k, device=codes.device)[None].expand(n, k) < count[:, None])
    context = torch.where(chosen, model.mask_code, codes) if handle.kind == "maskgit" else codes
    logits = tokens.guided_logits(model, context, labels, cfg_scale).float()  # (B, K, V)
    temperature = handle.meta["sampling"]["temperature"]
    draws = tokens.categorical(torch.softmax(logits / temperature, -1), noise.uniform(k))
    return torch.where(chosen, draws, codes)


@torch.no_grad()
def make_latents(handle: GeneratorHandle, latents: np.ndarray, codes: np.ndarray | None,
                 labels: np.ndarray, cfg: PostTrainConfig, seed: int,
                 flow_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Generator-made latents (N, K, D) of N images' own latents (codes for maskgit / ar),
    and the strength each was made with. Row i's randomness depends on (seed, i) only."""
    rng = np.random.default_rng(seed)
    strength = rng.uniform(cfg.strength_min, cfg.strength_max, len(latents)).astype(np.float32)
    out = np.empty_like(latents, dtype=np.float32)
    device = handle.device
    k, d = latents.shape[1:]
    batches = -(-len(latents) // MAKE_BATCH)
    started = time.perf_counter()
    for start in range(0, len(latents), MAKE_BATCH):
        done = start // MAKE_BATCH
        if done and done % max(1, batches // 10) == 0:  # progress on large data sets
            log.info("posttrain: made %d of %d latents (%.0f s)", start, len(latents),
                     time.perf_counter() - started)
        rows = slice(start, start + MAKE_BATCH)
        idx = np.arange(start, min(start + MAKE_BATCH, len(latents)))
        y = torch.as_tensor(labels[rows], dtype=torch.long, device=device)
        s = torch.as_tensor(strength[rows], device=device)
        if handle.kind in TOKEN_KINDS:
            assert codes is not None
            made = regenerate_codes(handle, torch.as_tensor(codes[rows], dtype=torch.long,
                                                            device=device), y, s,
                                    tokens.SampleNoise(idx.tolist(), seed, device=device),
                                    cfg.cfg_scale)
            z = handle.tokenizer.model.codes_to_latents(made)
        else:
            noise = flow.sample_noise(torch.from_numpy(idx), (k, d), seed, device=device)
            z = regenerate_flow(handle, torch.as_tensor(latents[rows], device=device), y, s,
                                noise, flow_steps, cfg.cfg_scale)
        out[rows] = z.float().cpu().numpy()
    return out, strength


# --------------------------------------------------------------------------------------------
# Training the decoder
# --------------------------------------------------------------------------------------------


class DecoderOnly(nn.Module):
    """The tokenizer with only its decoder trainable; calling it decodes (B, K, D) latents.
    (Ray Train wraps it in DDP, whose gradients flow only through forward calls.)"""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        for name, p in tokenizer.named_parameters():
            p.requires_grad_(is_decoder_key(name))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(latents)


def build_model(model_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> DecoderOnly:
    """The trained tokenizer (its weights shipped with the spec: Ray workers see no files)."""
    tok = Tokenizer(TokenizerModelConfig(**model_cfg))
    tok.load_state_dict(state)
    return DecoderOnly(tok)


def posttrain_loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int, *,
                   cfg: PostTrainConfig, pixel_loss: str, sigma: float
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pixel loss of each image against its decoding from a generator-made, a perturbed or its
    own latent (the batch's shares as configured; draws from the harness-seeded global RNG)."""
    x, own, made = batch["images"], batch["latents"], batch["generated"]
    b = x.shape[0]
    u = torch.rand(b, device=x.device)
    generated = u < cfg.generated_fraction
    perturbed = ~generated & (u < cfg.generated_fraction + cfg.perturbed_fraction)
    z = torch.where(generated[:, None, None], made, own)
    if cfg.perturbation > 0 and bool(perturbed.any()):
        tok = cast(DecoderOnly, unwrap_model(model)).tokenizer
        with torch.no_grad():
            enc = TokenizerEncoding(latents=own, aux_loss=torch.zeros((), device=x.device),
                                    stats={}, codes=batch.get("codes"))
            moved = tok.perturbed_latents(enc, cfg.perturbation, sigma)
        z = torch.where(perturbed[:, None, None], moved, z)
    recon = model(z)
    diff = (recon.float() - x.float())
    per_image = (diff.square() if pixel_loss == "l2" else diff.abs()).flatten(1).mean(1)  # (B,)
    loss = per_image.mean()
    own_rows = ~generated & ~perturbed
    # Each kind's share of the loss (sums to it; stays finite when a kind is absent).
    shares = {f"loss_share_{name}": (per_image * rows).sum().detach() / b for name, rows in
              (("generated", generated), ("perturbed", perturbed), ("own", own_rows))}
    return loss, shares


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _disabled(out_dir: Path) -> StageResult:
    meta = {"enabled": False, "note": "posttrain.enabled is false: rl, evaluate and sample "
            "decode with the tokenizer's own decoder"}
    with storage.atomic_dir(out_dir) as tmp:
        storage.write_bytes_atomic(tmp / META, json.dumps(meta, indent=2).encode())
    log.info("posttrain: off (posttrain.enabled false); the tokenizer's decoder stays in use")
    return StageResult(metrics={"enabled": 0}, summary="Decoder post-training is off "
                       "(`posttrain.enabled: false`): samples decode with the tokenizer's own "
                       "decoder.", digests={}, timings={})


def _psnr(images: np.ndarray, recon: np.ndarray) -> float:
    return float(psnr(images_to_tensor(recon), images_to_tensor(images)).clamp(max=100).mean())


def run(params: Params, out_dir: str | Path = paths.DECODER,
        generator_dir: str | Path = paths.GENERATOR, tokenizer_dir: str | Path = paths.TOKENIZER,
        evaluator_dir: str | Path = paths.EVALUATOR, prepared_dir: str | Path = paths.PREPARED,
        tracker: Tracker | None = None) -> StageResult:
    cfg: PostTrainConfig = params.posttrain
    out_dir = Path(out_dir)
    if not cfg.enabled:
        return _disabled(out_dir)
    tracker = tracker or Tracker()
    gen_cfg = params.generator
    handle = load_generator(generator_dir, tokenizer_dir)
    tok = handle.tokenizer
    evaluator = load_judge(evaluator_dir)
    prepared = load_prepared(prepared_dir, verify=True)
    for name, folder, sha in (("generator", generator_dir, handle.meta["sha256"]),
                              ("tokenizer", tokenizer_dir, tok.sha256),
                              ("evaluator", evaluator_dir, evaluator.sha256),
                              ("prepared", prepared_dir, prepared.manifest_sha256)):
        tracker.log_input(name, str(Path(folder).resolve()), sha,
                          context="evaluation" if name == "evaluator" else "training")
    if list(handle.class_names) != prepared.class_names:
        raise DataError(f"{generator_dir} knows classes {handle.class_names[:5]}... but "
                        f"{prepared_dir} has {prepared.class_names[:5]}...; post-training needs "
                        "the generator's own data")
    train_x, train_y = (np.asarray(a) for a in prepared.split("train"))
    val_x, val_y = (np.asarray(a) for a in prepared.split("val"))

    # What the decoder learns from: each image with its own latent and `copies` made ones.
    started = time.perf_counter()
    enc = tok.encode(train_x)
    own = np.asarray(enc["latents"], np.float32)
    codes = enc.get("codes")
    rows = np.tile(np.arange(len(train_x)), cfg.copies)
    made, strength = make_latents(handle, own[rows], None if codes is None else codes[rows],
                                  train_y[rows], cfg, cfg.seed + MAKE_SEED_OFFSET,
                                  cfg.sample_steps)
    make_seconds = time.perf_counter() - started
    gap = float(np.sqrt(((made - own[rows]) ** 2).mean() / max(float((own**2).mean()), 1e-12)))
    log.info("posttrain: %d generator-made latents of %d images in %.1f s (relative RMS "
             "distance to the images' own latents %.3f)", len(made), len(train_x), make_seconds,
             gap)
    data: dict[str, np.ndarray] = {"images": train_x[rows], "latents": own[rows],
                                   "generated": made}
    if codes is not None:
        data["codes"] = np.asarray(codes, np.int64)[rows]
    tok_state = {k: v.detach().cpu().clone() for k, v in tok.model.state_dict().items()}
    model_cfg = asdict(tok.model.cfg)
    loss_fn = functools.partial(posttrain_loss, cfg=cfg, pixel_loss=params.tokenizer.loss,
                                sigma=params.tokenizer.perturbation_sigma)
    spec = TrainSpec(build_model=functools.partial(build_model, model_cfg, tok_state),
                     loss_fn=loss_fn, data=data, code=paths.code_sha256("posttrain"))
    key = hashlib.sha256(f"{handle.meta['sha256']}:{tok.sha256}:"
                         f"{prepared.manifest_sha256}".encode()).hexdigest()
    result = train(spec, cfg, params.compute, paths.checkpoint_dir("posttrain", key),
                   tracker=tracker, progress=False)
    tuned = build_model(model_cfg, tok_state)
    tuned.load_state_dict(result.ema_state)
    after_tok = TokenizerHandle(tuned.tokenizer, tok.meta)

    # The same generated latents through both decoders.
    labels = flow.balanced_labels(prepared.num_classes, cfg.eval_per_class).numpy()
    latents, _ = handle.sample_latents(labels, seed=cfg.eval_seed, steps=gen_cfg.sample_steps,
                                       cfg_scale=gen_cfg.cfg_scale, sampler=gen_cfg.sampler)
    before_img, after_img = tok.decode(latents), after_tok.decode(latents)
    # References: the train split, as the generator stage grades (the decoder was fitted to
    # those images, which may favour "after"), and the held-out val split, which it never saw.
    ref_feats, _ = evaluator.score(train_x)
    val_feats, _ = evaluator.score(val_x)
    scored = {name: evaluator.score(images) for name, images in
              (("before", before_img), ("after", after_img))}
    per_sample = {n: PerSample(f, lp) for n, (f, lp) in scored.items()}
    graded = {name: grade_features(f, lp, labels, ref_feats) for name, (f, lp) in scored.items()}
    ci = bootstrap_intervals(ref_feats, per_sample, labels, seed=cfg.eval_seed,
                             keys=("eval_accuracy", "gfd_eval"), ref_labels=train_y)
    ci_val = bootstrap_intervals(val_feats, per_sample, labels, seed=cfg.eval_seed,
                                 keys=("gfd_eval",), ref_labels=val_y)
    m: dict[str, float] = {"enabled": 1, "samples": len(labels), "val_images": len(val_x),
                           "latent_gap": gap}
    for name, (feats, _) in scored.items():
        for key in ("gfd_eval", "kid_eval", "eval_accuracy", "precision", "recall"):
            m[f"{key}_{name}"] = graded[name][key]
        m[f"gfd_val_{name}"] = fd_from_features(val_feats, feats)
        for key, value in ci[name].items():
            m[f"{key.replace('_ci_', f'_{name}_ci_')}"] = value
        for key, value in ci_val[name].items():
            m[key.replace("gfd_eval_ci_", f"gfd_val_{name}_ci_")] = value
    for key in ("gfd_eval", "eval_accuracy", "gfd_val"):
        m[f"{key}_diff"] = m[f"{key}_after"] - m[f"{key}_before"]
        source, ci_key = (ci_val, "gfd_eval") if key == "gfd_val" else (ci, key)
        m[f"{key}_diff_ci_low"] = source["diff"][f"{ci_key}_ci_low"]
        m[f"{key}_diff_ci_high"] = source["diff"][f"{ci_key}_ci_high"]
    m["gfd_improved"] = float(m["gfd_eval_diff_ci_high"] < 0)
    m["gfd_val_improved"] = float(m["gfd_val_diff_ci_high"] < 0)
    m["val_psnr_before"] = _psnr(val_x, tok.reconstruct(val_x))
    m["val_psnr_after"] = _psnr(val_x, after_tok.reconstruct(val_x))
    # The run table shows the first four.
    headline = ("gfd_eval_before", "gfd_eval_after", "gfd_eval_diff", "eval_accuracy_after")
    m = {k: round(float(m[k]), 6) for k in (*headline, *(k for k in m if k not in headline))}

    state = decoder_state(tuned.tokenizer)
    meta: dict[str, Any] = {
        "enabled": True, "tokenizer_sha256": tok.sha256, "generator_sha256": handle.meta["sha256"],
        "prepared_sha256": prepared.manifest_sha256, "evaluator_sha256": evaluator.sha256,
        "posttrained_from": str(Path(tokenizer_dir)), "generator_kind": handle.kind,
        "params": asdict(cfg), "metrics": m, "training": result.training_meta()}
    with storage.atomic_dir(out_dir) as tmp:
        meta["sha256"] = save_weights(state, tmp / WEIGHTS)
        storage.write_bytes_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        storage.write_bytes_atomic(tmp / "train_curve.csv", loss_curve_csv(result.history).encode())
        save_png(recon_grid(before_img, after_img), tmp / "before_after.png")
    tracker.log_artifact(out_dir / "before_after.png")
    # decoder.json names what it was post-trained for: rl and evaluate find this run by the
    # weights' digest (lineage), as they find the prepare and cache runs.
    tracker.log_output("decoder", out_dir / META, meta["sha256"])
    log.info("posttrain: gFD-eval %s -> %s (after - before %s); evaluator accuracy %.4f -> "
             "%.4f; val PSNR %.2f -> %.2f dB", with_interval(m, "gfd_eval_before"),
             with_interval(m, "gfd_eval_after"), with_interval(m, "gfd_eval_diff", sign=True),
             m["eval_accuracy_before"], m["eval_accuracy_after"], m["val_psnr_before"],
             m["val_psnr_after"])
    return StageResult(metrics=m, summary=summary(m, handle.kind),
                       digests={"decoder": meta["sha256"]},
                       timings={"make_seconds": make_seconds,
                                "train_images_per_s": result.images_per_s,
                                "train_seconds": result.seconds,
                                "resumed_from_step": result.resumed_from})


def summary(m: dict[str, float], kind: str) -> str:
    """The stage's markdown: both decoders on the same samples, with 95% intervals."""
    verdict = ("the post-trained decoder lowers gFD-eval (the paired interval is below 0)"
               if m["gfd_improved"] else
               "no gFD-eval improvement shown: the paired interval reaches 0 or above")
    verdict += (", and against the held-out images it never saw" if m["gfd_val_improved"] else
                "; against the held-out images it never saw, no improvement shown")
    rows = [("gFD-eval (train split)", "gfd_eval"),
            (f"gFD-eval (held-out val, {int(m['val_images'])} images)", "gfd_val"),
            ("evaluator accuracy", "eval_accuracy")]
    lines = [f"Decoder post-training on {kind}-generated latents: {int(m['samples'])} generated "
             "samples, the same latents decoded by the tokenizer's decoder (before) and the "
             f"post-trained one (after); {verdict}.", "",
             "| metric | before | after | after - before |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {with_interval(m, f'{key}_before')} | "
                     f"{with_interval(m, f'{key}_after')} | "
                     f"{with_interval(m, f'{key}_diff', sign=True)} |")
    lines += [f"| KID-eval | {m['kid_eval_before']:.4g} | {m['kid_eval_after']:.4g} | |",
              f"| val PSNR, own latents (dB) | {m['val_psnr_before']:.2f} | "
              f"{m['val_psnr_after']:.2f} | {m['val_psnr_after'] - m['val_psnr_before']:+.2f} |"]
    return "\n".join(lines)


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
