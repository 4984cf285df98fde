"""The `generator` stage: a class-conditional generator over the latent tokens.

`generator.kind` picks the model:
- flow (default): a flow-matching transformer (models/generator.py) on the latents, with a
  fresh posterior sample per step for kl caches and latents normalised per dimension; sampled
  with the ODE sampler (latentforge/flow.py).
- maskgit / ar: a transformer over a discrete tokenizer's codes (models/token_generator.py),
  trained on the cached codes with masked or next-code cross-entropy; sampled by confidence
  unmasking or autoregressively with a key/value cache (latentforge/tokens.py). Sampled codes
  become latents through the tokenizer's own code table, so everything downstream (decoding,
  scoring, rl, evaluate, `latentforge sample`) reads latents whatever the kind.

Every kind trains with the shared harness (resume, EMA, Ray Train workers) and class dropout
for classifier-free guidance. At the end it samples a class-balanced set (the randomness of
sample i depends only on (seed, i), never on the number of workers), decodes through the
tokenizer and scores it with the evaluator (the judge stage's second network; the judge itself
only gives RL rewards): gFD-eval against the train split, precision/recall, evaluator accuracy
on the requested class, IS-eval, sampling images/s, NFE (network evaluations per sample).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeAlias, cast

import numpy as np
import torch

from latentforge import flow, metrics, paths, storage, tokens
from latentforge.checkpoint import load_model_folder, save_weights
from latentforge.config import ComputeConfig, GeneratorConfig, Params
from latentforge.data import load_prepared
from latentforge.errors import DataError
from latentforge.images import make_grid, save_png
from latentforge.lineage import REGISTERED_MODELS
from latentforge.malloc import tune_malloc
from latentforge.models.generator import FlowTransformer, GeneratorModelConfig, generator_config
from latentforge.models.token_generator import (
    TokenGeneratorConfig,
    TokenTransformer,
    token_generator_config,
)
from latentforge.raycluster import map_on_actor_pool, record_nodes, use_ray
from latentforge.runner import StageResult
from latentforge.tasks.cache import load_cache
from latentforge.tasks.judge import JudgeScorer, load_judge
from latentforge.tasks.tokenizer import TokenizerHandle, load_tokenizer
from latentforge.tracking import Tracker
from latentforge.training import TrainSpec, local_device, loss_curve_csv, train

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "generator.json"
TOKEN_KINDS = ("maskgit", "ar")

GeneratorModel: TypeAlias = FlowTransformer | TokenTransformer


def build_generator_model(model_cfg: dict[str, Any]) -> GeneratorModel:
    """The model a generator folder's meta["model"] describes (token kinds name their kind)."""
    # Folders from before the configs had gelu_approximate hold tanh-GELU models.
    model_cfg = {"gelu_approximate": "tanh", **model_cfg}
    if model_cfg.get("kind") in TOKEN_KINDS:
        return TokenTransformer(TokenGeneratorConfig(**model_cfg))
    return FlowTransformer(GeneratorModelConfig(**model_cfg))


