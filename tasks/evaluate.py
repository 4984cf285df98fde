"""The `evaluate` stage: one protocol-recorded evaluation of everything the pipeline produced.

On the prepared val split it measures
  - the tokenizer: PSNR, SSIM, rFD-judge, pFD-judge, judge accuracy on reconstructions
    (`tasks.tokenizer.evaluate`, the same code the tokenizer stage reports with);
  - the base and the RL generator, sampled with the *same* class-balanced labels and the same
    per-sample noise (sample i's noise depends only on (evaluate.seed, i)): gFD-eval,
    precision/recall, evaluator accuracy on the requested class, IS-eval, diversity (mean
    pairwise evaluator-feature distance within a class), all from the evaluator network, never
    the reward judge; the mean reward under the `rl.rewards` definition (any network in it is the
    judge); and NFE.
    Sampling speed goes to MLflow only, since it varies run to run;
  - FID-named numbers (rFID, gFID) only when `evaluate.inception_weights` names a local
    Inception-v3 file. Without it nothing is called FID: judge-based distances are FD-judge.

Outputs: the DVC metrics (flat keys such as "base.gfd_eval", headline numbers first) and the
folder reports/evaluate/ (report.md, protocol.json, plots, base-vs-RL sample grid), built under
a temporary name and swapped in whole. Every file in it is a pure function of the inputs and
parameters (no timings, no timestamps), so reruns leave identical bytes and dvc.lock entries.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge import flow, metrics, paths, preflight, storage
from latentforge.config import ComputeConfig, EvaluateConfig, Params
from latentforge.data import MANIFEST, Prepared, load_prepared
from latentforge.errors import DataError
from latentforge.figures import (
    figure_png,
    losses_plot,
    new_figure,
    prefix_plot,
    reward_plot,
    side_by_side,
    style_axes,
)
from latentforge.images import png_bytes
from latentforge.intervals import (
    BOOTSTRAP_REPLICATES,
    INTERVAL_METRICS,
    PIXEL_METRIC,
    PerSample,
    Reference,
    bootstrap_intervals,
    with_interval,
)
from latentforge.raycluster import record_nodes
from latentforge.rewards import Reward
from latentforge.runner import StageResult
from latentforge.tasks import compare
from latentforge.tasks import generator as generator_stage
from latentforge.tasks import judge as judge_stage
from latentforge.tasks import tokenizer as tokenizer_stage
from latentforge.tasks.generator import GeneratorHandle, class_grid, load_generator
from latentforge.tasks.judge import JudgeScorer, images_to_tensor, load_judge
from latentforge.tasks.posttrain import apply_decoder
from latentforge.tasks.tokenizer import TokenizerHandle, load_tokenizer, recon_grid
from latentforge.tracking import Tracker
from latentforge.training import driver_device

log = logging.getLogger(__name__)

REPORT_MD, PROTOCOL_JSON = "report.md", "protocol.json"
SAMPLES_PNG = "samples_base_vs_rl.png"
RECON_PNG = "tokenizer_recon.png"
PREFIX_PNG = "tokenizer_prefix_psnr.png"
REWARD_PNG = "rl_reward.png"
LOSSES_PNG = "training_losses.png"
SWEEP_PNG = "cfg_sweep.png"
# What the CFG sweep records per scale; the best operating point is the lowest gFD-eval.
SWEEP_KEYS = ("eval_accuracy", "gfd_eval", "precision", "recall", "diversity")
SWEEP_INTERVAL_KEYS = ("eval_accuracy", "gfd_eval")  # with 95% bootstrap intervals
SWEEP_SEED_OFFSET = 1  # the sweep samples with noise seed evaluate.seed + 1
REWARD_CSV = "rl_reward.csv"  # in plots_dir, written by the rl stage
TRAIN_CURVE = "train_curve.csv"  # in each training stage's output folder

MODELS = ("base", "rl")
STAGE_OF = {"base": "generator", "rl": "rl"}  # which stage's folder holds each model
MODEL_TITLES = {"base": "base generator", "rl": "RL generator"}
# What generator.score_samples uses; recorded in the protocol.
PR_NEIGHBOURS = 3
# Fewer reference images than this and precision/recall (k = 3 neighbours) is undefined.
MIN_VAL_IMAGES = PR_NEIGHBOURS + 1
# The `latentforge run` table shows a stage's first four metrics.
HEADLINE = ("rl.eval_accuracy", "base.eval_accuracy", "rl.gfd_eval", "base.gfd_eval")
DECIMALS = 6
INCEPTION_BATCH = 32

# The main comparison's bootstrapped metrics: the evaluator's, the reward, and FD-pixels.
EVALUATE_INTERVALS = (*INTERVAL_METRICS, PIXEL_METRIC)
# Generator metrics in report order: (key, label, which direction is better).
GENERATOR_ROWS: tuple[tuple[str, str, str], ...] = (
    ("eval_accuracy", "evaluator accuracy", "higher"),
    ("gfd_eval", "gFD-eval", "lower"),
    (PIXEL_METRIC, "FD-pixels (raw pixels, no network)", "lower"),
    ("gfid", "gFID", "lower"),
    ("precision", "precision", "higher"),
    ("recall", "recall", "higher"),
    ("is_eval", "IS-eval", "higher"),
    ("kid_eval", "KID-eval (unbiased)", "lower"),
    ("kid_eval_std", "KID-eval std over subsets", ""),
    ("fd_at_n", "FD-eval at the real set's count", "lower"),
    ("fd_pixels_at_n", "FD-pixels at the real set's count", "lower"),
    ("kid_at_n", "KID-eval at the real set's count", "lower"),
    ("precision_at_n", "precision at the real set's count", "higher"),
    ("recall_at_n", "recall at the real set's count", "higher"),
    ("reward_mean", "mean reward (rl.rewards)", "higher"),
    ("reward_std", "reward std (rl.rewards)", ""),
    ("diversity", "diversity (within-class)", "higher"),
    ("cfg_scale", "CFG scale", ""),
    ("nfe", "NFE", ""),
)
TOKENIZER_LABELS = {
    "val_psnr": ("PSNR (dB)", "higher"), "val_ssim": ("SSIM", "higher"),
    "rfd_judge": ("rFD-judge", "lower"), "pfd_judge": ("pFD-judge", "lower"),
    "rfid": ("rFID", "lower"), "judge_acc_originals": ("judge accuracy, originals", "higher"),
    "judge_acc_recon": ("judge accuracy, reconstructions", "higher"),
    "judge_acc_ratio": ("judge accuracy ratio recon/originals", "higher"),
    "codebook_usage": ("codebook usage", "higher"),
    "codebook_perplexity": ("codebook perplexity", "higher"),
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything the stage evaluates, loaded and cross-checked."""

    prepared: Prepared
    judge: JudgeScorer  # the reward (and the tokenizer's FD-judge)
    evaluator: JudgeScorer  # grades the generated samples
    tokenizer: TokenizerHandle
    generators: dict[str, GeneratorHandle]  # "base", "rl" (the first RL seed)
    dirs: dict[str, Path]  # input name (prepared, judge, evaluator, tokenizer, ...) -> folder
    seed_generators: dict[int, GeneratorHandle] = dataclasses.field(default_factory=dict)
    """The other RL seeds (rl.seeds after the first), from the rl folder's seeds/."""

    @property
    def seeds(self) -> list[compare.SeedSet]:
        first = self.generators["rl"].meta.get("rl", {}).get("seed")
        return compare.seed_sets(first, list(self.seed_generators))


