"""The typed parameter schema: params.yaml -> validated dataclasses.

Every entry point (CLI, the DVC stage command, Prefect deployment parameters) goes through
`load_params`, so an unknown key, a wrong type or an out-of-range value is reported the same
way everywhere: the full key path, the value and what is allowed, and exit code 2.

All of it happens before any stage runs, so nothing is found out hours into a pipeline:
nan and +-inf are rejected in every numeric key; every size-like key has an upper bound (the
MAX_* constants below); combinations that no stage can run (a patch size that does not divide
the resolution, a batch that does not split over the workers, an empty reward table, ...) are
checked in `__post_init__`; and a params file must be UTF-8 text without duplicate keys.

Each field is declared with `param(default, doc, ...)`; the doc string is what
`latentforge params --explain` prints and what the Prefect UI shows next to a parameter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentforge.errors import ConfigError

DEFAULT_PARAMS_FILE = "params.yaml"

# Upper bounds of the size-like keys. They are not advice: each is far above any sensible
# value and only says "this cannot fit one machine (or cluster)", so that an extra zero fails
# here, naming the key, instead of as an out-of-memory error or a hang inside a stage.
MAX_SIDE = 1024  # pixels: image side, patch side, shift
MAX_STEPS = 10_000_000  # updates, warm-up and the every-N-steps intervals
MAX_BATCH = 65_536  # images (or rollouts) processed together
MAX_IMAGES = 1_000_000_000  # images in a data set
MAX_SHAPES = 10_000_000  # shapes drawn in memory: 29 GiB at 32x32x3, 1.5 h on one core
MAX_SHARD = 1_048_576  # images in one shard file
MAX_PER_CLASS = 100_000  # generated samples per class
MAX_SAMPLE_STEPS = 10_000  # ODE / SDE steps of one sample
MAX_WIDTH = 8192  # channels, feature and token dimensions
MAX_TOKENS = 65_536  # patches per image (a 256 x 256 grid), and latent tokens K
MAX_CODEBOOK = 65_536  # vq entries: code perturbation (pFD) builds a V x V matrix, 16 GiB here
MAX_FSQ_VOCAB = 2**24  # prod(fsq_levels): code-usage statistics keep one counter per code
# DVC's remote kinds by URL scheme, and the plugin each needs (pip install dvc-gs, ...);
# latentforge/preflight.py checks that the one a run pushes to is installed.
DVC_REMOTE_PLUGINS = {"s3": "dvc_s3", "gs": "dvc_gs", "azure": "dvc_azure", "ssh": "dvc_ssh",
                      "http": "dvc_http", "https": "dvc_http", "webdav": "dvc_webdav",
                      "webdavs": "dvc_webdav", "hdfs": "dvc_hdfs", "webhdfs": "dvc_webhdfs",
                      "oss": "dvc_oss", "gdrive": "dvc_gdrive"}
MAX_TOKEN_VOCAB = 65536  # models/token_generator.py's MAX_VOCAB: maskgit/ar output classes
MAX_BINARY_BITS = 30  # binary token_dim: codes are 2^token_dim bit patterns, cached as int32
BINARY_ENTROPY_WEIGHT = 0.1  # tokenizer.entropy_weight null with quantizer binary (LFQ collapses without)
MAX_EPOCHS = 1000  # passes over one batch of rollouts
MAX_KEEP = 1000  # checkpoints kept on disk
MAX_WORKERS = 4096  # Ray workers / actors
MAX_CPUS_PER_WORKER = 1024
MAX_CFG_SWEEP = 12  # evaluate.cfg_sweep scales: each samples base and RL once more
MAX_RL_SEEDS = 16  # rl.seeds: each is a whole fine-tuning and an evaluation
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy take 64-bit seeds
MIN_JUDGE_SIDE = 8  # the judge's three stride-2 conv blocks (models/judge.py)

# A user reward `package.module:function` (latentforge/rewards.py imports it when the stage runs).
_REWARD_FUNCTION = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def param(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """Declare a parameter with its default, a one-line doc and an optional numeric range."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections. A stage's section carries the stage's name; DVC tracks each section per stage.
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PrepareConfig:
    """Data preparation: read the source, resize, split train/val, write shards."""

    source: Literal["digits", "shapes", "idx", "folder", "npz"] = param(
        "digits", "digits: scikit-learn's embedded 8x8 digits; shapes: embedded RGB, 8 classes "
        "of coloured shapes on textured backgrounds drawn at 32x32 from `seed` "
        "(presets/shapes.yaml); idx: MNIST IDX files in `path`; folder: one sub-folder of "
        "images per class; npz: `images` and `labels` arrays")
    path: str = param(
        "data/source", "local path or s3:// URL of the source; for idx a folder holding "
        "*-images-idx3-ubyte[.gz] with matching *-labels-idx1-ubyte[.gz]; digits and shapes do "
        "not read it, but it is the prepare stage's DVC input: keep data/source")
    # ge: one image per class of latentforge/sources.py's SHAPE_CLASSES (a test checks).
    shapes_images: int = param(
        8000, "images the shapes source draws, spread evenly over its 8 classes (ignored by "
        "other sources); with channels 1 they are converted to gray by luma", ge=8,
        le=MAX_SHAPES)
    resolution: int = param(16, "square output side in pixels (resize + centre crop)", ge=4,
                            le=MAX_SIDE)
    channels: Literal[1, 3] = param(1, "1 = grayscale, 3 = RGB")
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = param(
        "bicubic", "PIL filter used to resize the shorter side to `resolution`")
    val_fraction: float = param(0.1, "fraction of images held out for validation (every later "
                                "stage measures on it; the prepare stage fails where either "
                                "split gets fewer than 4 images)", gt=0.0, lt=1.0)
    split: Literal["random", "given"] = param(
        "random", "random: pool every image and split by `val_fraction` and `seed`; given: keep "
        "the source's own split (a folder's train/ and val/ folders, test/ where there is no "
        "val/; IDX train and t10k files), `val_fraction` unused")
    seed: int = param(0, "seed of the deterministic train/val split and of the shapes source",
                      ge=0, le=MAX_SEED)
    max_images: int | None = param(None, "keep at most this many images, a seeded random subset of "
                                   "all classes together, not per class (null = all)", ge=1,
                                   le=MAX_IMAGES)
    on_bad_image: Literal["skip", "fail"] = param(
        "skip", "skip: leave out undecodable images and list them in the report; fail: stop")
    shard_size: int = param(8192, "images per shard file (few large shards hash fast in DVC)",
                            ge=1, le=MAX_SHARD)

    def __post_init__(self) -> None:
        if not self.path.strip():
            raise ValueError(f"path = {self.path!r} is empty: expected a local path or s3:// URL "
                             "of the source (data/source, the default, for digits and shapes)")
        if self.split == "given" and self.source not in ("folder", "idx"):
            raise ValueError(f"split = 'given' keeps a source's own train/val split, but source "
                             f"= {self.source!r} has none (folder and idx sources can): use "
                             f"split: random")