class GeneratorHandle:
    """A trained generator plus the tokenizer that decodes its latents."""

    def __init__(self, model: GeneratorModel, meta: dict[str, Any], tok: TokenizerHandle) -> None:
        self.model = model.eval()
        self.meta = meta
        self.kind: str = meta.get("kind", "flow")
        self.tokenizer = tok
        self.shift = torch.tensor(meta["latent_shift"], dtype=torch.float32)
        self.scale = torch.tensor(meta["latent_scale"], dtype=torch.float32)
        self.class_names: list[str] = meta["class_names"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> GeneratorHandle:
        """Move generator and tokenizer; sampling returns numpy arrays on the host either way."""
        self.model.to(device)
        self.tokenizer.to(device)
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    @torch.no_grad()
    def sample_latents(self, labels: np.ndarray | torch.Tensor, *, seed: int, steps: int,
                       cfg_scale: float, sampler: str = "heun", start_index: int = 0,
                       batch_size: int = 256) -> tuple[np.ndarray, int]:
        """Class-conditional samples (N, K, D) in the tokenizer's latent space, and NFE.

        Sample i's randomness depends only on (seed, start_index + i). `steps` and `sampler`
        are the flow ODE's; maskgit and ar sample as the generator stage configured them
        (meta["sampling"]), and their codes become latents through the tokenizer.
        """
        if self.kind in TOKEN_KINDS:
            codes, nfe = self.sample_codes(labels, seed=seed, cfg_scale=cfg_scale,
                                           start_index=start_index, batch_size=batch_size)
            with torch.no_grad():
                latents = self.tokenizer.model.codes_to_latents(
                    torch.as_tensor(codes, dtype=torch.long, device=self.device))
            return latents.float().cpu().numpy(), nfe
        device = self.device
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        k, d = self.meta["latent_shape"]
        out, nfe = [], 0
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size]
            idx = np.arange(start_index + start, start_index + start + len(y))
            noise = flow.sample_noise(torch.from_numpy(idx), (k, d), seed,
                                      device=device)  # drawn on the CPU

            def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                return self.model.forward_with_cfg(x, t, y, cfg_scale)

            z, nfe = flow.ode_sample(velocity, noise, steps, cast(flow.Sampler, sampler))
            out.append((z * self.scale + self.shift).cpu().numpy())
        return np.concatenate(out), nfe

    @torch.no_grad()
    def sample_codes(self, labels: np.ndarray | torch.Tensor, *, seed: int, cfg_scale: float,
                     start_index: int = 0, batch_size: int = 256) -> tuple[np.ndarray, int]:
        """maskgit / ar: class-conditional codes (N, K) int64, and NFE per sample."""
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"sample_codes needs a maskgit or ar generator, not {self.kind!r}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        out = []
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size]
            noise = tokens.SampleNoise(range(start_index + start, start_index + start + len(y)),
                                       seed, device=self.device)
            out.append(sample_token_rollout(self.model, self.meta["sampling"], y, noise,
                                            cfg_scale).codes.cpu().numpy())
        passes = (self.meta["sampling"]["steps"] if self.kind == "maskgit"
                  else self.model.cfg.num_tokens)
        codes = np.concatenate(out) if out else np.empty((0, self.model.cfg.num_tokens), np.int64)
        return codes, passes  # CFG runs its two halves as one batch, as the flow's NFE counts

    def sample_images(self, labels: np.ndarray, **kwargs: Any) -> np.ndarray:
        latents, _ = self.sample_latents(labels, **kwargs)
        return self.tokenizer.decode(latents)


def sample_token_rollout(model: TokenTransformer, sampling: dict[str, Any], labels: torch.Tensor,
                         noise: tokens.SampleNoise, cfg_scale: float, *,
                         for_rl: bool = False) -> tokens.TokenRollout:
    """One batch of maskgit or ar samples with the stage's sampling options (meta["sampling"]).

    `for_rl` samples the full distribution (no top-k/top-p), whose log-probabilities RL uses.
    """
    if model.cfg.kind == "maskgit":
        return tokens.maskgit_sample(model, labels, noise, steps=sampling["steps"],
                                     cfg_scale=cfg_scale, temperature=sampling["temperature"],
                                     choice_temperature=sampling["choice_temperature"])
    return tokens.ar_sample(model, labels, noise, cfg_scale=cfg_scale,
                            temperature=sampling["temperature"],
                            top_k=0 if for_rl else sampling["top_k"],
                            top_p=1.0 if for_rl else sampling["top_p"])


def load_generator(path: str | Path = paths.GENERATOR,
                   tokenizer_dir: str | Path = paths.TOKENIZER) -> GeneratorHandle:
    model, meta = load_model_folder(path, META, "generator", build_generator_model,
                                    missing_hint=" (or pass --model PATH)")
    tok = load_tokenizer(tokenizer_dir)
    if meta["tokenizer_sha256"] != tok.sha256:
        raise DataError(f"{path} was trained on latents of tokenizer {meta['tokenizer_sha256'][:12]}"
                        f" but {tokenizer_dir} holds tokenizer {tok.sha256[:12]}; decode with the "
                        "matching tokenizer or retrain the generator")
    return GeneratorHandle(model, meta, tok)


SAMPLING_KEYS = ("steps", "sampler", "cfg_scale")


def sampling_record(steps: int, sampler: str, cfg_scale: float) -> dict[str, Any]:
    """meta["sample_defaults"]: how the stage sampled the images its metrics grade."""
    return {"steps": int(steps), "sampler": str(sampler), "cfg_scale": float(cfg_scale)}


def has_sampling_record(meta: dict[str, Any]) -> bool:
    """Whether the folder recorded how its stage sampled (folders saved before did not)."""
    recorded = meta.get("sample_defaults")
    return isinstance(recorded, dict) and all(k in recorded for k in SAMPLING_KEYS)