def require_inputs(dirs: Mapping[str, Path]) -> None:
    """Fail before any work with a DataError naming the first missing input file."""
    needed = {"prepared": (MANIFEST, "prepare"), "judge": (judge_stage.META, "judge"),
              "evaluator": (judge_stage.META, "judge"),
              "tokenizer": (tokenizer_stage.META, "tokenizer"),
              "generator": (generator_stage.META, "generator"), "rl": (generator_stage.META, "rl")}
    for name, (marker, stage) in needed.items():
        path = dirs[name] / marker
        if not path.is_file():
            raise DataError(f"{path}: missing; evaluate needs the {stage} stage's output in "
                            f"{dirs[name]} (run the {stage} stage first)")


def load_inputs(dirs: Mapping[str, Path]) -> Inputs:
    require_inputs(dirs)
    prepared = load_prepared(dirs["prepared"], verify=True)
    judge = load_judge(dirs["judge"])
    evaluator = load_judge(dirs["evaluator"])
    if evaluator.sha256 == judge.sha256:
        raise DataError(f"{dirs['evaluator']} holds the same weights as the reward judge in "
                        f"{dirs['judge']}: a network that gave the reward cannot grade the "
                        "result; evaluate needs the judge stage's evaluator")
    generators = {m: load_generator(dirs[STAGE_OF[m]], dirs["tokenizer"]) for m in MODELS}
    dirs = dict(dirs)
    seed_generators = {}
    for seed, rel in generators["rl"].meta.get("rl", {}).get("other_seeds", []):
        folder = dirs["rl"] / rel
        if not (folder / generator_stage.META).is_file():
            raise DataError(f"{folder / generator_stage.META}: missing; {dirs['rl']} lists RL "
                            f"seed {seed} there (rerun the rl stage)")
        seed_generators[int(seed)] = load_generator(folder, dirs["tokenizer"])
        dirs[f"rl_seed{seed}"] = folder
    owners = [("judge", judge.class_names), ("evaluator", evaluator.class_names),
              *((str(dirs[STAGE_OF[m]]), generators[m].class_names) for m in MODELS),
              *((str(dirs[f"rl_seed{s}"]), h.class_names) for s, h in seed_generators.items())]
    for owner, names in owners:
        if list(names) != prepared.class_names:
            raise DataError(f"{owner} knows classes {list(names)[:5]}... but "
                            f"{dirs['prepared']} has {prepared.class_names[:5]}...; evaluate "
                            "needs every model trained on the same prepared data")
    # Every generator decodes with the one tokenizer load_generator checked them against, and
    # with the posttrain stage's decoder where it post-trained one; the tokenizer's own
    # metrics (PSNR, rFD, pFD) keep the tokenizer's own decoder.
    tokenizer = generators["base"].tokenizer
    if dirs.get("decoder") is not None:
        for handle in (*generators.values(), *seed_generators.values()):
            apply_decoder(handle.tokenizer, dirs["decoder"])
        if "decoder" in tokenizer.meta:
            tokenizer = load_tokenizer(dirs["tokenizer"])
    # RL learned from images its decoder made: grading it through another would mislead.
    applied = tokenizer_decoder_sha(generators["base"].tokenizer)
    rl_handles = [(dirs["rl"], generators["rl"]),
                  *((dirs[f"rl_seed{n}"], h) for n, h in seed_generators.items())]
    for rl_dir, handle in rl_handles:
        rl_meta = handle.meta.get("rl", {})
        if "decoder_sha256" in rl_meta and rl_meta["decoder_sha256"] != applied:
            raise DataError(f"{rl_dir} was fine-tuned decoding with "
                            f"{_decoder_name(rl_meta['decoder_sha256'])}, but evaluate would "
                            f"decode with {_decoder_name(applied)} ({dirs.get('decoder')}); "
                            "rerun the rl stage")
    return Inputs(prepared, judge, evaluator, tokenizer, generators, dirs, seed_generators)


def tokenizer_decoder_sha(tok: TokenizerHandle) -> str | None:
    """The sha256 of the post-trained decoder `tok` decodes with, None for its own."""
    decoder = tok.meta.get("decoder")
    return str(decoder["sha256"]) if decoder else None


def _decoder_name(sha: str | None) -> str:
    return f"the post-trained decoder {sha[:12]}" if sha else "the tokenizer's own decoder"


def input_digests(inputs: Inputs, fid_weights_sha: str | None) -> dict[str, str]:
    """sha256 of each input: the prepared manifest and every model's weights."""
    digests = {"prepared": inputs.prepared.manifest_sha256, "judge": inputs.judge.sha256,
               "evaluator": inputs.evaluator.sha256,
               "tokenizer": inputs.tokenizer.sha256,
               **{STAGE_OF[m]: inputs.generators[m].meta["sha256"] for m in MODELS},
               **{f"rl_seed{s}": h.meta["sha256"] for s, h in inputs.seed_generators.items()}}
    decoder = inputs.generators["base"].tokenizer.meta.get("decoder")
    if decoder:
        digests["decoder"] = decoder["sha256"]
    if fid_weights_sha:
        digests["inception"] = fid_weights_sha
    return digests


def log_inputs(tracker: Tracker, inputs: Inputs, digests: Mapping[str, str],
               inception_weights: str | None) -> None:
    sources = {**{k: str(v.resolve()) for k, v in inputs.dirs.items()},
               "inception": str(Path(inception_weights or ".").resolve())}
    for name, digest in digests.items():
        tracker.log_input(name, sources[name], digest,
                          context="evaluation" if name == "prepared" else "model")


# --------------------------------------------------------------------------------------------
# Sampling and scoring
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    images: np.ndarray  # (N, H, W, C) uint8
    nfe: int
    seconds: float  # ODE sampling + decoding, for the speed timings only
    cfg_scale: float