@dataclass(kw_only=True)
class TrainConfig:
    """Fields every training stage (judge, tokenizer, generator) shares; stages subclass it."""

    steps: int = param(1000, "optimizer steps", ge=1, le=MAX_STEPS)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1,
                            le=MAX_BATCH)
    lr: float = param(1e-3, "peak learning rate (AdamW)", gt=0.0)
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of lr (cosine)", ge=0.0, le=1.0)
    warmup_steps: int = param(50, "linear warm-up steps", ge=0, le=MAX_STEPS)
    weight_decay: float = param(0.01, "AdamW weight decay", ge=0.0)
    grad_clip: float = param(1.0, "max global gradient norm; 0 disables clipping", ge=0.0)
    ema_decay: float = param(0.999, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    bf16: bool = param(False, "bf16 autocast for forward/backward; false: compute.precision "
                       "decides")
    seed: int = param(0, "seed for initialisation and data order", ge=0, le=MAX_SEED)
    save_every: int = param(200, "checkpoint every N steps", ge=1, le=MAX_STEPS)
    keep_last: int = param(2, "checkpoints to keep", ge=1, le=MAX_KEEP)
    log_every: int = param(25, "log metrics every N steps", ge=1, le=MAX_STEPS)


@dataclass(kw_only=True)
class JudgeConfig(TrainConfig):
    """The small classifier whose features and log-probs score every later stage."""

    # The last of the three conv blocks has 4 x width channels.
    width: int = param(32, "channels of the first conv block (doubles per block)", ge=4,
                       le=MAX_WIDTH // 4)
    feature_dim: int = param(128, "penultimate feature size of judge and evaluator (FD, "
                             "precision/recall)", ge=8,
                             le=MAX_WIDTH)
    dropout: float = param(0.1, "dropout before the classifier head", ge=0.0, lt=1.0)
    augment_shift: int = param(1, "random translation in pixels during training", ge=0,
                               le=MAX_SIDE)
    steps: int = param(300, "optimizer steps", ge=1, le=MAX_STEPS)
    batch_size: int = param(128, "global batch size, split evenly across workers", ge=1,
                            le=MAX_BATCH)
    lr: float = param(2e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(20, "linear warm-up steps", ge=0, le=MAX_STEPS)
    ema_decay: float = param(0.99, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    evaluator_seed: int = param(
        1, "seed of the evaluator, a second classifier the stage trains on the same data: it "
        "computes every generated-sample metric (gFD, accuracy, precision/recall, IS, "
        "diversity), so that RL against the judge's reward is graded by another network", ge=0,
        le=MAX_SEED)
    evaluator_width: int = param(48, "the evaluator's first-block channels (an architecture "
                                 "variant of the judge)", ge=4, le=MAX_WIDTH // 4)

    def __post_init__(self) -> None:
        if self.evaluator_seed == self.seed and self.evaluator_width == self.width:
            raise ValueError(f"evaluator_seed = {self.evaluator_seed} and evaluator_width = "
                             f"{self.evaluator_width} equal the judge's seed and width: the "
                             f"evaluator would be a copy of the reward judge; change either")


@dataclass(kw_only=True)
class TokenizerConfig(TrainConfig):
    """TiTok-style 1D tokenizer (or the 2D patch baseline) with a kl / fsq / vq / binary
    bottleneck."""

    size: Literal["tiny", "small", "base", "large"] = param(
        "tiny", "model size from the registry in models/tokenizer.py (width/depth/heads)")
    layout: Literal["1d", "2d"] = param("1d", "1d: K learnable latent tokens (TiTok); 2d: one "
                                        "latent per patch (baseline)")
    patch_size: int = param(4, "ViT patch size in pixels", ge=1, le=MAX_SIDE)
    num_tokens: int = param(16, "K, latent tokens for layout 1d (2d uses one per patch)", ge=1,
                            le=MAX_TOKENS)
    token_dim: int = param(8, "D, dimension of each latent token (fsq: len(fsq_levels); binary: "
                           f"bits per token, at most {MAX_BINARY_BITS})", ge=1, le=MAX_WIDTH)
    quantizer: Literal["kl", "fsq", "vq", "binary"] = param(
        "kl", "kl: continuous Gaussian; fsq: finite scalar levels; vq: L2-normalised codebook; "
        "binary: the sign of each dimension is a bit (LFQ), 2^token_dim codes")
    kl_weight: float = param(1e-4, "KL weight (kl)", ge=0.0)
    fsq_levels: list[int] = param([8, 5, 5, 5], "levels per dimension (fsq)", ge=2,
                                  le=MAX_CODEBOOK)
    codebook_size: int = param(1024, "codebook entries (vq)", ge=2, le=MAX_CODEBOOK)
    commitment: float = param(0.25, "commitment loss weight (vq)", ge=0.0)
    entropy_weight: float | None = param(
        None, "entropy loss weight (vq and binary); >0 fights codebook collapse. null: the "
        "quantizer's default, 0.1 for binary (without it one of three runs of "
        "bench/binary_vs_fsq.py collapsed to 1.5% of the codes) and 0 for vq", ge=0.0)
    loss: Literal["l2", "l1"] = param("l2", "pixel reconstruction loss")
    nested_dropout: bool = param(False, "FlexTok: train on random token prefixes (1d only)")
    nested_dropout_lengths: Literal["uniform", "pow2"] = param(
        "uniform", "prefix lengths of nested_dropout: uniform: any of 1 .. K; pow2: the powers of "
        "two <= K and K itself, each as likely (FlexTok: 1, 2, 4, ..., 256 of 256 registers)")
    register_causal: bool = param(
        False, "FlexTok: causal attention among the latent tokens in the 1d encoder (latent token "
        "i sees every patch and latent tokens <= i; patches see only patches), so a token cannot "
        "carry what later tokens encode; false: full attention (TiTok)")
    latent_perturbation: float = param(
        0.0, "RobustTok's alpha: fraction of the tokens of each perturbed image moved to nearby "
        "codes (kl: noised) during training; the rate at the first step when "
        "perturbation_anneal is not none", ge=0.0, le=1.0)
    perturbation_images: float = param(
        1.0, "RobustTok's beta: proportion of the images of each batch whose latents are "
        "perturbed (round(beta x batch), at least one), the others decode clean. 1.0 keeps "
        "latent_perturbation a fraction of all tokens; the paper's recipe is beta 0.1 with "
        "alpha (latent_perturbation) 1.0 annealed to 0.5", ge=0.0, le=1.0)
    perturbation_anneal: Literal["none", "linear", "cosine"] = param(
        "none", "schedule of the perturbation rate over training: none: latent_perturbation "
        "throughout; linear / cosine: from latent_perturbation at the first step to "
        "perturbation_final at the last. RobustTok anneals down: its released config holds alpha "
        "1.0 for the first 20% of training, then lowers it linearly to 0.5 by 60%")
    perturbation_final: float = param(
        0.0, "the perturbation rate at the last step when perturbation_anneal is linear or "
        "cosine", ge=0.0, le=1.0)
    perturbation_sigma: float = param(
        0.5, "noise scale of kl latent perturbation, in units of each latent dimension's std "
        "(over the batch in training, over the val latents for pFD), so pFD compares across "
        "tokenizers whose latents differ in spread", ge=0.0)
    eval_perturbation: float = param(0.1, "fraction of tokens perturbed for the pFD metric "
                                     "(every val image; kl: sigma x each dimension's std over "
                                     "the val latents)", ge=0.0, le=1.0)
    steps: int = param(1500, "optimizer steps", ge=1, le=MAX_STEPS)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1,
                            le=MAX_BATCH)
    lr: float = param(3e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(50, "linear warm-up steps", ge=0, le=MAX_STEPS)
    ema_decay: float = param(0.995, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    save_every: int = param(500, "checkpoint every N steps", ge=1, le=MAX_STEPS)
    log_every: int = param(100, "log metrics every N steps", ge=1, le=MAX_STEPS)

    @property
    def entropy_weight_value(self) -> float:
        """`entropy_weight`, with null resolved to the quantizer's default."""
        if self.entropy_weight is not None:
            return self.entropy_weight
        return BINARY_ENTROPY_WEIGHT if self.quantizer == "binary" else 0.0

    def __post_init__(self) -> None:
        if self.quantizer == "fsq" and self.token_dim != len(self.fsq_levels):
            raise ValueError(f"quantizer fsq needs token_dim == len(fsq_levels): token_dim is "
                             f"{self.token_dim}, fsq_levels has {len(self.fsq_levels)} levels")
        if self.quantizer == "fsq" and math.prod(self.fsq_levels) > MAX_FSQ_VOCAB:
            raise ValueError(f"fsq_levels = {self.fsq_levels} make {math.prod(self.fsq_levels)} "
                             f"codes, more than {MAX_FSQ_VOCAB}: code-usage statistics keep one "
                             f"counter per code every step")
        if self.quantizer == "binary" and self.token_dim > MAX_BINARY_BITS:
            raise ValueError(f"quantizer binary needs token_dim <= {MAX_BINARY_BITS}: token_dim is "
                             f"{self.token_dim}, and its 2^token_dim codes are stored as int32 in "
                             f"the cache")
        if self.nested_dropout and self.layout != "1d":
            raise ValueError("nested_dropout needs layout 1d (2d tokens have no order)")
        if self.register_causal and self.layout != "1d":
            raise ValueError(f"register_causal = true needs layout 1d (the causal mask orders "
                             f"the K latent tokens of the 1d encoder), got layout {self.layout}")


@dataclass(kw_only=True)
class CacheConfig:
    """Latent caching: encode the prepared splits once with the tokenizer's EMA weights."""

    batch_size: int = param(256, "images per encoder batch (per Ray Data actor)", ge=1,
                            le=MAX_BATCH)
    shard_size: int = param(4096, "images per cache shard; shards commit one by one", ge=1,
                            le=MAX_SHARD)
    hflip: bool = param(False, "also store a horizontally flipped view, which the generator "
                        "trains on beside the image (off for digits, where flipping changes "
                        "meaning)")
    verify_samples: int = param(16, "images whose cached latents are decoded and compared with "
                                "freshly encoded ones", ge=0, le=MAX_BATCH)


@dataclass(kw_only=True)
class GeneratorConfig(TrainConfig):
    """Class-conditional generator over the K latent tokens with CFG: flow matching on the
    latents, or MaskGIT / autoregressive over a discrete tokenizer's codes."""

    kind: Literal["flow", "maskgit", "ar"] = param(
        "flow", "flow: flow-matching transformer on the latents (any quantizer); maskgit: "
        "bidirectional transformer that unmasks codes by confidence (fsq, vq, binary); ar: "
        "causal transformer over the codes in token order (fsq, vq, binary)")
    size: Literal["tiny", "small", "base", "large"] = param(
        "tiny", "model size from the registry in models/generator.py (flow) or "
        "models/token_generator.py (maskgit, ar); the same shapes")
    class_dropout: float = param(0.1, "probability of dropping the class label (for CFG)",
                                 ge=0.0, lt=1.0)
    time_sampling: Literal["uniform", "logit_normal"] = param(
        "logit_normal", "distribution of training times t")
    sampler: Literal["euler", "heun"] = param("heun", "ODE sampler")
    sample_steps: int = param(25, "ODE steps when sampling", ge=1, le=MAX_SAMPLE_STEPS)
    cfg_scale: float = param(1.5, "classifier-free guidance scale (1 = no guidance); maskgit "
                             "and ar mix logits", ge=0.0)
    maskgit_steps: int = param(8, "maskgit decode steps (codes unmasked by confidence on a cosine "
                               "schedule; at most K)", ge=1, le=MAX_TOKENS)
    temperature: float = param(0.8, "maskgit and ar: codes are drawn from softmax(logits / "
                               "temperature); 0.8 gave both a higher evaluator accuracy and a "
                               "lower gFD-eval than 1 on the default digits", gt=0.0)
    choice_temperature: float = param(
        4.5, "maskgit: Gumbel noise on the confidences that pick which codes to keep, annealed "
        "linearly to 0 over the steps (MaskGIT's choice temperature)", ge=0.0)
    top_k: int = param(0, "ar: draw only among the k most likely codes (0 = all)", ge=0,
                       le=MAX_CODEBOOK)
    top_p: float = param(1.0, "ar: draw only within the smallest set of codes holding this "
                         "probability mass (1 = all)", gt=0.0, le=1.0)
    label_smoothing: float = param(0.1, "maskgit and ar: label smoothing of the cross-entropy",
                                   ge=0.0, lt=1.0)
    dropout: float = param(0.1, "maskgit and ar: dropout on attention and MLP outputs (MaskGIT "
                           "trains with 0.1; small data sets overfit without it)", ge=0.0, lt=1.0)
    eval_every: int = param(0, "evaluate on a small sample every N steps (0 = only at the end)",
                            ge=0, le=MAX_STEPS)
    eval_per_class: int = param(8, "samples per class for the periodic evaluation", ge=1,
                                le=MAX_PER_CLASS)
    final_per_class: int = param(50, "samples per class for the final metrics", ge=1,
                                 le=MAX_PER_CLASS)
    sample_seed: int = param(0, "seed of evaluation samples (independent of worker count)", ge=0,
                             le=MAX_SEED)
    steps: int = param(3000, "optimizer steps", ge=1, le=MAX_STEPS)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1,
                            le=MAX_BATCH)
    lr: float = param(2e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(100, "linear warm-up steps", ge=0, le=MAX_STEPS)
    ema_decay: float = param(0.995, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    save_every: int = param(500, "checkpoint every N steps", ge=1, le=MAX_STEPS)
    log_every: int = param(100, "log metrics every N steps", ge=1, le=MAX_STEPS)


@dataclass(kw_only=True)
class PostTrainConfig(TrainConfig):
    """Decoder post-training ("Image Tokenizer Needs Post-Training"): fine-tune only the
    tokenizer's decoder to map latents the generator produces back to the real images they
    came from, so that decoded samples improve without retraining the generator."""

    enabled: bool = param(False, "train a post-trained decoder (artifacts/decoder) that rl, "
                          "evaluate and `latentforge sample` decode with; false: the stage "
                          "writes a marker and everything decodes with the tokenizer's own")
    generated_fraction: float = param(
        0.5, "share of each batch decoded from generator-made latents of its images (the rest "
        "from the images' own latents, some perturbed), each the image it was made from as target",
        ge=0.0, le=1.0)
    perturbed_fraction: float = param(
        0.25, "share of each batch decoded from the images' latents with a `perturbation` "
        "fraction of the tokens moved to nearby codes (kl: noised), as the tokenizer's "
        "RobustTok training does", ge=0.0, le=1.0)
    perturbation: float = param(0.1, "fraction of the tokens moved in a perturbed latent", ge=0.0,
                                le=1.0)
    strength_min: float = param(
        0.2, "how far a generator-made latent departs from the image's own, lower bound: flow: "
        "the latent is noised back to time 1 - strength and regenerated from there (0: the "
        "image's latent, 1: a fresh sample); maskgit: that fraction of the codes is masked and "
        "predicted; ar: that fraction of the codes is replaced by the model's teacher-forced "
        "draws", ge=0.0, le=1.0)
    strength_max: float = param(0.6, "upper bound of the strength, drawn uniformly per latent",
                                ge=0.0, le=1.0)
    copies: int = param(2, "generator-made latents per training image (drawn once, before "
                        "training)", ge=1, le=1000)
    sample_steps: int = param(10, "flow: Euler steps over the regenerated part of the path", ge=1,
                              le=MAX_SAMPLE_STEPS)
    cfg_scale: float = param(1.0, "guidance while making the latents (1 = the class-conditional "
                             "model alone)", ge=0.0)
    eval_per_class: int = param(50, "generated samples per class decoded by both decoders for "
                                "the before/after comparison", ge=1, le=MAX_PER_CLASS)
    eval_seed: int = param(0, "seed of those samples and of their bootstrap", ge=0, le=MAX_SEED)
    steps: int = param(400, "optimizer steps", ge=1, le=MAX_STEPS)
    lr: float = param(2e-4, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(20, "linear warm-up steps", ge=0, le=MAX_STEPS)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0.0)
    ema_decay: float = param(0.99, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    save_every: int = param(200, "checkpoint every N steps", ge=1, le=MAX_STEPS)
    log_every: int = param(50, "log metrics every N steps", ge=1, le=MAX_STEPS)

    def __post_init__(self) -> None:
        if self.strength_min > self.strength_max:
            raise ValueError(f"strength_min = {self.strength_min} is above "
                             f"strength_max = {self.strength_max}")
        if self.generated_fraction + self.perturbed_fraction > 1.0:
            raise ValueError(f"generated_fraction + perturbed_fraction = "
                             f"{self.generated_fraction + self.perturbed_fraction:g} is above 1: "
                             "they are shares of one batch")


@dataclass(kw_only=True)
class RLConfig:
    """Flow-GRPO fine-tuning of the generator against a reward, with a KL leash."""

    steps: int = param(120, "policy updates (each on a fresh batch of rollouts)", ge=1,
                       le=MAX_STEPS)
    classes_per_step: int = param(4, "class labels sampled per update", ge=1, le=MAX_BATCH)
    group_size: int = param(8, "samples per class label; advantages are relative to the group",
                            ge=2, le=MAX_BATCH)
    train_steps: int = param(10, "SDE steps per rollout (evaluation keeps the ODE sampler)", ge=2,
                             le=MAX_SAMPLE_STEPS)
    noise_level: float = param(0.7, "a, the SDE noise level", gt=0.0)
    timestep_fraction: float = param(0.6, "fraction of the SDE steps trained per rollout",
                                     gt=0.0, le=1.0)
    inner_epochs: int = param(1, "optimisation passes over each batch of rollouts", ge=1,
                              le=MAX_EPOCHS)
    timestep_choice: Literal["random", "first"] = param(
        "random", "which SDE steps of each rollout are trained: random: a fresh random "
        "subset of timestep_fraction of them per pass; first: the first (noisiest) "
        "timestep_fraction of them, as Flow-GRPO's reference code trains")
    minibatches: int = param(
        4, "optimizer steps per pass: the batch's trajectories are split into this many "
        "minibatches, so that after the first step the policy differs from the rollouts' and "
        "the PPO clip can act (1 pass x 1 minibatch is REINFORCE with a group baseline)", ge=1,
        le=MAX_BATCH)
    advantage: Literal["group", "global", "none"] = param(
        "none", "what divides a reward's difference from its group's mean: none: nothing, so "
        "kl_beta weighs the KL against the reward in the reward's own units (on the default "
        "digits the best gFD-eval of the settings tried); global: the std of the whole batch's "
        "rewards (Flow-GRPO's reference configs: the balance then moves with the batch's "
        "spread); group: the group's own std (tiny spreads become full-size steps)")
    adv_std_floor: float = param(
        1e-4, "the std that divides advantages is at least this (a batch of near-equal "
        "rewards then gives a near-zero step, not a full-size one)", gt=0.0)
    clip_range: float = param(
        1e-3, "PPO clip range of the new/old probability ratio per latent dimension (Flow-GRPO's "
        "units: exp of the mean log-ratio over the K x D dimensions; the paper's 1e-4 is for "
        "65536 dimensions)", gt=0.0)
    adv_clip: float = param(5.0, "advantages are clipped to +-adv_clip", gt=0.0)
    kl_beta: float = param(
        2.0, "weight of the KL to the frozen reference generator, in Flow-GRPO's units (mean "
        "over dimensions of |mean - mean_ref|^2 / (2 sigma_t^2); the paper uses 0.01-0.04 with "
        "std-normalised advantages)",
        ge=0.0)
    token_clip_range: float = param(
        0.2, "maskgit and ar generators (GRPO over tokens): PPO clip range of each code's "
        "new/old probability ratio (the flow's clip_range is per latent dimension)", gt=0.0)
    token_kl_beta: float = param(
        0.05, "maskgit and ar generators: weight of the exact KL between the policy's and the "
        "frozen reference's code distributions from the same states, mean over codes",
        ge=0.0)
    cfg_scale: float = param(
        1.0, "CFG scale during rollouts and evaluation samples; the guided velocity is the "
        "policy (rollouts, rescored steps and the KL all use it, as Flow-GRPO trains with CFG)",
        ge=0.0)
    rewards: dict[str, float] = param(
        {"judge_prob": 1.0}, "reward name -> weight (several: their "
        "weighted sum): judge_logprob, judge_prob (bounded, "
        "p(y|x)), judge_margin, judge_density (how typical the image's judge features are of "
        "its class's real train images: a class Gaussian's log-density per feature), "
        "jpeg_compressibility / jpeg_incompressibility (DDPO's, no network involved), or a user "
        "reward module:function taking (uint8 images, labels) and returning one float per image. "
        "A user reward is YOUR CODE, imported and run by the rl stage: name only modules you "
        "trust; a module beside params.yaml is importable, others must be installed")
    lr: float = param(3e-4, "learning rate (AdamW)", gt=0.0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0.0)
    grad_clip: float = param(1.0, "max global gradient norm; 0 disables", ge=0.0)
    ema_decay: float = param(0.9, "EMA of the fine-tuned weights; 0 disables", ge=0.0, lt=1.0)
    eval_every: int = param(40, "gFD-eval on a fixed sample every N updates (reward hacking "
                            "watch); 0 = only at the end", ge=0, le=MAX_STEPS)
    eval_per_class: int = param(50, "samples per class for the periodic evaluation", ge=1,
                                le=MAX_PER_CLASS)
    save_every: int = param(10, "checkpoint every N updates", ge=1, le=MAX_STEPS)
    seeds: list[int] = param(
        [0, 1, 2], "RL seeds (labels and rollouts): one fine-tuning per seed from the same base, "
        "so the evaluation can say whether an effect outlives the seed; the first is the RL "
        "model that is registered, sampled and swept, the others sit in the rl folder's "
        "seeds/ and are graded beside it. Each seed has its own checkpoints: adding or "
        "reordering seeds trains only the new ones",
        ge=0, le=MAX_SEED)

    def __post_init__(self) -> None:
        from latentforge.rewards import BUILTIN  # lazily: it imports numpy

        if not self.seeds:
            raise ValueError("seeds is empty: name at least one RL seed, e.g. [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds = {self.seeds} repeats a seed (each one is a separate "
                             "fine-tuning)")
        if len(self.seeds) > MAX_RL_SEEDS:
            raise ValueError(f"seeds has {len(self.seeds)} entries; at most {MAX_RL_SEEDS} "
                             "(each is a whole fine-tuning)")

        if not self.rewards:
            raise ValueError("rewards is empty: name at least one reward, e.g. "
                             "{judge_logprob: 1.0}")
        if not any(self.rewards.values()):
            raise ValueError(f"rewards = {self.rewards!r}: every weight is 0, so every rollout "
                             f"scores 0 and there is nothing to learn")
        for name in self.rewards:
            # User rewards are imported by the stage; here only their form is checked, since
            # importing user code while reading parameters could have side effects.
            if name not in BUILTIN and not _REWARD_FUNCTION.fullmatch(name):
                raise ValueError(f"rewards: unknown reward '{name}'; built-ins: "
                                 f"{', '.join(BUILTIN)}, or a user reward as module:function")
        rollouts = self.classes_per_step * self.group_size
        if self.minibatches > rollouts:
            raise ValueError(f"minibatches = {self.minibatches} is more than the {rollouts} "
                             f"rollouts per update (classes_per_step x group_size)")
        if rollouts > MAX_BATCH:
            raise ValueError(f"classes_per_step x group_size = {self.classes_per_step} x "
                             f"{self.group_size} = {rollouts} rollouts per update, more than "
                             f"{MAX_BATCH}: they are sampled as one batch")


@dataclass(kw_only=True)
class EvaluateConfig:
    """The final, protocol-recorded evaluation of everything the pipeline produced."""

    per_class: int = param(100, "generated samples per class (class-balanced)", ge=2,
                           le=MAX_PER_CLASS)
    sample_steps: int = param(25, "ODE steps for evaluation samples", ge=1, le=MAX_SAMPLE_STEPS)
    sampler: Literal["euler", "heun"] = param("heun", "ODE sampler")
    cfg_scale: float | None = param(1.0, "CFG scale for base and RL alike (1.0 = the scale RL "
                                    "trains at); null = each model's own", ge=0.0)
    seed: int = param(1000, "seed of evaluation samples", ge=0, le=MAX_SEED)
    cfg_sweep: list[float] = param(
        [1.0, 1.25, 1.5, 2.0, 3.0], "CFG scales at which base and RL are both sampled and "
        "graded (evaluator accuracy, recall against gFD-eval), so each is compared at its best "
        "operating point (lowest gFD-eval); [] skips the sweep", ge=0.0)
    cfg_sweep_per_class: int = param(50, "samples per class at each sweep scale (one count for "
                                     "every point, so their FDs compare)", ge=2,
                                     le=MAX_PER_CLASS)
    inception_weights: str | None = param(
        None, "local Inception-v3 FID weights (pytorch-fid format) for FID/rFID/gFID; null = "
        "FD-judge only. Never downloaded")

    def __post_init__(self) -> None:
        if len({f"{c:g}" for c in self.cfg_sweep}) != len(self.cfg_sweep):
            raise ValueError(f"cfg_sweep = {self.cfg_sweep} repeats a scale (to 6 significant "
                             "digits, as the metrics name them)")
        if len(self.cfg_sweep) > MAX_CFG_SWEEP:
            raise ValueError(f"cfg_sweep has {len(self.cfg_sweep)} scales; at most "
                             f"{MAX_CFG_SWEEP} (each samples both generators)")


@dataclass(kw_only=True)
class ComputeConfig:
    """Where the work runs: a local Ray instance or a cluster, workers, GPUs."""

    ray_address: str | None = param(
        None, "null: a local Ray instance; else the cluster's GCS address, HEAD:6379 (or auto "
        "on a cluster node); the driver runs on a machine of the cluster (the head, or one "
        "joined with `ray start --address`); Ray Client (ray://) is not supported")
    num_workers: int = param(1, "Ray Train workers / Ray Data actors; with 1 and no ray_address "
                             "training, caching and sampling run in-process (no Ray start-up)",
                             ge=1, le=MAX_WORKERS)
    use_gpu: bool = param(False, "give each worker one GPU")
    cpus_per_worker: int = param(1, "CPUs reserved per worker; torch threads follow it", ge=1,
                                 le=MAX_CPUS_PER_WORKER)
    storage_path: str | None = param(
        None, "where Ray Train workers report checkpoints: an s3:// URL or a folder every node "
        "mounts; null = a folder beside the stage's checkpoints (one machine only)")
    ship_code: bool = param(False, "send the latentforge code to the cluster's workers through "
                            "Ray's runtime_env (else their image must have it: infra/Dockerfile)")
    precision: Literal["fp32", "bf16", "auto"] = param(
        "fp32", "training precision of judge, tokenizer and generator: fp32; bf16 (autocast: bf16 "
        "matmuls, fp32 weights and optimizer); auto: bf16 only where this machine trains the "
        "stage's model faster in bf16 (measured once per machine and model, cached in "
        "~/.cache/latentforge/precision.json). A stage's own bf16: true means bf16 whatever this "
        "says; the precision used is in the stage's output meta")
    parallel_seeds: int = param(
        0, "RL seeds fine-tuned side by side on this machine, each in its own process with an "
        "equal share of the CPUs: 0 = auto (every seed at once, up to twice the CPUs; one on a GPU); "
        "1 = one after another in the stage's process. Each seed's result is its own either way "
        "(equal within float round-off)", ge=0, le=MAX_WORKERS)
    compile: bool = param(False, "torch.compile the model for training: 6-23% faster steps on "
                          "CPU (bench/throughput.py), for 4 s (compile cache warm) to 75 s (cold) "
                          "of compiling per model; pays only for long runs")

    def __post_init__(self) -> None:
        address = self.ray_address
        if address is not None and address.strip().lower().startswith("ray://"):
            raise ValueError(
                f"ray_address = {address!r} is a Ray Client address, which LatentForge does not "
                f"use (Ray advises against it for Ray Train and Ray Data; it needs ray[client]): "
                f"run the driver on a machine of the cluster, the head node (ray_address: auto) "
                f"or one joined with `ray start --address HEAD:6379`, and give the GCS address "
                f"HEAD:6379")
        if address is not None and not address.strip():
            raise ValueError("ray_address = '' is empty: null for a local Ray instance, or the "
                             "cluster's address (HEAD:6379, auto)")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking: the experiment and where its artifacts go."""

    experiment: str = param("latentforge", "MLflow experiment name")
    artifact_location: str | None = param(
        None, "where a new experiment keeps artifacts (e.g. s3://bucket/mlflow); null = beside "
        "the SQLite store, or where a tracking server keeps them (its --artifacts-destination). "
        "The store itself comes from MLFLOW_TRACKING_URI")
    enabled: bool = param(True, "log runs to MLflow")

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ValueError(f"experiment = {self.experiment!r} is empty: MLflow needs a name")
        if self.artifact_location is not None and not self.artifact_location.strip():
            raise ValueError("artifact_location = '' is empty: write null for the default")


@dataclass(kw_only=True)
class StorageConfig:
    """The DVC remote and the network limits of S3 and other fsspec URLs."""

    remote: str | None = param(
        None, "DVC remote (local path or s3:// URL) that `latentforge run` pushes outputs to; "
        "S3 endpoint and credentials come from the AWS environment, never from here")
    connect_timeout: float = param(5.0, "seconds to wait for an S3 (or other fsspec URL) "
                                   "connection before retrying", gt=0, le=600)
    read_timeout: float = param(10.0, "seconds to wait for an S3 response before retrying",
                                gt=0, le=3600)
    retries: int = param(2, "retries of a timed-out or throttled S3 request (so a dead endpoint "
                         "fails after about (1 + retries) x (connect + read) timeouts)", ge=0, le=20)

    def __post_init__(self) -> None:
        scheme = self.remote.split("://", 1)[0] if self.remote and "://" in self.remote else ""
        if self.remote is not None and not self.remote.strip():
            raise ValueError("remote = '' is empty: write null for no remote")
        if scheme and scheme not in DVC_REMOTE_PLUGINS:
            raise ValueError(f"remote = {self.remote!r}: DVC has no {scheme}:// remotes; "
                             f"expected a local path or a URL starting one of "
                             f"{', '.join(s + '://' for s in DVC_REMOTE_PLUGINS)}")


@dataclass(kw_only=True)
class Params:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        """Combinations across sections that no stage could run (messages name both keys)."""
        side, patch = self.prepare.resolution, self.tokenizer.patch_size
        if side < MIN_JUDGE_SIDE:
            raise ValueError(f"prepare.resolution = {side} is too small for the judge, whose "
                             f"three stride-2 conv blocks need >= {MIN_JUDGE_SIDE} pixels")
        if side % patch:
            raise ValueError(f"tokenizer.patch_size = {patch} does not divide prepare.resolution "
                             f"= {side}: images must split into whole patches")
        patches = (side // patch) ** 2
        if patches > MAX_TOKENS:
            raise ValueError(f"prepare.resolution = {side} with tokenizer.patch_size = {patch} "
                             f"makes {patches} patches per image, more than {MAX_TOKENS} for the "
                             f"tokenizer's attention: raise tokenizer.patch_size")
        if self.judge.augment_shift >= side:
            raise ValueError(f"judge.augment_shift = {self.judge.augment_shift} must be smaller "
                             f"than prepare.resolution = {side}: a shift that large moves whole "
                             f"images out of the frame")
        kind, quantizer = self.generator.kind, self.tokenizer.quantizer
        if kind != "flow" and quantizer == "kl":
            raise ValueError(f"generator.kind = {kind!r} needs discrete codes, but "
                             f"tokenizer.quantizer = 'kl' gives continuous latents: use "
                             f"tokenizer.quantizer fsq, vq or binary, or generator.kind flow")
        if kind != "flow":
            tok = self.tokenizer
            vocab, keys = {"fsq": (math.prod(tok.fsq_levels), "tokenizer.fsq_levels"),
                           "binary": (2 ** tok.token_dim, "tokenizer.token_dim"),
                           "vq": (tok.codebook_size, "tokenizer.codebook_size")}[quantizer]
            if vocab > MAX_TOKEN_VOCAB:
                raise ValueError(f"generator.kind = {kind!r} predicts one of the tokenizer's "
                                 f"{vocab} codes per token, more than its output layer's "
                                 f"{MAX_TOKEN_VOCAB}: lower {keys}, or use generator.kind flow")
        if kind == "maskgit":
            k = self.tokenizer.num_tokens if self.tokenizer.layout == "1d" else patches
            if self.generator.maskgit_steps > k:
                raise ValueError(f"generator.maskgit_steps = {self.generator.maskgit_steps} is "
                                 f"more than the {k} tokens per image: each step decides at "
                                 f"least one code")
        workers = self.compute.num_workers
        for name in ("judge", "tokenizer", "generator", "posttrain"):
            batch = getattr(self, name).batch_size
            if batch % workers:
                raise ValueError(f"{name}.batch_size = {batch} does not split evenly over "
                                 f"compute.num_workers = {workers}")

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _closest(name: str, options: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        item = _describe(typing.get_args(tp)[0])
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}
        return f"a list of {plural.get(item, item)}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {_describe(key_tp)} to {_describe(value_tp)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _range_text(meta: Mapping[str, Any]) -> str:
    bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(k) is not None]
    return " and ".join(bounds)


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value) for an error message, shortened: a pasted blob must not flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def _allowed(tp: Any, meta: Mapping[str, Any]) -> str:
    rng = _range_text(meta)
    return _describe(tp) + (f" {rng}" if rng else "")


def _is_numeric(tp: Any) -> bool:
    """Whether `tp`, its non-null option, list items or mapping values are numbers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_numeric(a) for a in args)
    if origin is list:
        return _is_numeric(args[0])
    if origin is dict:
        return _is_numeric(args[1])
    return tp in (int, float)


def _is_non_finite(value: Any) -> bool:
    """nan or +-inf: a YAML float (.nan, .inf, 1e999) or text float() reads so ('-S x=nan')."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    return False


def _check_finite(key: str, value: Any, tp: Any, meta: Mapping[str, Any], source: str) -> None:
    """Reject nan and +-inf in a numeric key, inside lists and mappings too.

    Range checks alone would not: inf passes `ge`, and nan fails every comparison, so it
    would read as "out of range" and slip through a key without bounds.
    """
    if not _is_numeric(tp):
        return
    if isinstance(value, Mapping):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(key, value)]
    for name, v in items:
        if _is_non_finite(v):
            raise ConfigError(f"{source}: {name} = {_shown(v)} is not a finite number: {key} "
                              f"expects {_allowed(tp, meta)}")


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        for option in typing.get_args(tp):
            if value == option and type(value) is type(option):
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer with hundreds of digits
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported parameter type {tp!r}")


def _check_range(key: str, value: Any, meta: Mapping[str, Any], source: str) -> None:
    numbers = list(value.values()) if isinstance(value, dict) else (
        value if isinstance(value, list) else [value])
    for v in numbers:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        ok = ((meta.get("ge") is None or v >= meta["ge"]) and (meta.get("gt") is None or v > meta["gt"])
              and (meta.get("le") is None or v <= meta["le"]) and (meta.get("lt") is None or v < meta["lt"]))
        if not ok:
            raise ConfigError(f"{source}: {key} = {_shown(value)} is out of range: expected "
                              f"{_range_text(meta)}")


def build_section(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Validate `data` (a mapping from YAML) against dataclass `cls`; `prefix` is its key path."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = _closest(str(key), fields)
            hint = f"; did you mean '{prefix}.{close}'?" if close else \
                f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{prefix}.{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key, tp, value = f"{prefix}.{name}", hints[name], data[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, key, source)
            continue
        _check_finite(key, value, tp, f.metadata, source)
        try:
            coerced = _coerce(value, tp)
        except _Mismatch:
            yaml11 = isinstance(value, str) and value.lower() in YAML11_BOOLS and (
                tp is bool or bool in typing.get_args(tp))
            raise ConfigError(f"{source}: {key} = {_shown(value)} is invalid: expected "
                              f"{_allowed(tp, f.metadata)}"
                              + (" (params.yaml is read as YAML 1.2, as DVC reads it: write "
                                 "true or false)" if yaml11 else "")) from None
        _check_range(key, coerced, f.metadata, source)
        if isinstance(coerced, str) and coerced.lower() == "none" and \
                type(None) in typing.get_args(tp):
            raise ConfigError(f"{source}: {key} = {_shown(value)} is the text {value!r}, not "
                              f"null: write null (or ~) for no value")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise ConfigError(f"{source}: {prefix}: {exc}") from None


def build_params(raw: Any, source: str = DEFAULT_PARAMS_FILE) -> Params:
    """Validate a whole parameter mapping; missing keys take their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Params)}
    for key in raw:
        if key not in fields:
            close = _closest(str(key), fields)
            hint = f"; did you mean '{close}'?" if close else f"; valid sections: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
    hints = typing.get_type_hints(Params)
    sections = {name: build_section(hints[name], raw.get(name), name, source) for name in fields}
    try:
        return Params(**sections)
    except ValueError as exc:  # cross-section checks in Params.__post_init__
        raise ConfigError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


class DuplicateKeyError(ConfigError):
    """A YAML mapping states a key twice: PyYAML keeps the last silently, DVC's ruamel refuses."""

    def __init__(self, key: str, first: Any, second: Any) -> None:
        """`first` and `second` are the YAML marks (0-based line and column) of both keys."""
        self.key, self.first_line, self.second_line = key, first.line + 1, second.line + 1
        where = f"line {self.first_line} and line {self.second_line}"
        if self.first_line == self.second_line:  # a flow mapping such as {a: 1, a: 2}
            where = (f"line {self.first_line}, columns {first.column + 1} and "
                     f"{second.column + 1}")
        super().__init__(f"duplicate key '{key}' at {where}")


# YAML 1.1's booleans that YAML 1.2 (and so DVC and latentforge) reads as text.
YAML11_BOOLS = frozenset({"yes", "no", "y", "n", "on", "off"})


def _yaml_loader() -> Any:
    """PyYAML's safe loader with YAML 1.2's plain scalars, as DVC reads params.yaml, and
    duplicate keys as errors (DVC rejects such a file, so `latentforge` must too).

    DVC reads and writes params.yaml with ruamel, which follows YAML 1.2; PyYAML follows 1.1,
    where `yes`, `on`, `No` are booleans, `1:30` is 90 and `017` is 15. A string such as
    'on' that `dvc exp run -S` stores (ruamel writes it unquoted, as 1.2 allows) would reach
    a stage as True. So the plain scalars resolve here by ruamel's own 1.2 rules: true/false
    only, 0o17 octal and 017 decimal, 2e-3 a float, no base 60."""
    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers: dict[Any, Any] = {}  # only the 1.2 rules added below

        def construct_yaml_int(self, node: Any) -> int:
            text = self.construct_scalar(node).replace("_", "")
            sign = -1 if text[0] == "-" else 1
            text = text.lstrip("+-")
            bases = {"0b": 2, "0o": 8, "0x": 16}
            if text[:2] in bases:
                return sign * int(text[2:], bases[text[:2]])
            return sign * int(text)  # 017 is 17 in YAML 1.2

        def construct_document(self, node: Any) -> Any:
            # One pass over the composed document before anything is built. A check inside
            # construct_mapping would see `<<: *base` merges already flattened into the
            # mapping (an overridden merged key would look duplicated) and would not know the
            # key path of the mapping it checks.
            self._check_unique_keys(node, "", set())
            return super().construct_document(node)

        def _check_unique_keys(self, node: Any, path: str, visited: set[int]) -> None:
            if id(node) in visited:  # an alias of a node checked where its anchor stands
                return
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self._check_unique_keys(item, f"{path}[{i}]", visited)
            elif isinstance(node, yaml.MappingNode):
                first: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    name = path
                    # Merge keys (`<<`) may repeat, and keys they bring in may be overridden.
                    if (isinstance(key_node, yaml.ScalarNode)
                            and key_node.tag != "tag:yaml.org,2002:merge"):
                        # Compared as built, so 1 and 0x1 (one dict key) count as the same.
                        key = self.construct_object(key_node)
                        name = f"{path}.{key}" if path else str(key)
                        if key in first:
                            raise DuplicateKeyError(name, first[key].start_mark,
                                                    key_node.start_mark)
                        first[key] = key_node
                    self._check_unique_keys(value_node, name, visited)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    _add_yaml12_resolvers(Loader)
    return Loader


def _add_yaml12_resolvers(cls: Any) -> None:
    """Give a PyYAML loader or dumper ruamel's YAML 1.2 plain-scalar rules (DVC's)."""
    from ruamel.yaml.resolver import implicit_resolvers

    for versions, tag, regexp, first_chars in implicit_resolvers:
        if (1, 2) in versions:
            cls.add_implicit_resolver(tag, re.compile(regexp.pattern, regexp.flags), first_chars)


def yaml_load(text: str | bytes) -> Any:
    """YAML text as DVC reads it (YAML 1.2 scalars; see `_yaml_loader`)."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def _yaml_dumper() -> Any:
    """PyYAML's safe dumper, quoting every string that YAML 1.1 or 1.2 would read as something
    else ('on', '0o17', '1e3'), so what it writes means the same to `yaml_load`, DVC and
    PyYAML; a string with a line break is one double-quoted line."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def represent_str(self, data: str) -> Any:
            style = '"' if any(c in data for c in "\n\r\x85\u2028\u2029") else None
            return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, Dumper.represent_str)
    _add_yaml12_resolvers(Dumper)  # after PyYAML's 1.1 rules: a str matching either is quoted
    return Dumper


def yaml_dump(data: Any, **kwargs: Any) -> str:
    """YAML text that `yaml_load` (and PyYAML, and DVC) read back as `data`."""
    import yaml

    return yaml.dump(data, Dumper=_yaml_dumper(), allow_unicode=True,  # type: ignore[no-any-return]
                     **kwargs)


def yaml_text(value: Any) -> str:
    """`value` as one line of flow YAML, as `-S KEY=VALUE` takes it: `yaml_load` reads it back
    as `value` (strings, numbers, null, lists and mappings)."""
    text = yaml_dump(value, default_flow_style=True, width=math.inf, sort_keys=False)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode_text(data: bytes, path: str | Path) -> str:
    """The UTF-8 text of a params file; binary data or another encoding names the first bad byte."""
    # NUL is valid UTF-8, yet no YAML text holds one: a binary file or UTF-16/32 text.
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: not UTF-8 text: NUL byte at byte offset {nul} (line "
                          f"{_line_of(data, nul)}); a binary file, or UTF-16/32 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset "
                          f"{exc.start} (line {_line_of(data, exc.start)}); save the file as "
                          f"UTF-8") from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a plain dict, with a clear error for anything but a mapping
    in UTF-8 YAML without duplicate keys."""
    return parse_params_bytes(read_params_bytes(path), path)


def read_params_bytes(path: str | Path) -> bytes:
    """The bytes of a params file, with one clear line when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"params file {path} is a directory, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror or exc}") from None


def yaml_error_line(exc: Exception) -> str:
    """PyYAML's several-line message (the text quoted, a caret) as one line: where, what, and
    within what ("line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing
    a flow sequence from line 2, column 10)")."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    problem = " ".join(str(problem).split())
    if "'\\t'" in problem:  # PyYAML names a tab as the two characters \t
        problem += " (indent with spaces, not tabs)"
    where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        where += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        where += f" ({context})"
    return where


def parse_params_bytes(raw: bytes, path: str | Path) -> dict[str, Any]:
    """`read_params_file` on the bytes of the file at `path` (named in the errors)."""
    import yaml

    path = Path(path)
    text = _decode_text(raw, path)
    try:
        data = yaml_load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}; YAML would silently keep the last, and DVC rejects "
                          f"the file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(exc)}") from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit, a bad date
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into a key path and a value, read as YAML as params.yaml is
    (`yaml_load`). `dvc exp run -S` reads the same text with Hydra's grammar, to other values
    at times (`a\\b`, `${x}`, `a,b`): experiments send DVC what latentforge/overrides.py
    renders from the checked values instead."""
    import yaml

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that were not UTF-8 arrive as surrogates
        raise ConfigError(f"override {ascii(text)} is not UTF-8 text (character {exc.start})"
                          ) from None
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': expected a key path like prepare.resolution")
    try:
        value = yaml_load(raw_value) if raw_value.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override '{text}': duplicate key '{key.strip()}.{exc.key}'") from None
    except (yaml.YAMLError, ValueError):  # not YAML: the text itself, as `dvc exp run -S` does
        value = raw_value
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `-S section.key=value` applied."""
    import copy

    merged = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load_params(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Params:
    """Load and validate a params file (default: params.yaml if it exists) plus overrides."""
    overrides = list(overrides)
    source = str(path) if path is not None else DEFAULT_PARAMS_FILE
    if path is None and not Path(DEFAULT_PARAMS_FILE).exists():
        raw: dict[str, Any] = {}
    else:
        raw = read_params_file(source)
    if overrides:
        source = f"{source} with -S {' -S '.join(overrides)}"
    return build_params(apply_overrides(raw, overrides), source)


def params_to_yaml(params: Params) -> str:
    return yaml_dump(params.to_dict(), sort_keys=False, default_flow_style=False)


def _yaml_node(old: Any, value: Any) -> Any:
    """`value` as ruamel writes it in place of `old`: a list or mapping keeps the old value's
    style (flow, `[0, 1, 2]`, as params.yaml writes them, unless it was written as a block) and
    the end-of-line comment that rode on it; a plain list would be written as a block with the
    key's comment on the key's line and a blank line before its items."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    new: CommentedSeq | CommentedMap
    if isinstance(value, list):
        new = CommentedSeq(value)
    elif isinstance(value, dict):
        new = CommentedMap(value)
    else:
        return value
    was_block = hasattr(old, "fa") and not old.fa.flow_style()
    if not was_block:
        new.fa.set_flow_style()
    if hasattr(old, "ca"):
        new.ca.comment = old.ca.comment
    return new


def write_params_file(params: Params, path: str | Path = DEFAULT_PARAMS_FILE) -> bool:
    """Write `params` into a params file, keeping its comments and key order; atomic.

    Returns True when the file changed. This is what `dvc exp run -S` does to params.yaml,
    so `dvc repro` afterwards sees the same parameters as the run that wrote them.
    """
    import io

    from ruamel.yaml import YAML

    from latentforge.storage import write_bytes_atomic

    path = Path(path)
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    old_text = path.read_text() if path.exists() else ""
    doc = yaml.load(old_text) if old_text.strip() else None
    if doc is None:
        doc = {}

    for section, values in params.to_dict().items():
        if not isinstance(doc.get(section), Mapping):
            doc[section] = {}
        node = doc[section]
        for key, value in values.items():
            # Values (a dict-valued parameter too) are replaced whole, never merged.
            if key not in node or node[key] != value:
                node[key] = _yaml_node(node.get(key), value)
    buf = io.StringIO()
    yaml.dump(doc, buf)
    new_text = buf.getvalue()
    if new_text == old_text:
        return False
    write_bytes_atomic(path, new_text.encode())
    return True


def documented_yaml(params: Params | None = None) -> str:
    """params.yaml text: every key with its value and its doc as a comment."""
    params = params or Params()

    def dump(obj: Any, indent: int) -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value, pad = getattr(obj, f.name), "  " * indent
            if dataclasses.is_dataclass(value):
                out += [f"{pad}{f.name}:", *dump(value, indent + 1)]
                out += [""] if indent == 0 else []
                continue
            text = yaml_text(value)
            out.append(f"{pad}{f.name}: {text}  # {f.metadata.get('doc', '')}")
        return out

    header = ("# LatentForge parameters: one section per stage plus compute, tracking, storage.\n"
              "# `latentforge params --explain` documents every key; `latentforge run -S KEY=VALUE`"
              " and\n# `dvc exp run -S KEY=VALUE` edit this file. Presets for other machines live "
              "in presets/.\n\n")
    return header + "\n".join(dump(params, 0)).rstrip() + "\n"


def explain(cls: type = Params, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default as YAML, doc) for every parameter, for `latentforge params --explain`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += explain(hints[f.name], key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rng = _range_text(f.metadata)
        doc = f.metadata.get("doc", "") + (f" [{_describe(hints[f.name])}{' ' + rng if rng else ''}]")
        rows.append((key, yaml_text(default), doc))
    return rows