def sampling_defaults(meta: dict[str, Any], fallback: GeneratorConfig | None = None
                      ) -> dict[str, Any]:
    """{"steps", "sampler", "cfg_scale"} that the model's own metrics were measured with.

    A model saved before the folder recorded them falls back to `fallback` (the generator
    section in use, or the schema's defaults); an RL model then to the CFG scale of its rollouts,
    which its meta records, since RL trains the guided velocity.
    """
    if has_sampling_record(meta):
        return {k: meta["sample_defaults"][k] for k in SAMPLING_KEYS}
    cfg = fallback or GeneratorConfig()
    out = sampling_record(cfg.sample_steps, cfg.sampler, cfg.cfg_scale)
    rl_cfg = meta.get("rl", {}).get("params", {}).get("cfg_scale")
    if rl_cfg is not None:
        out["cfg_scale"] = float(rl_cfg)
    return out


# --------------------------------------------------------------------------------------------
# Sampling many images: in-process, or on a Ray Data actor pool
# --------------------------------------------------------------------------------------------

SAMPLE_BATCH = 256


class SampleBatches:
    """A Ray Data actor: holds a generator with its tokenizer and samples ranges of `labels`.

    Each call gets rows {"start", "stop"} (ranges aligned to SAMPLE_BATCH, so every sample is
    computed in the same batch as in-process) and returns per sample "index", "latents"
    (K, D), "images" (uint8 H, W, C), "nfe" and "node" (the Ray node the actor runs on).
    """

    def __init__(self, handle: GeneratorHandle, labels: np.ndarray, options: dict[str, Any],
                 threads: int, use_gpu: bool) -> None:
        from latentforge.raycluster import node_id

        tune_malloc()  # an actor is a fresh process; see latentforge/malloc.py
        torch.set_num_threads(threads)
        # The handle came pickled with its weights through the object store: no paths.
        self.handle = handle.to("cuda" if use_gpu else "cpu")
        self.labels, self.options = labels, options
        self.node = node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist(), strict=True):
            latents, nfe = self.handle.sample_latents(self.labels[start:stop], start_index=start,
                                                      batch_size=SAMPLE_BATCH, **self.options)
            rows = {"index": np.arange(start, stop), "latents": latents,
                    "images": self.handle.tokenizer.decode(latents, batch_size=SAMPLE_BATCH),
                    "nfe": np.full(stop - start, nfe), "node": np.full(stop - start, self.node)}
            for key, value in rows.items():
                out.setdefault(key, []).append(value)
        return {key: np.concatenate(v) for key, v in out.items()}