def cfg_scale_for(model: str, handle: GeneratorHandle, params: Params) -> float:
    """evaluate.cfg_scale, else the scale the model was trained/tuned to be sampled at."""
    if params.evaluate.cfg_scale is not None:
        return float(params.evaluate.cfg_scale)
    if model == "rl":  # the rl stage records the scale it tuned at in generator.json
        tuned = handle.meta.get("rl", {}).get("params", {}).get("cfg_scale")
        return float(tuned if tuned is not None else params.rl.cfg_scale)
    return float(handle.meta.get("cfg_scale", params.generator.cfg_scale))


def sample_generator(handle: GeneratorHandle, labels: np.ndarray, cfg: EvaluateConfig,
                     cfg_scale: float, compute: ComputeConfig,
                     nodes: set[str] | None = None) -> Samples:
    started = time.perf_counter()
    _, images, nfe = generator_stage.sample(handle, labels, seed=cfg.seed, steps=cfg.sample_steps,
                                            cfg_scale=cfg_scale, sampler=cfg.sampler,
                                            compute=compute, nodes=nodes)
    return Samples(images, nfe, time.perf_counter() - started, cfg_scale)


@dataclasses.dataclass
class PixelReference:
    """FD-pixels' references: the train split's pixel features (with their FD statistics,
    computed once) and the held-out real images' (the floor at their count)."""

    features: np.ndarray
    real: np.ndarray

    def __post_init__(self) -> None:
        self.reference = Reference(self.features)


def score_generator(samples: Samples, labels: np.ndarray, evaluator: JudgeScorer,
                    ref_features: np.ndarray, ref_labels: np.ndarray, real_features: np.ndarray,
                    real_labels: np.ndarray, reward: Reward, pixel_ref: PixelReference
                    ) -> tuple[dict[str, float], dict[str, float], PerSample]:
    """The evaluator's metrics of one generated set against the reference (train split), the
    same at the held-out real set's count, and the (judge's) reward beside them; with the
    held-out real set's own numbers at that count (the floor), and the per-sample values the
    bootstrap resamples (the reward computed once, so a nondeterministic user reward cannot
    centre the interval away from the reported mean). FD-pixels grades the same samples by
    their raw pixels against the reference's (`pixel_ref`), with no network at all, and at the
    held-out real set's count beside the real set's own."""
    feats, logp = evaluator.score(samples.images)
    pixels = metrics.pixel_features(samples.images)
    m = generator_stage.grade_features(feats, logp, labels, ref_features)
    m[PIXEL_METRIC] = pixel_ref.reference.fd(pixels)
    generated, real = generator_stage.at_real_count(ref_features, feats, labels,
                                                    real_features, real_labels,
                                                    ref_labels=ref_labels)
    m.update({k: v for k, v in generated.items() if k != "n"})
    gen_px, real_px = generator_stage.at_real_count(pixel_ref.features, pixels, labels,
                                                    pixel_ref.real, real_labels,
                                                    ref_labels=ref_labels)
    m["fd_pixels_at_n"], real["fd_pixels_at_n"] = gen_px["fd_at_n"], real_px["fd_at_n"]
    total, _ = reward(samples.images, labels)
    m["reward_mean"] = float(total.mean())
    m["reward_std"] = float(total.std())
    m["cfg_scale"] = samples.cfg_scale
    m["nfe"] = samples.nfe
    return m, real, PerSample(feats, logp, total, pixels)



def sweep_key(scale: float) -> str:
    """1.25 -> "cfg1_25" (no dot: DVC reads dots in metric names as nesting)."""
    return f"cfg{scale:g}".replace(".", "_")


def cfg_sweep(inputs: Inputs, cfg: EvaluateConfig, evaluator: JudgeScorer,
              ref_features: np.ndarray, ref_labels: np.ndarray, compute: ComputeConfig,
              nodes: set[str]) -> dict[str, dict[str, float]]:
    """Base and RL sampled at every evaluate.cfg_sweep scale (same labels and noise) and graded
    by the evaluator: {"sweep_base": {"cfg1_5_gfd_eval": ...}, "sweep_rl": ..., "best": the
    scale of each model's lowest gFD-eval and its numbers there}."""
    labels = flow.balanced_labels(inputs.prepared.num_classes, cfg.cfg_sweep_per_class).numpy()
    # Its own noise: the base's best scale is picked here and then compared with RL on the
    # evaluation's draw, which must not be the draw it was picked on.
    cfg = dataclasses.replace(cfg, seed=cfg.seed + SWEEP_SEED_OFFSET)
    out: dict[str, dict[str, float]] = {f"sweep_{m}": {} for m in MODELS}
    sets: dict[str, PerSample] = {}
    for scale in cfg.cfg_sweep:
        for m in MODELS:
            log.info("evaluate: CFG sweep, %s at scale %g (%d samples)", m, scale, len(labels))
            s = sample_generator(inputs.generators[m], labels, cfg, scale, compute, nodes)
            feats, logp = evaluator.score(s.images)
            graded = generator_stage.grade_features(feats, logp, labels, ref_features)
            out[f"sweep_{m}"].update({f"{sweep_key(scale)}_{k}": graded[k] for k in SWEEP_KEYS})
            sets[f"{m}@{sweep_key(scale)}"] = PerSample(feats, logp)
    log.info("evaluate: %d bootstrap replicates for the CFG sweep's intervals",
             BOOTSTRAP_REPLICATES)
    intervals = bootstrap_intervals(ref_features, sets, labels, seed=cfg.seed, pairs={},
                                    keys=SWEEP_INTERVAL_KEYS, ref_labels=ref_labels)
    for name, values in intervals.items():
        m, key = name.split("@")
        out[f"sweep_{m}"].update({f"{key}_{k}": v for k, v in values.items()})
    best: dict[str, float] = {}
    for m in MODELS:
        values = out[f"sweep_{m}"]
        scale = min(cfg.cfg_sweep, key=lambda c: values[f"{sweep_key(c)}_gfd_eval"])
        best[f"{m}_cfg_scale"] = scale
        for k in SWEEP_KEYS:
            best[f"{m}_{k}"] = values[f"{sweep_key(scale)}_{k}"]
        for k in SWEEP_INTERVAL_KEYS:
            for end in ("ci_low", "ci_high"):
                best[f"{m}_{k}_{end}"] = values[f"{sweep_key(scale)}_{k}_{end}"]
    for k in ("eval_accuracy", "gfd_eval", "recall"):
        best[f"rl_minus_base_{k}"] = best[f"rl_{k}"] - best[f"base_{k}"]
    out["best"] = best
    return out


def sweep_plot(nested: Mapping[str, Mapping[str, float]], scales: Sequence[float]) -> bytes:
    """Evaluator accuracy and recall against gFD-eval, one line per generator, one point per
    CFG scale (labelled)."""
    fig, axes = new_figure(2, width=4.2)
    for ax, key, title in zip(axes, ("eval_accuracy", "recall"),
                              ("evaluator accuracy", "recall"), strict=True):
        for m in MODELS:
            values = nested[f"sweep_{m}"]
            x = np.array([values[f"{sweep_key(c)}_gfd_eval"] for c in scales])
            y = np.array([values[f"{sweep_key(c)}_{key}"] for c in scales])

            line = ax.plot(x, y, marker="o", label=MODEL_TITLES[m])[0]

            def ends(k: str, values: Mapping[str, float] = values) -> np.ndarray | None:
                names = [f"{sweep_key(c)}_{k}_ci_{e}" for c in scales for e in ("low", "high")]
                if not all(n in values for n in names):
                    return None
                return np.array([values[n] for n in names]).reshape(-1, 2)  # (scales, 2)

            # Interval segments from their ends (a bias-shifted interval need not hold its
            # point, so they are not drawn as +- errors).
            if (gfd := ends("gfd_eval")) is not None:
                ax.hlines(y, gfd[:, 0], gfd[:, 1], color=line.get_color(), alpha=0.5)
            if (val := ends(key)) is not None:
                ax.vlines(x, val[:, 0], val[:, 1], color=line.get_color(), alpha=0.5)
            for c, xi, yi in zip(scales, x, y, strict=True):
                ax.annotate(f"{c:g}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        style_axes(ax, "gFD-eval (lower is better)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs gFD-eval across CFG scales")
        ax.legend(loc="best", fontsize=8)
    return figure_png(fig)


def sweep_section(nested: Mapping[str, Mapping[str, float]], scales: Sequence[float],
                  per_class: int, classes: int) -> list[str]:
    if "best" not in nested:
        return []
    lines = ["## CFG sweep: base and RL at each guidance scale", "",
             f"{per_class * classes} samples per point ({per_class} per class, the same labels "
             "and noise at every point, noise seed evaluate.seed + "
             f"{SWEEP_SEED_OFFSET}: not the draw the tables above compare on), graded by the "
             "evaluator against the train split.", "",
             "| CFG | base accuracy | base gFD-eval | base recall | RL accuracy | RL gFD-eval | "
             "RL recall |", "|---|---|---|---|---|---|---|"]
    for c in scales:
        cells = [with_interval(nested[f"sweep_{m}"], f"{sweep_key(c)}_{k}") for m in MODELS
                 for k in ("eval_accuracy", "gfd_eval", "recall")]
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    b = nested["best"]
    lines += ["", f"Best operating points (lowest gFD-eval): base at CFG **{b['base_cfg_scale']:g}** "
              f"(accuracy {with_interval(b, 'base_eval_accuracy')}, gFD-eval "
              f"{with_interval(b, 'base_gfd_eval')}, recall {_fmt(b['base_recall'])}); RL at "
              f"CFG **{b['rl_cfg_scale']:g}** (accuracy {with_interval(b, 'rl_eval_accuracy')}, "
              f"gFD-eval {with_interval(b, 'rl_gfd_eval')}, recall {_fmt(b['rl_recall'])}). "
              "[low, high]: 95% bootstrap intervals over this point's samples and the reference "
              "set, each within its classes; the lowest gFD-eval is picked on the point values, so where intervals "
              "overlap the best scale is not a sharp choice.", ""]
    return lines


def inception_features(net: torch.nn.Module, images: np.ndarray, device: torch.device
                       ) -> np.ndarray:
    """FID Inception pool3 features (N, 2048), float64, of uint8 images (N, H, W, C)."""
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), INCEPTION_BATCH):
            x = images_to_tensor(images[start:start + INCEPTION_BATCH]).to(device)
            feats.append(net(x).double().cpu().numpy())
    return np.concatenate(feats)


def fid_metrics(weights: str, val_x: np.ndarray, recon: np.ndarray,
                samples: Mapping[str, Samples], device: torch.device
                ) -> tuple[dict[str, dict[str, float]], str]:
    """rFID (val vs reconstructions) and gFID per generator (val vs samples); weights sha."""
    from latentforge.inception import load_fid_inception

    net = load_fid_inception(weights).to(device)
    ref = inception_features(net, val_x, device)
    out: dict[str, dict[str, float]] = {
        "tokenizer": {"rfid": metrics.fd_from_features(ref, inception_features(net, recon,
                                                                                device))}}
    for model, s in samples.items():
        out[model] = {"gfid": metrics.fd_from_features(
            ref, inception_features(net, s.images, device))}
    return out, storage.sha256_file(weights)


# --------------------------------------------------------------------------------------------
# Metrics dict and protocol
# --------------------------------------------------------------------------------------------