def sample(handle: GeneratorHandle, labels: np.ndarray, *, seed: int, steps: int,
           cfg_scale: float, sampler: str, compute: ComputeConfig,
           nodes: set[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(latents, uint8 images, NFE) of class-conditional ODE samples for `labels`.

    With `compute.num_workers` > 1 or a `compute.ray_address` the samples are drawn on a Ray
    Data pool of that many actors (one GPU each with `compute.use_gpu`); otherwise in this
    process (on the GPU with `compute.use_gpu`). Sample i's noise depends only on (seed, i)
    and it is computed in the same batch either way, so the worker count does not change the
    samples beyond float rounding. `nodes` collects the Ray node ids the actors ran on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    options: dict[str, Any] = {"seed": seed, "steps": steps, "cfg_scale": cfg_scale,
                               "sampler": sampler}
    if not use_ray(compute):
        handle.to(local_device(compute))
        try:
            latents, nfe = handle.sample_latents(labels, batch_size=SAMPLE_BATCH, **options)
            return latents, handle.tokenizer.decode(latents, batch_size=SAMPLE_BATCH), nfe
        finally:
            handle.to("cpu")
    k, d = handle.meta["latent_shape"]
    tok_cfg = handle.tokenizer.model.cfg
    latents = np.empty((len(labels), k, d), np.float32)
    images = np.empty((len(labels), tok_cfg.image_size, tok_cfg.image_size, tok_cfg.channels),
                      np.uint8)
    ranges = [{"start": start, "stop": min(start + SAMPLE_BATCH, len(labels))}
              for start in range(0, len(labels), SAMPLE_BATCH)]
    kwargs = {"handle": handle, "labels": labels, "options": options,
              "threads": compute.cpus_per_worker, "use_gpu": compute.use_gpu}
    done, nfe = 0, 0
    for rows in map_on_actor_pool(ranges, SampleBatches, kwargs, compute):
        latents[rows["index"]] = rows["latents"]
        images[rows["index"]] = rows["images"]
        nfe = int(rows["nfe"][0])
        if nodes is not None:
            nodes.update(str(n) for n in np.unique(rows["node"]))
        done += len(rows["index"])
        log.info("sampling: %d of %d images (%d Ray Data actor(s))", done, len(labels),
                 compute.num_workers)
    if done != len(labels):
        raise RuntimeError(f"Ray Data returned {done} of {len(labels)} samples")
    return latents, images, nfe


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def training_arrays(cache: Any, tok: TokenizerHandle, kind: str = "flow"
                    ) -> dict[str, np.ndarray]:
    """What the generator learns from: moments (kl; sampled fresh every step) or latents for
    flow, the codes themselves for maskgit and ar.

    A cache with flipped views (cache.hflip) adds them as rows of their own, with the same
    labels: each draw then sees an image or its mirror with equal odds, as MAR trains on its
    cached flips.
    """
    arrays = cache.split("train")
    if cache.manifest.get("hflip"):
        flipped = {key.removeprefix("hflip_"): arrays[key] for key in arrays
                   if key.startswith("hflip_")}
        arrays = {key: np.concatenate([arrays[key], flipped.get(key, arrays[key])])
                  for key in arrays if not key.startswith("hflip_")}
    if kind in TOKEN_KINDS:
        if cache.kind != "codes":
            raise DataError(f"generator.kind {kind!r} needs discrete codes, but the cache holds "
                            f"{cache.kind} of a {tok.model.cfg.quantizer!r} tokenizer: "
                            "use tokenizer.quantizer fsq, vq or binary, or generator.kind flow")
        return {"codes": np.asarray(arrays["codes"], np.int64), "labels": arrays["labels"]}
    if cache.kind == "moments":
        return {"mean": arrays["mean"], "logvar": arrays["logvar"], "labels": arrays["labels"]}
    with torch.no_grad():
        latents = tok.model.codes_to_latents(torch.as_tensor(np.array(arrays["codes"]),
                                                             dtype=torch.long))
    return {"latents": latents.float().numpy(), "labels": arrays["labels"]}


def latent_statistics(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension shift and scale (D,) of the training latents, pooled over tokens."""
    if "latents" in data:
        z = np.asarray(data["latents"], np.float64).reshape(-1, data["latents"].shape[-1])
        return z.mean(0), z.std(0) + 1e-6
    mean = np.asarray(data["mean"], np.float64).reshape(-1, data["mean"].shape[-1])
    var = np.exp(np.asarray(data["logvar"], np.float64)).reshape(mean.shape)
    mu = mean.mean(0)
    second = (mean**2 + var).mean(0)  # E[z^2] of the posterior samples
    return mu, np.sqrt(np.maximum(second - mu**2, 1e-12))


def generator_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, *,
                   shift: torch.Tensor, scale: torch.Tensor, class_dropout: float,
                   time_sampling: str, null_class: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Flow-matching loss on normalised latents; kl caches draw a fresh posterior sample."""
    if "latents" in batch:
        z = batch["latents"]
    else:
        z = batch["mean"] + torch.exp(0.5 * batch["logvar"]) * torch.randn_like(batch["mean"])
    z = (z - shift.to(z.device)) / scale.to(z.device)
    return flow.flow_matching_loss(model, z, batch["labels"], class_dropout=class_dropout,
                                   time_sampling=cast(flow.TimeSampling, time_sampling),
                                   null_class=null_class)


def token_generator_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, *,
                         kind: str, class_dropout: float, label_smoothing: float,
                         null_class: int, mask_code: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Masked-code (maskgit) or next-code (ar) cross-entropy on a batch of cached codes."""
    codes, labels = batch["codes"].long(), batch["labels"]
    if kind == "maskgit":
        return tokens.maskgit_loss(model, codes, labels, class_dropout=class_dropout,
                                   label_smoothing=label_smoothing, null_class=null_class,
                                   mask_code=mask_code)
    return tokens.ar_loss(model, codes, labels, class_dropout=class_dropout,
                          label_smoothing=label_smoothing, null_class=null_class)


def build_model(model_cfg: GeneratorModelConfig | TokenGeneratorConfig) -> GeneratorModel:
    if isinstance(model_cfg, TokenGeneratorConfig):
        return TokenTransformer(model_cfg)
    return FlowTransformer(model_cfg)


def model_setup(cfg: GeneratorConfig, tok: TokenizerHandle, data: dict[str, np.ndarray],
                num_classes: int
                ) -> tuple[GeneratorModelConfig | TokenGeneratorConfig, dict[str, Any], Any]:
    """(model config, the meta fields of this kind, the loss function) for generator.kind."""
    k, d = tok.meta["latent_shape"]
    if cfg.kind in TOKEN_KINDS:
        vocab = tok.model.vocab_size
        token_cfg = token_generator_config(cfg.size, kind=cfg.kind, num_tokens=k,
                                           vocab_size=vocab, num_classes=num_classes,
                                           dropout=cfg.dropout)
        meta = {"kind": cfg.kind, "latent_shift": [0.0] * d, "latent_scale": [1.0] * d,
                "sampling": {"steps": cfg.maskgit_steps, "temperature": cfg.temperature,
                             "choice_temperature": cfg.choice_temperature,
                             "top_k": cfg.top_k, "top_p": cfg.top_p}}
        loss_fn = functools.partial(
            token_generator_loss, kind=cfg.kind, class_dropout=cfg.class_dropout,
            label_smoothing=cfg.label_smoothing, null_class=num_classes, mask_code=vocab)
        return token_cfg, meta, loss_fn
    shift, scale = latent_statistics(data)
    flow_cfg = generator_config(cfg.size, num_tokens=k, token_dim=d, num_classes=num_classes)
    loss_fn = functools.partial(
        generator_loss, shift=torch.tensor(shift, dtype=torch.float32),
        scale=torch.tensor(scale, dtype=torch.float32), class_dropout=cfg.class_dropout,
        time_sampling=cfg.time_sampling, null_class=num_classes)
    return flow_cfg, {"kind": "flow", "latent_shift": shift.tolist(),
                      "latent_scale": scale.tolist()}, loss_fn


class PeriodicEval:
    """gFD-eval and evaluator accuracy of a small balanced sample, for TrainSpec.evaluate.

    Holds the evaluator, the tokenizer and the val features themselves, not paths: it is pickled
    to the Ray Train worker that evaluates, which on a cluster does not see the driver's disk.
    """

    def __init__(self, meta: dict[str, Any], cfg: GeneratorConfig, evaluator: JudgeScorer,
                 tokenizer: TokenizerHandle, ref_features: np.ndarray) -> None:
        self.meta, self.cfg = meta, cfg
        self.evaluator, self.tokenizer, self.ref_features = evaluator, tokenizer, ref_features

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        evaluator, tok, ref_feats = self.evaluator, self.tokenizer, self.ref_features
        handle = GeneratorHandle(model, self.meta, tok)
        labels = flow.balanced_labels(len(self.meta["class_names"]), self.cfg.eval_per_class)
        images = handle.sample_images(labels.numpy(), seed=self.cfg.sample_seed,
                                      steps=self.cfg.sample_steps, cfg_scale=self.cfg.cfg_scale,
                                      sampler=self.cfg.sampler)
        feats, logp = evaluator.score(images)
        return {"gfd_eval": metrics.fd_from_features(ref_feats, feats),
                "eval_accuracy": metrics.accuracy(logp, labels.numpy())}


# --------------------------------------------------------------------------------------------
# Scoring samples (shared with the rl and evaluate stages)
# --------------------------------------------------------------------------------------------


# Random subsets averaged for the generated side of a comparison at the real set's count.
EQUAL_COUNT_SUBSETS = 5
SUBSET_SEED = 0


def _subset(n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_rows, n, replace=False)) if n < n_rows else np.arange(n_rows)


def precision_recall_equal(ref_features: np.ndarray, feats: np.ndarray,
                           seed: int = SUBSET_SEED) -> tuple[float, float]:
    """Precision/recall on equal-size sets: min(N_ref, N) seeded rows of each (k-NN radii
    depend on a set's size, so sets of unequal size would tilt the two numbers)."""
    n = min(len(ref_features), len(feats))
    rng = np.random.default_rng(seed)
    ref, gen = ref_features[_subset(len(ref_features), n, rng)], feats[_subset(len(feats), n, rng)]
    # k = 3 (Kynkaanniemi et al.) unless a set is too small to have 3 other neighbours.
    return metrics.precision_recall(ref, gen, k=max(1, min(3, n - 1)))


def score_samples(evaluator: JudgeScorer, images: np.ndarray, labels: np.ndarray,
                  ref_features: np.ndarray) -> dict[str, float]:
    """The evaluator's grades of generated images against reference features from the same
    network (the train split): gFD-eval, KID-eval (unbiased) with its std over subsets,
    precision/recall on equal-size sets, evaluator accuracy on the requested class, IS-eval,
    and diversity (mean pairwise feature distance within a class)."""
    feats, logp = evaluator.score(images)
    return grade_features(feats, logp, labels, ref_features)


def grade_features(feats: np.ndarray, logp: np.ndarray, labels: np.ndarray,
                   ref_features: np.ndarray) -> dict[str, float]:
    """score_samples on the evaluator's features (N, F) and log-probs (N, C) of the images,
    for callers that need those arrays too (each image set is scored once)."""
    precision, recall = precision_recall_equal(ref_features, feats)
    kid, kid_std = metrics.kernel_distance(ref_features, feats, seed=SUBSET_SEED)
    is_mean, _ = metrics.inception_score(logp)
    diversity = [metrics.mean_pairwise_distance(feats[labels == c])
                 for c in np.unique(labels) if (labels == c).sum() > 1]
    return {"gfd_eval": metrics.fd_from_features(ref_features, feats), "precision": precision,
            "recall": recall, "eval_accuracy": metrics.accuracy(logp, labels),
            "is_eval": is_mean, "diversity": float(np.mean(diversity)) if diversity else 0.0,
            "kid_eval": kid, "kid_eval_std": kid_std}


def class_matched_rows(labels: np.ndarray, counts: dict[int, int],
                       rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices holding counts[c] rows of each class c of `labels`, drawn without
    replacement (all of a class's rows when it has exactly that many)."""
    rows = [_subset(int((labels == c).sum()), n, rng) for c, n in counts.items()]
    picked = [np.flatnonzero(labels == c)[r] for c, r in zip(counts, rows, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def matched_counts(gen_labels: np.ndarray, real_labels: np.ndarray) -> dict[int, int]:
    """{class: min(generated, real) images of it}, for the classes both sets hold."""
    gen_labels, real_labels = np.asarray(gen_labels), np.asarray(real_labels)
    counts = {int(c): int(min((gen_labels == c).sum(), (real_labels == c).sum()))
              for c in np.unique(real_labels)}
    return {c: n for c, n in counts.items() if n > 0}


def at_real_count(ref_features: np.ndarray, gen_features: np.ndarray, gen_labels: np.ndarray,
                  real_features: np.ndarray, real_labels: np.ndarray, seed: int = SUBSET_SEED,
                  ref_labels: np.ndarray | None = None
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Generated and held-out real images compared with the reference at one count and one
    class composition: n_c = min(generated, real) images of each class c from both sets, n the
    sum. FD, KID and precision/recall of those n generated images (mean over
    EQUAL_COUNT_SUBSETS seeded draws when there are more) and of the n real held-out ones,
    which is what a perfect generator would score (FD's floor: FD is biased upwards at small n).
    Returns (generated, real) dicts with the keys n, fd_at_n, kid_at_n, precision_at_n,
    recall_at_n.

    Class-matched, not random, subsets: the evaluator's features cluster by class, so a
    subset's class proportions move its mean along the class directions, and FD's mean term
    grows with the square of that. Measured on the default digits (128-d features, 179 held-out
    images): random 179-image subsets of 1000 maskgit samples scored FD-eval 2.9-8.9 (ten
    draws), subsets with the held-out set's class counts 0.72-0.99, against 0.75 for the
    held-out images; random 179-image subsets of the train split itself scored 2.4-7.5 against
    the whole train split, subsets of it with the held-out class counts 0.19-0.37 (they are
    part of the reference). Random subsets made a floor that real images miss by 3-10x.

    Precision/recall compare sets of one size (k-NN radii depend on it): the reference's n
    rows take the same class counts when `ref_labels` (the reference's labels) are given, else
    a seeded random n of them.

    The real set must be held out from the evaluator's training, like generated images."""
    gen_labels, real_labels = np.asarray(gen_labels), np.asarray(real_labels)
    if len(gen_labels) != len(gen_features) or len(real_labels) != len(real_features):
        raise ValueError(f"labels and features differ in length: generated {len(gen_labels)} "
                         f"vs {len(gen_features)}, real {len(real_labels)} vs "
                         f"{len(real_features)}")
    counts = matched_counts(gen_labels, real_labels)
    n = sum(counts.values())
    if n < 2:
        raise ValueError(f"generated and held-out real images share {n} image(s) of common "
                         "classes; the equal-count comparison needs at least 2")
    rng = np.random.default_rng(seed)
    real = real_features[class_matched_rows(real_labels, counts, rng)]
    if ref_labels is not None:
        ref_labels = np.asarray(ref_labels)
        if len(ref_labels) != len(ref_features):
            raise ValueError(f"reference labels and features differ in length: "
                             f"{len(ref_labels)} vs {len(ref_features)}")
        ref_pr = ref_features[class_matched_rows(ref_labels, counts, rng)]
    else:
        ref_pr = ref_features[_subset(len(ref_features), n, rng)]  # P/R: equal-size reference

    def panel(x: np.ndarray) -> dict[str, float]:
        precision, recall = metrics.precision_recall(ref_pr, x, k=max(1, min(3, n - 1)))
        return {"fd_at_n": metrics.fd_from_features(ref_features, x),
                "kid_at_n": metrics.kernel_distance(ref_features, x, subsets=1,
                                                    subset_size=n, seed=seed)[0],
                "precision_at_n": precision, "recall_at_n": recall}

    # Several draws only when some class offers more generated images than it takes.
    whole = all(counts[c] == (gen_labels == c).sum() for c in counts)
    draws = 1 if whole else EQUAL_COUNT_SUBSETS
    gens = [panel(gen_features[class_matched_rows(gen_labels, counts, rng)])
            for _ in range(draws)]
    generated = {key: float(np.mean([g[key] for g in gens])) for key in gens[0]}
    return {"n": n, **generated}, {"n": n, **panel(real)}


def prefix_lengths(k: int) -> list[int]:
    """Powers of two below K, then K itself."""
    return [2**i for i in range(k.bit_length()) if 2**i < k] + [k]


def prefix_quality(tok: TokenizerHandle, latents: np.ndarray, labels: np.ndarray,
                   evaluator: JudgeScorer, ref_features: np.ndarray) -> dict[str, float]:
    """ar samples cut to their first k codes and decoded with the rest dropped (a flexible-
    length image: an ar sampler stopped after k steps draws exactly this prefix): gFD-eval and
    evaluator accuracy per prefix length k. Meaningful for a tokenizer trained with
    tokenizer.nested_dropout, whose decoder learned to read prefixes (FlexTok)."""
    out: dict[str, float] = {}
    for k in prefix_lengths(latents.shape[1]):
        feats, logp = evaluator.score(tok.decode(latents, keep=k))
        out[f"prefix{k}_gfd_eval"] = metrics.fd_from_features(ref_features, feats)
        out[f"prefix{k}_eval_accuracy"] = metrics.accuracy(logp, labels)
    return out


def class_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str],
               per_row: int = 10) -> np.ndarray:
    """One row per class of its first `per_row` samples."""
    rows = [images[labels == c][:per_row] for c in range(len(class_names))]
    return make_grid(rows, labels=class_names)


def run(params: Params, out_dir: str | Path = paths.GENERATOR, cache_dir: str | Path = paths.CACHE,
        tokenizer_dir: str | Path = paths.TOKENIZER, evaluator_dir: str | Path = paths.EVALUATOR,
        prepared_dir: str | Path = paths.PREPARED, tracker: Tracker | None = None) -> StageResult:
    cfg: GeneratorConfig = params.generator
    tracker = tracker or Tracker()
    tok = load_tokenizer(tokenizer_dir)
    cache = load_cache(cache_dir, tokenizer_sha256=tok.sha256, verify=True)
    evaluator = load_judge(evaluator_dir)  # grades the samples (the judge gives RL rewards)
    prepared = load_prepared(prepared_dir, verify=True)
    tracker.log_input("cache", str(Path(cache_dir).resolve()), cache.manifest_sha256,
                      context="training", profile={"key": cache.key})
    tracker.log_input("tokenizer", str(Path(tokenizer_dir).resolve()), tok.sha256,
                      context="decoder")
    tracker.log_input("evaluator", str(Path(evaluator_dir).resolve()), evaluator.sha256,
                      context="evaluation")
    tracker.log_input("prepared", str(Path(prepared_dir).resolve()), prepared.manifest_sha256,
                      context="evaluation")

    data = training_arrays(cache, tok, cfg.kind)
    train_x, train_y = prepared.split("train")
    val_x, val_y = prepared.split("val")
    # The train split is the reference (the larger set); val, held out, is the real set a
    # perfect generator would be compared like.
    ref_feats, _ = evaluator.score(train_x)
    val_feats, _ = evaluator.score(val_x)
    model_cfg, kind_meta, loss_fn = model_setup(cfg, tok, data, prepared.num_classes)
    meta: dict[str, Any] = {
        "model": asdict(model_cfg), "latent_shape": tok.meta["latent_shape"], **kind_meta,
        "class_names": prepared.class_names, "tokenizer_sha256": tok.sha256,
        "cache_key": cache.key, "evaluator_sha256": evaluator.sha256,
        "sample_defaults": sampling_record(cfg.sample_steps, cfg.sampler, cfg.cfg_scale)}
    spec = TrainSpec(build_model=functools.partial(build_model, model_cfg), loss_fn=loss_fn,
                     data=data, evaluate=PeriodicEval(meta, cfg, evaluator, tok, ref_feats),
                     eval_every=cfg.eval_every, code=paths.code_sha256("generator"))
    # Keyed by the cache's content (its manifest lists every shard's sha256), not its identity
    # key (tokenizer + data): latents the cache stage encodes anew (other code, other settings)
    # under the same key must not resume a generator trained on the old ones.
    result = train(spec, cfg, params.compute,
                   paths.checkpoint_dir("generator", cache.manifest_sha256),
                   tracker=tracker, progress=False)
    meta["training"] = result.training_meta()

    model = build_model(model_cfg)
    model.load_state_dict(result.ema_state)
    handle = GeneratorHandle(model, meta, tok)
    labels = flow.balanced_labels(prepared.num_classes, cfg.final_per_class).numpy()
    started = time.perf_counter()
    sampled_on: set[str] = set()
    latents, images, nfe = sample(handle, labels, seed=cfg.sample_seed, steps=cfg.sample_steps,
                            cfg_scale=cfg.cfg_scale, sampler=cfg.sampler, compute=params.compute,
                            nodes=sampled_on)
    record_nodes(tracker, "sample", sampled_on)
    sample_seconds = time.perf_counter() - started
    feats, logp = evaluator.score(images)
    m = grade_features(feats, logp, labels, ref_feats)
    if sum(matched_counts(labels, val_y).values()) >= 2:
        generated, real = at_real_count(ref_feats, feats, labels, val_feats, val_y,
                                        ref_labels=train_y)
        # At equal counts: gFD of as many samples as there are held-out real images, over the
        # FD of those real images (both against the train split); 1 would be a perfect generator.
        m["real_count"] = generated["n"]
        m["gfd_eval_at_real_count"] = generated["fd_at_n"]
        m["real_fd_eval"] = real["fd_at_n"]
        m["gfd_ratio_to_real"] = generated["fd_at_n"] / max(real["fd_at_n"], 1e-9)
    else:
        log.warning("generator: the val split has %d image(s), %d of the sampled classes; no "
                    "comparison with held-out real images at equal counts (it needs 2)",
                    len(val_feats), sum(matched_counts(labels, val_y).values()))
    m["nfe"] = nfe
    if cfg.kind == "ar":
        m.update(prefix_quality(tok, latents, labels, evaluator, ref_feats))
    m = {key: round(float(v), 6) for key, v in m.items()}
    meta["metrics"] = m
    with storage.atomic_dir(out_dir) as tmp:
        save_weights(model.state_dict(), tmp / WEIGHTS)
        storage.write_bytes_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        storage.write_bytes_atomic(tmp / "train_curve.csv", loss_curve_csv(result.history).encode())
        save_png(class_grid(images, labels, prepared.class_names), tmp / "samples.png")
    out_dir = Path(out_dir)
    weights_sha = storage.sha256_file(out_dir / WEIGHTS)
    for name in (META, "samples.png"):
        tracker.log_artifact(out_dir / name)
    tracker.log_model("generator", out_dir, registered_name=REGISTERED_MODELS["generator"].name,
                      artifacts={"tokenizer_dir": Path(tokenizer_dir)},
                      tags={"stage": "generator", "prepared_sha256": prepared.manifest_sha256,
                            "cache_key": cache.key, "tokenizer_sha256": tok.sha256,
                            "evaluator_sha256": evaluator.sha256,
                            "weights_sha256": weights_sha})
    log.info("%s generator: gFD-eval %.3f; at %d images %.3f vs %.3f for held-out real images "
             "(x%.2f); evaluator accuracy %.4f, precision %.3f, recall %.3f, %.0f images/s "
             "sampling at NFE %d", cfg.kind, m["gfd_eval"], m.get("real_count", 0),
             m.get("gfd_eval_at_real_count", float("nan")), m.get("real_fd_eval", float("nan")),
             m.get("gfd_ratio_to_real", float("nan")), m["eval_accuracy"], m["precision"],
             m["recall"], len(images) / sample_seconds, nfe)
    table = "\n".join(f"| {key} | {v:.4g} |" for key, v in m.items())
    where = "".join(f"\n\n{what} on Ray node(s) {', '.join(n[:12] for n in sorted(ids))}"
                    for what, ids in (("Trained", result.nodes), ("Sampled", sampled_on)) if ids)
    return StageResult(
        metrics=m, summary=f"{cfg.kind} generator ({cfg.size}) over {tok.model.cfg.quantizer} "
                           f"latents\n\n| metric | value |\n|---|---|\n{table}{where}",
        digests={"generator": weights_sha},
        timings={"train_images_per_s": result.images_per_s, "train_seconds": result.seconds,
                 "sampling_images_per_s": len(images) / sample_seconds,
                 "resumed_from_step": result.resumed_from})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