def flatten_metrics(nested: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{"base": {"gfd_eval": x}} -> {"base.gfd_eval": x}, rounded, headline keys first."""
    flat = {f"{group}.{key}": round(float(value), DECIMALS)
            for group, values in nested.items() for key, value in values.items()}
    head = {k: flat[k] for k in HEADLINE if k in flat}
    return {**head, **{k: v for k, v in flat.items() if k not in head}}


def class_counts(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    return {name: int(counts[i]) for i, name in enumerate(class_names)}


def sampling_protocol(handle: GeneratorHandle, cfg: EvaluateConfig
                      ) -> dict[str, Any]:
    """The sampler and its step count as the report states them, for the generator's kind:
    the flow ODE's evaluate.sampler / sample_steps, or a token generator's own sampling."""
    if handle.kind == "maskgit":
        s = handle.meta["sampling"]
        return {"kind": "maskgit", "steps": s["steps"],
                "sampler": f"maskgit confidence unmasking (temperature {s['temperature']:g}, "
                           f"choice temperature {s['choice_temperature']:g})"}
    if handle.kind == "ar":
        s = handle.meta["sampling"]
        return {"kind": "ar", "steps": handle.model.cfg.num_tokens,
                "sampler": f"autoregressive, one code per step (temperature "
                           f"{s['temperature']:g}, top-k {s['top_k'] or 'off'}, top-p "
                           f"{s['top_p']:g})"}
    return {"kind": "flow", "sampler": cfg.sampler, "steps": cfg.sample_steps}


def build_protocol(params: Params, inputs: Inputs, val_y: np.ndarray, labels: np.ndarray,
                   samples: Mapping[str, Samples], reward: Reward, digests: Mapping[str, str]
                   ) -> dict[str, Any]:
    """Everything that changes the numbers, next to them (FD depends on all of it)."""
    cfg = params.evaluate
    names = inputs.prepared.class_names
    evaluator_model = inputs.evaluator.meta["model"]
    fid: dict[str, Any] | None = None
    if cfg.inception_weights:
        fid = {"network": "Inception-v3, FID port (pytorch-fid layout), pool3 2048-d",
               "weights": cfg.inception_weights, "weights_sha256": digests["inception"],
               "preprocessing": "uint8 -> [-1, 1], grayscale repeated to RGB, bilinear resize "
                                "to 299x299 (no antialias)",
               "metrics": {"rfid": "val originals vs their reconstructions",
                           "gfid": "val split vs generated samples"}}
    _, train_y = inputs.prepared.split("train")
    matched = sum(min(int((labels == c).sum()), int((val_y == c).sum())) for c in np.unique(val_y))
    return {
        "split": "val",
        "reference_set": {"name": "prepared train split", "images": int(len(train_y)),
                          "class_counts": class_counts(np.asarray(train_y), names),
                          "role": "what generated and held-out real images are compared with "
                                  "(FD, KID, precision/recall)"},
        "real_set": {"name": "prepared val split (held out)", "images": int(len(val_y)),
                     "class_counts": class_counts(val_y, names),
                     "role": "scored like a generated set at the samples' count and class "
                             "composition (per class min(samples, held-out)): the floor a "
                             "perfect generator would reach there"},
        "samples": {"per_generator": int(len(labels)), "per_class": cfg.per_class,
                    "classes": len(names), "class_balance": "balanced, class-major order",
                    "labels_and_noise": "identical for base and RL"},
        **sampling_protocol(inputs.generators["base"], cfg),
        "cfg_sweep": {"scales": list(cfg.cfg_sweep), "per_class": cfg.cfg_sweep_per_class,
                      "seed": cfg.seed + SWEEP_SEED_OFFSET,
                      "best_operating_point": "the scale with the lowest gFD-eval, per model"},
        "decoder": ({"name": "post-trained decoder (posttrain stage)",
                     "sha256": digests["decoder"], "role": "decodes every generated sample; "
                     "the tokenizer's metrics keep the tokenizer's own decoder"}
                    if "decoder" in digests else
                    {"name": "the tokenizer's own decoder (posttrain.enabled false)"}),
        "nfe": {m: samples[m].nfe for m in MODELS},
        "cfg_scale": {m: samples[m].cfg_scale for m in MODELS},
        "rl_seeds": {"seeds": [s.seed if s.seed >= 0 else None for s in inputs.seeds],
                     "sets": {str(s.seed): s.samples for s in inputs.seeds},
                     "sampling": "every seed at the RL CFG scale, with the base's labels and "
                                 "noise",
                     "interval_across_seeds": "95% Student-t over the seeds' differences to the "
                                              "base, widened by the bootstrap std of the mean "
                                              "(the sample noise all seeds share); none with "
                                              "one seed"},
        "guided_base": ({"cfg_scale": samples["guided"].cfg_scale if "guided" in samples else
                         samples["base"].cfg_scale,
                         "role": "the base at its best CFG scale (lowest gFD-eval of the sweep), "
                                 "sampled at this count with the same labels and noise: what "
                                 "RL at its own scale is compared with"}
                        if cfg.cfg_sweep else None),
        "cfg_source": "evaluate.cfg_scale" if cfg.cfg_scale is not None else
                      "each model's own (generator.cfg_scale for base, rl.cfg_scale for RL)",
        "seed": cfg.seed,
        "noise": "sample i starts from flow.sample_noise(index i, seed): independent of batching",
        "feature_network": {"name": "evaluator", "sha256": digests["evaluator"],
                            "width": evaluator_model["width"],
                            "features": f"penultimate layer, {evaluator_model['feature_dim']}-d",
                            "input": f"native {inputs.prepared.resolution}x"
                                     f"{inputs.prepared.resolution}, no resizing",
                            "grades": "every generated-sample metric; never the reward"},
        "reward_network": {"name": "judge", "sha256": digests["judge"],
                           "used_for": "the reward, and the tokenizer's FD-judge numbers"},
        "metrics": {
            "gfd_eval": "Frechet distance of evaluator features, train split vs all samples",
            "fd_pixels": "Frechet distance of raw pixels in [0, 1], area-averaged to at most "
                         f"{metrics.PIXEL_FEATURE_DIMS} values per image (16 x 16 gray, 9 x 9 "
                         "RGB), samples vs the train split, graded by no network: a check on "
                         "the evaluator, which a reward fitted to the judge's features can steer",
            "kid_eval": "unbiased squared MMD, cubic polynomial kernel (KID's), evaluator "
                        "features, train split vs samples; mean and std over 10 subsets of "
                        "min(train, samples, 1000) rows",
            "precision_recall": f"Kynkaanniemi et al. 2019, k = {PR_NEIGHBOURS} neighbours, "
                                "evaluator features, equal-size sets: min(train, samples) "
                                "seeded rows of the train split and of the samples",
            "intervals": f"95% bias-shifted percentile bootstrap (percentiles moved by the "
                         "replicates' mean minus the full-set value), {BOOTSTRAP_REPLICATES} replicates, seed "
                         f"{cfg.seed}, for {', '.join(EVALUATE_INTERVALS)}: samples resampled "
                         "within each class, the reference set too (its class counts are fixed "
                         "by the stratified split); the base-vs-RL "
                         "delta's paired (one resample for both generators)",
            "at_real_count": f"FD, KID, precision/recall of n = {matched} samples: per class "
                             "min(samples, held-out real) of each set (mean over 5 seeded "
                             "draws when that is fewer than all samples), vs the train split; "
                             "the real column scores those held-out images, so the two "
                             "compare at one count and one class composition; precision/"
                             "recall's reference is n train images of the same class counts",
            "eval_accuracy": "evaluator top-1 equals the requested class",
            "is_eval": "Inception Score formula on evaluator class probabilities, 1 split",
            "diversity": "mean pairwise L2 distance of evaluator features within a class, "
                         "averaged over classes",
            "reward": f"{reward.definition()} (rl.rewards; a network in it is the judge, "
                      "never the evaluator), mean over each generated set",
        },
        "tokenizer": {"images": int(len(val_y)),
                      "eval_perturbation": params.tokenizer.eval_perturbation,
                      "perturbation_sigma": params.tokenizer.perturbation_sigma,
                      "pfd_judge": "FD-judge of val vs reconstructions from perturbed latents "
                                   "(fixed seed inside tasks.tokenizer.evaluate; kl noise is "
                                   "sigma x each latent dimension's std over the val latents)"},
        "fid": fid,
        "inputs": {name: {"path": str(inputs.dirs.get(name, cfg.inception_weights)),
                          "sha256": digest} for name, digest in digests.items()},
    }


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def read_csv_columns(path: Path) -> dict[str, np.ndarray] | None:
    """Numeric columns of a CSV with a header row (empty cells -> NaN); None if absent/empty."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else float("nan")
        except ValueError:
            return float("nan")

    return {col: np.array([number(r.get(col)) for r in rows]) for col in rows[0]}


@dataclass
class Report:
    """What report.md shows; `images` maps file name -> PNG bytes, `notes` explain gaps."""

    nested: dict[str, dict[str, float]]
    protocol: dict[str, Any]
    images: dict[str, bytes]
    notes: list[str]
    seeds: list[compare.SeedSet] = dataclasses.field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else "n/a"


def _arrow(better: str) -> str:
    return {"higher": " ↑", "lower": " ↓"}.get(better, "")


def tokenizer_table(values: Mapping[str, float]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in values.items():
        label, better = TOKENIZER_LABELS.get(key, (key.replace("_", " "), ""))
        lines.append(f"| {label}{_arrow(better)} | {_fmt(value)} |")
    return lines


def generators_table(base: Mapping[str, float], rl: Mapping[str, float],
                     real: Mapping[str, float], diff: Mapping[str, float] | None = None
                     ) -> list[str]:
    """base, RL, their difference, and held-out real images where the metric applies; 95%
    intervals (bootstrap; paired for the difference) where computed."""
    lines = ["| metric | base | RL | delta (RL - base) | held-out real (floor) |",
             "|---|---|---|---|---|"]
    for key, label, better in GENERATOR_ROWS:
        if key in base and key in rl:
            delta = (with_interval(diff, key, sign=True) if diff and key in diff
                     else f"{rl[key] - base[key]:+.4g}")
            floor = _fmt(real[key]) if key in real else ""
            lines.append(f"| {label}{_arrow(better)} | {with_interval(base, key)} | "
                         f"{with_interval(rl, key)} | {delta} | {floor} |")
    return lines


def protocol_table(p: Mapping[str, Any]) -> list[str]:
    s = p["samples"]
    fid = p["fid"]
    rows = [
        ("reference set", f"{p['reference_set']['images']} images of the prepared train "
                          "split (FD, KID, precision/recall reference)"),
        ("held-out real set", f"{p['real_set']['images']} images of the prepared val split, "
                              "scored like a generated set (the floor); the tokenizer is "
                              "measured on it too"),
        ("samples", f"{s['per_generator']} per generator, class-balanced: {s['per_class']} per "
                    f"class x {s['classes']} classes; labels and noise identical for base and RL"),
        ("sampler / steps", f"{p['sampler']}, {p['steps']} steps (NFE base {p['nfe']['base']}, "
                            f"RL {p['nfe']['rl']})"),
        ("CFG scale", f"base {p['cfg_scale']['base']:g}, RL {p['cfg_scale']['rl']:g} "
                      f"({p['cfg_source']})"),
        ("seed", f"{p['seed']} (sample i: noise from (seed, i), independent of batching)"),
        ("decoder", p["decoder"]["name"] + (f", sha256 {p['decoder']['sha256'][:12]}: "
                                            f"{p['decoder']['role']}"
                                            if "sha256" in p["decoder"] else "")),
        ("feature network (grades)", f"evaluator ({p['feature_network']['features']}, "
                                     f"width {p['feature_network']['width']}, "
                                     f"{p['feature_network']['input']}, sha256 "
                                     f"{p['feature_network']['sha256'][:12]}): every "
                                     "generated-sample metric"),
        ("reward network", f"judge (sha256 {p['reward_network']['sha256'][:12]}): the reward "
                           "and the tokenizer's FD-judge only"),
        ("precision / recall", p["metrics"]["precision_recall"]),
        ("diversity", p["metrics"]["diversity"]),
        ("reward", p["metrics"]["reward"]),
        ("pFD-judge", f"{p['tokenizer']['eval_perturbation']:g} of tokens perturbed "
                      f"(kl: sigma {p['tokenizer']['perturbation_sigma']:g} x each latent "
                      f"dimension's std)"),
        ("FID", f"{fid['network']}; weights sha256 {fid['weights_sha256'][:12]}; "
                f"{fid['preprocessing']}" if fid else
                "not computed: no evaluate.inception_weights (Frechet distances here use the "
                "evaluator or the judge and are named FD-eval or FD-judge)"),
    ]
    rows += [(f"input: {name}", f"`{v['path']}` sha256 {v['sha256'][:12]}")
             for name, v in p["inputs"].items()]
    return ["| item | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def render_report(report: Report, link_images: bool = True) -> str:
    """report.md; without `link_images` (the Prefect artifact) images are named, not linked."""
    n = report.nested
    p = report.protocol

    def image(name: str, alt: str) -> list[str]:
        if name not in report.images:
            return []
        return [f"![{alt}]({name})" if link_images else
                f"*{alt}: `{name}` in the MLflow run's report/ folder*", ""]

    cfg_note = []
    if p["cfg_scale"]["base"] != p["cfg_scale"]["rl"]:
        cfg_note = [f"Note: base and RL were sampled at different CFG scales "
                    f"({p['cfg_scale']['base']:g} vs {p['cfg_scale']['rl']:g}); set "
                    "evaluate.cfg_scale to compare them at one scale.", ""]
    lines = [
        "# LatentForge evaluation", "",
        f"Reference set: the **train** split ({p['reference_set']['images']} images); held-out "
        f"real set: the **{p['split']}** split ({p['real_set']['images']} images). "
        f"Generated sets: **{p['samples']['per_generator']}** samples per generator, "
        f"{p['samples']['per_class']} per class, **{p.get('kind', 'flow')}** generators, "
        f"sampler **{p['sampler']}**, "
        f"**{p['steps']}** steps, seed **{p['seed']}**. Generated samples are graded by the "
        f"**evaluator** network, never by the reward **judge**"
        + (" (FID: Inception-v3 from evaluate.inception_weights)." if p["fid"] else
           "; no Inception weights, so no FID."), "",
        "↑ higher is better, ↓ lower is better.", "",
        "## Tokenizer", "", *tokenizer_table(n["tokenizer"]), "",
        *image(RECON_PNG, "val originals (x) above their reconstructions (r)"),
        *image(PREFIX_PNG, "PSNR per prefix length"),
        "## Generators: base vs RL", "",
        *generators_table(n["base"], n["rl"], n["real"], n.get("diff")), "",
        f"[low, high]: 95% bootstrap intervals (percentiles shifted by the replicates' bias, "
        f"{BOOTSTRAP_REPLICATES} replicates resampling "
        f"the samples and the reference set, each within its classes (the split fixes the "
        f"reference's class counts); the delta's are paired, one "
        f"resample serving both generators). A delta whose interval holds 0 is no evidence "
        f"of a difference. RL here is the first of `rl.seeds`, and these intervals are over "
        f"samples, not over RL runs: the RL seeds section below has the spread across runs.",
        "",
        f"FD is biased upwards at small counts, so compare a generator's FD with the held-out "
        f"real images' only at one count: the rows *at the real set's count* "
        f"(n = {int(n['real']['n'])}: per class, the smaller of the samples' and the held-out "
        f"images' counts, so both sets have the same classes in the same numbers) do. KID is "
        f"unbiased: for two sets from one distribution it scatters around 0, so a value just "
        f"below 0 (the real set's often) means no measurable distance.", "",
        *cfg_note,
        *image(SAMPLES_PNG, "samples, one row per class: base (left) and RL (right), same seeds"),
        *sweep_section(n, p["cfg_sweep"]["scales"], p["cfg_sweep"]["per_class"],
                       p["samples"]["classes"]),
        *image(SWEEP_PNG, "evaluator accuracy and recall against gFD-eval across CFG scales"),
        *compare.seeds_section(n, report.seeds),
        *image(compare.SEEDS_PNG, "evaluator accuracy, gFD-eval and diversity: base, each RL "
                                  "seed, their mean and the base at its best CFG"),
        "## Training curves", "",
        *image(REWARD_PNG, "RL reward per update"),
        *image(LOSSES_PNG, "training losses"),
        *[f"- {note}" for note in report.notes], *([""] if report.notes else []),
        "## Protocol", "", *protocol_table(p), "",
        "The full protocol is in "
        + (f"[{PROTOCOL_JSON}]({PROTOCOL_JSON})" if link_images else f"`{PROTOCOL_JSON}`")
        + ". Sampling speed varies run "
        "to run, so it is logged to MLflow only, never here or in the DVC metrics.", "",
    ]
    return "\n".join(lines)


def build_pictures(inputs: Inputs, cfg: EvaluateConfig, labels: np.ndarray,
                   samples: Mapping[str, Samples], val_x: np.ndarray, recon: np.ndarray,
                   prefix: Sequence[tuple[int, float]], plots_dir: Path
                   ) -> tuple[dict[str, bytes], list[str]]:
    """All report PNGs, and notes for the ones whose source data is missing."""
    names = inputs.prepared.class_names
    per_row = min(cfg.per_class, 10)
    grids = {MODEL_TITLES[m]: class_grid(samples[m].images, labels, names, per_row=per_row)
             for m in MODELS}
    images = {SAMPLES_PNG: png_bytes(side_by_side(grids)),
              RECON_PNG: png_bytes(recon_grid(val_x, recon)),
              PREFIX_PNG: prefix_plot(prefix)}
    notes = []
    reward_csv = plots_dir / REWARD_CSV
    curve = read_csv_columns(reward_csv)
    if curve is not None and {"step", "reward_mean"} <= curve.keys():
        images[REWARD_PNG] = reward_plot(curve)
    else:
        notes.append(f"No RL reward curve: `{reward_csv}` is missing or lacks step,reward_mean.")
    losses = {}
    for stage in ("judge", "tokenizer", "generator", "rl"):
        loss_curve = read_csv_columns(inputs.dirs[stage] / TRAIN_CURVE)
        if loss_curve is not None and {"step", "loss"} <= loss_curve.keys():
            losses[stage] = loss_curve
        elif stage != "rl":  # the rl stage's curve is its reward, plotted above
            notes.append(f"No {stage} loss curve: `{inputs.dirs[stage] / TRAIN_CURVE}` is "
                         "missing.")
    if losses:
        images[LOSSES_PNG] = losses_plot(losses)
    return images, notes


def write_report(out_dir: Path, report: Report) -> str:
    """Write the report folder's files; returns report.md's sha256."""
    for name, data in report.images.items():
        storage.write_bytes_atomic(out_dir / name, data)
    storage.write_bytes_atomic(out_dir / PROTOCOL_JSON,
                               json.dumps(report.protocol, indent=2, sort_keys=True).encode())
    return storage.write_bytes_atomic(out_dir / REPORT_MD, render_report(report).encode())


def speed_section(samples: Mapping[str, Samples]) -> tuple[dict[str, float], str]:
    timings = {}
    lines = ["## Sampling speed (this run; MLflow only)", "",
             "| generator | images/s | seconds | NFE |", "|---|---|---|---|"]
    for m, s in samples.items():
        rate = len(s.images) / max(s.seconds, 1e-9)
        timings[f"{m}.sampling_images_per_s"] = rate
        timings[f"{m}.sampling_seconds"] = s.seconds
        lines.append(f"| {MODEL_TITLES.get(m, m)} | {rate:.1f} | {s.seconds:.2f} | {s.nfe} |")
    return timings, "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run(params: Params, report_dir: str | Path = paths.REPORT,
        prepared_dir: str | Path = paths.PREPARED, judge_dir: str | Path = paths.JUDGE,
        tokenizer_dir: str | Path = paths.TOKENIZER, generator_dir: str | Path = paths.GENERATOR,
        rl_dir: str | Path = paths.RL, plots_dir: str | Path = paths.PLOTS,
        tracker: Tracker | None = None, evaluator_dir: str | Path | None = None,
        decoder_dir: str | Path | None = None) -> StageResult:
    """Evaluate everything; `evaluator_dir` defaults to the folder `evaluator` beside
    `judge_dir` (where the judge stage puts it), `decoder_dir` (the posttrain stage's output,
    used where it post-trained a decoder) to the folder `decoder` beside `tokenizer_dir`."""
    cfg: EvaluateConfig = params.evaluate
    tracker = tracker or Tracker()
    preflight.check_inception_weights(cfg.inception_weights)  # as the run checked it
    evaluator_dir = Path(evaluator_dir) if evaluator_dir else Path(judge_dir).parent / "evaluator"
    inputs = load_inputs({"prepared": Path(prepared_dir), "judge": Path(judge_dir),
                          "evaluator": evaluator_dir,
                          "tokenizer": Path(tokenizer_dir), "generator": Path(generator_dir),
                          "rl": Path(rl_dir),
                          "decoder": Path(decoder_dir) if decoder_dir
                          else Path(tokenizer_dir).parent / "decoder"})
    val_x, val_y = (np.asarray(a) for a in inputs.prepared.split("val"))
    if len(val_x) < MIN_VAL_IMAGES:
        raise DataError(f"{prepared_dir}: the val split has {len(val_x)} images; evaluation "
                        f"needs at least {MIN_VAL_IMAGES} (raise prepare.val_fraction)")
    judge, evaluator = inputs.judge, inputs.evaluator
    train_x, train_y = (np.asarray(a) for a in inputs.prepared.split("train"))
    if len(train_x) < MIN_VAL_IMAGES:
        raise DataError(f"{prepared_dir}: the train split has {len(train_x)} images; the "
                        f"reference set needs at least {MIN_VAL_IMAGES}")
    ref_features, _ = evaluator.score(train_x)  # the reference set: train split
    pixel_ref = PixelReference(metrics.pixel_features(train_x), metrics.pixel_features(val_x))
    val_features, _ = evaluator.score(val_x)  # held-out real images: the floor

    # The prefix sweep follows the trained model's layout, not whatever params now say.
    tok_cfg = dataclasses.replace(params.tokenizer, layout=inputs.tokenizer.meta["model"]["layout"],
                                  nested_dropout=False)
    tok_metrics, recon, prefix = tokenizer_stage.evaluate(inputs.tokenizer, tok_cfg, val_x, val_y,
                                                          judge)

    # One label set and one noise seed for every generated set, so their numbers pair.
    labels = flow.balanced_labels(inputs.prepared.num_classes, cfg.per_class).numpy()
    reward = Reward(params.rl.rewards, judge, reference=(train_x, train_y))
    sampled_on: set[str] = set()
    samples = {m: sample_generator(inputs.generators[m], labels, cfg,
                                   cfg_scale_for(m, inputs.generators[m], params), params.compute,
                                   nodes=sampled_on)
               for m in MODELS}
    seeds = inputs.seeds
    for s in seeds[1:]:
        log.info("evaluate: RL seed %d at CFG %g", s.seed, samples["rl"].cfg_scale)
        samples[s.samples] = sample_generator(inputs.seed_generators[s.seed], labels, cfg,
                                              samples["rl"].cfg_scale, params.compute,
                                              nodes=sampled_on)
    nested: dict[str, dict[str, float]] = {}
    guided = None  # the base at its best CFG scale, at this evaluation's count
    if cfg.cfg_sweep:
        nested.update(cfg_sweep(inputs, cfg, evaluator, ref_features, train_y, params.compute,
                                sampled_on))
        scale = nested["best"]["base_cfg_scale"]
        guided = "base"
        if scale != samples["base"].cfg_scale:
            guided = "guided"
            log.info("evaluate: base at its best CFG scale %g for the guidance comparison",
                     scale)
            samples[guided] = sample_generator(inputs.generators["base"], labels, cfg, scale,
                                               params.compute, nodes=sampled_on)
    record_nodes(tracker, "sample", sampled_on)
    per_sample: dict[str, PerSample] = {}
    for name, sample_set in samples.items():
        nested[name], real, per_sample[name] = score_generator(sample_set, labels, evaluator,
                                                               ref_features, train_y,
                                                               val_features, val_y, reward,
                                                               pixel_ref)
    nested["real"] = real  # the same for every set: one count, one subset seed
    log.info("evaluate: %d bootstrap replicates for the 95%% intervals", BOOTSTRAP_REPLICATES)
    pairs = {s.diff: ("base", s.samples) for s in seeds}
    # The sample noise of a mean over seeds that all share this one draw.
    means = {"seeds": ("base", [s.samples for s in seeds])}
    if guided:
        pairs.update({f"{s.samples}_vs_guided": (guided, s.samples) for s in seeds})
        means["distil"] = (guided, [s.samples for s in seeds])
    intervals = bootstrap_intervals(ref_features, per_sample, labels, seed=cfg.seed, pairs=pairs,
                                    means=means, ref_labels=train_y, keys=EVALUATE_INTERVALS,
                                    ref_pixels=pixel_ref.features)
    for name in samples:
        nested[name].update(intervals[name])
    for pair, (first, second) in pairs.items():
        nested[pair] = {**{key: nested[second][key] - nested[first][key]
                           for key in EVALUATE_INTERVALS}, **intervals[pair]}
    nested["seeds"] = compare.seeds_summary(nested, seeds, intervals["seeds"])
    if guided:
        nested["distil"] = compare.distil_summary(nested, seeds, guided,
                                                  samples[guided].cfg_scale,
                                                  samples["rl"].cfg_scale, intervals["distil"],
                                                  base_scale=samples["base"].cfg_scale)
    nested["tokenizer"] = dict(tok_metrics)
    fid_sha = None
    if cfg.inception_weights:
        device = driver_device(params.compute, "the Inception features")
        fid, fid_sha = fid_metrics(cfg.inception_weights, val_x, recon, samples, device)
        for group, values in fid.items():
            nested[group].update(values)
    digests = input_digests(inputs, fid_sha)
    log_inputs(tracker, inputs, digests, cfg.inception_weights)
    nested["protocol"] = {"samples_per_generator": len(labels), "val_images": len(val_x),
                          "sample_steps": cfg.sample_steps, "seed": cfg.seed}

    protocol = build_protocol(params, inputs, val_y, labels, samples, reward, digests)
    images, notes = build_pictures(inputs, cfg, labels, samples, val_x, recon, prefix,
                                   Path(plots_dir))
    if "best" in nested:
        images[SWEEP_PNG] = sweep_plot(nested, cfg.cfg_sweep)
    images[compare.SEEDS_PNG] = compare.seeds_plot(nested, seeds, samples["base"].cfg_scale)
    report = Report(nested, protocol, images, notes, seeds)
    with storage.atomic_dir(report_dir) as tmp:
        report_sha = write_report(tmp, report)
    tracker.log_artifact(Path(report_dir), "report")

    result_metrics = flatten_metrics(nested)
    timings, speed = speed_section(samples)
    b, r = nested["base"], nested["rl"]
    log.info("evaluate: evaluator accuracy base %.4f -> RL %.4f, gFD-eval %.3f -> %.3f, mean reward "
             "%.3f -> %.3f (%d samples each); report in %s", b["eval_accuracy"],
             r["eval_accuracy"], b["gfd_eval"], r["gfd_eval"], b["reward_mean"],
             r["reward_mean"], len(labels), report_dir)
    return StageResult(metrics=result_metrics,
                       summary=render_report(report, link_images=False) + "\n" + speed + "\n",
                       digests={"report": report_sha}, timings=timings)


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
