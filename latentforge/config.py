"""The typed parameter schema: params.yaml -> validated dataclasses.

Every entry point (CLI, the DVC stage command, Prefect deployment parameters) goes through
`load_params`, so an unknown key, a wrong type or an out-of-range value is reported the same
way everywhere: the full key path, the value and what is allowed, and exit code 2.

Each field is declared with `param(default, doc, ...)`; the doc string is what
`latentforge params --explain` prints and what the Prefect UI shows next to a parameter.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentforge.errors import ConfigError

DEFAULT_PARAMS_FILE = "params.yaml"


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
    source: Literal["digits", "idx", "folder", "npz"] = param(
        "digits", "digits: scikit-learn's embedded 8x8 digits; idx: MNIST IDX files in `path`; "
        "folder: one sub-folder of images per class; npz: `images` and `labels` arrays")
    path: str = param(
        "data/source", "local path or s3:// URL of the source (ignored for digits); for idx a "
        "folder holding *-images-idx3-ubyte[.gz] with matching *-labels-idx1-ubyte[.gz]")
    resolution: int = param(16, "square output side in pixels (resize + centre crop)", ge=4, le=1024)
    channels: Literal[1, 3] = param(1, "1 = grayscale, 3 = RGB")
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = param(
        "bicubic", "PIL filter used to resize the shorter side to `resolution`")
    val_fraction: float = param(0.1, "fraction of images held out for validation", ge=0.0, lt=1.0)
    seed: int = param(0, "seed of the deterministic train/val split", ge=0)
    max_images: int | None = param(None, "keep at most this many images (null = all)", ge=1)
    on_bad_image: Literal["skip", "fail"] = param(
        "skip", "skip: leave out undecodable images and list them in the report; fail: stop")
    shard_size: int = param(8192, "images per shard file (few large shards hash fast in DVC)", ge=1)


@dataclass(kw_only=True)
class TrainConfig:
    """Fields every training stage (judge, tokenizer, generator) shares; stages subclass it."""

    steps: int = param(1000, "optimizer steps", ge=1)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1)
    lr: float = param(1e-3, "peak learning rate (AdamW)", gt=0.0)
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of lr (cosine)", ge=0.0, le=1.0)
    warmup_steps: int = param(50, "linear warm-up steps", ge=0)
    weight_decay: float = param(0.01, "AdamW weight decay", ge=0.0)
    grad_clip: float = param(1.0, "max global gradient norm; 0 disables clipping", ge=0.0)
    ema_decay: float = param(0.999, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    bf16: bool = param(False, "bf16 autocast for forward/backward")
    seed: int = param(0, "seed for initialisation and data order", ge=0)
    save_every: int = param(200, "checkpoint every N steps", ge=1)
    keep_last: int = param(2, "checkpoints to keep", ge=1)
    log_every: int = param(25, "log metrics every N steps", ge=1)


@dataclass(kw_only=True)
class JudgeConfig(TrainConfig):
    """The small classifier whose features and log-probs score every later stage."""

    width: int = param(32, "channels of the first conv block (doubles per block)", ge=4)
    feature_dim: int = param(128, "penultimate feature size (FD-judge, precision/recall)", ge=8)
    dropout: float = param(0.1, "dropout before the classifier head", ge=0.0, lt=1.0)
    augment_shift: int = param(1, "random translation in pixels during training", ge=0)
    steps: int = param(300, "optimizer steps", ge=1)
    batch_size: int = param(128, "global batch size, split evenly across workers", ge=1)
    lr: float = param(2e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(20, "linear warm-up steps", ge=0)
    ema_decay: float = param(0.99, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)


@dataclass(kw_only=True)
class TokenizerConfig(TrainConfig):
    """TiTok-style 1D tokenizer (or the 2D patch baseline) with a kl / fsq / vq bottleneck."""

    size: Literal["tiny", "small", "base", "large"] = param(
        "tiny", "model size from the registry in models/tokenizer.py (width/depth/heads)")
    layout: Literal["1d", "2d"] = param("1d", "1d: K learnable latent tokens (TiTok); 2d: one "
                                        "latent per patch (baseline)")
    patch_size: int = param(4, "ViT patch size in pixels", ge=1)
    num_tokens: int = param(16, "K, latent tokens for layout 1d (2d uses one per patch)", ge=1)
    token_dim: int = param(8, "D, dimension of each latent token (fsq: len(fsq_levels))", ge=1)
    quantizer: Literal["kl", "fsq", "vq"] = param("kl", "kl: continuous Gaussian; fsq: finite "
                                                  "scalar levels; vq: L2-normalised codebook")
    kl_weight: float = param(1e-4, "KL weight (kl)", ge=0.0)
    fsq_levels: list[int] = param([8, 5, 5, 5], "levels per dimension (fsq)", ge=2)
    codebook_size: int = param(1024, "codebook entries (vq)", ge=2)
    commitment: float = param(0.25, "commitment loss weight (vq)", ge=0.0)
    entropy_weight: float = param(0.0, "entropy loss weight (vq); >0 fights codebook collapse",
                                  ge=0.0)
    loss: Literal["l2", "l1"] = param("l2", "pixel reconstruction loss")
    nested_dropout: bool = param(False, "FlexTok: train on random token prefixes (1d only)")
    latent_perturbation: float = param(
        0.0, "RobustTok: fraction of tokens perturbed during training", ge=0.0, le=1.0)
    perturbation_sigma: float = param(0.5, "noise scale of kl latent perturbation", ge=0.0)
    eval_perturbation: float = param(0.1, "fraction of tokens perturbed for the pFD metric",
                                     ge=0.0, le=1.0)
    steps: int = param(1500, "optimizer steps", ge=1)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1)
    lr: float = param(3e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(50, "linear warm-up steps", ge=0)
    ema_decay: float = param(0.995, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    save_every: int = param(500, "checkpoint every N steps", ge=1)
    log_every: int = param(100, "log metrics every N steps", ge=1)

    def __post_init__(self) -> None:
        if self.quantizer == "fsq" and self.token_dim != len(self.fsq_levels):
            raise ValueError(f"quantizer fsq needs token_dim == len(fsq_levels): token_dim is "
                             f"{self.token_dim}, fsq_levels has {len(self.fsq_levels)} levels")
        if self.nested_dropout and self.layout != "1d":
            raise ValueError("nested_dropout needs layout 1d (2d tokens have no order)")


@dataclass(kw_only=True)
class CacheConfig:
    """Latent caching: encode the prepared splits once with the tokenizer's EMA weights."""

    batch_size: int = param(256, "images per encoder batch (per Ray Data actor)", ge=1)
    shard_size: int = param(4096, "images per cache shard; shards commit one by one", ge=1)
    hflip: bool = param(False, "also store a horizontally flipped view (off for digits, where "
                        "flipping changes meaning)")
    verify_samples: int = param(16, "images whose cached latents are decoded and compared with "
                                "freshly encoded ones", ge=0)


@dataclass(kw_only=True)
class GeneratorConfig(TrainConfig):
    """Flow-matching transformer over the K latent tokens, class-conditional with CFG."""

    size: Literal["tiny", "small", "base", "large"] = param(
        "tiny", "model size from the registry in models/generator.py")
    class_dropout: float = param(0.1, "probability of dropping the class label (for CFG)",
                                 ge=0.0, lt=1.0)
    time_sampling: Literal["uniform", "logit_normal"] = param(
        "logit_normal", "distribution of training times t")
    sampler: Literal["euler", "heun"] = param("heun", "ODE sampler")
    sample_steps: int = param(25, "ODE steps when sampling", ge=1)
    cfg_scale: float = param(1.5, "classifier-free guidance scale (1 = no guidance)", ge=0.0)
    eval_every: int = param(0, "evaluate on a small sample every N steps (0 = only at the end)",
                            ge=0)
    eval_per_class: int = param(8, "samples per class for the periodic evaluation", ge=1)
    final_per_class: int = param(50, "samples per class for the final metrics", ge=1)
    sample_seed: int = param(0, "seed of evaluation samples (independent of worker count)", ge=0)
    steps: int = param(3000, "optimizer steps", ge=1)
    batch_size: int = param(64, "global batch size, split evenly across workers", ge=1)
    lr: float = param(2e-3, "peak learning rate (AdamW)", gt=0.0)
    warmup_steps: int = param(100, "linear warm-up steps", ge=0)
    ema_decay: float = param(0.995, "EMA decay of the weights; 0 disables EMA", ge=0.0, lt=1.0)
    save_every: int = param(500, "checkpoint every N steps", ge=1)
    log_every: int = param(100, "log metrics every N steps", ge=1)


@dataclass(kw_only=True)
class RLConfig:
    """Flow-GRPO fine-tuning of the generator against a reward, with a KL leash."""

    steps: int = param(40, "policy updates (each on a fresh batch of rollouts)", ge=1)
    classes_per_step: int = param(4, "class labels sampled per update", ge=1)
    group_size: int = param(8, "samples per class label; advantages are relative to the group",
                            ge=2)
    train_steps: int = param(10, "SDE steps per rollout (evaluation keeps the ODE sampler)", ge=2)
    noise_level: float = param(0.7, "a, the SDE noise level", gt=0.0)
    timestep_fraction: float = param(0.6, "fraction of the SDE steps trained per rollout",
                                     gt=0.0, le=1.0)
    inner_epochs: int = param(1, "optimisation passes over each batch of rollouts", ge=1)
    clip_range: float = param(0.2, "PPO clip range of the new/old probability ratio", gt=0.0)
    adv_clip: float = param(5.0, "advantages are clipped to +-adv_clip", gt=0.0)
    kl_beta: float = param(0.1, "weight of the KL to the frozen reference generator", ge=0.0)
    cfg_scale: float = param(1.0, "CFG scale during rollouts and evaluation samples", ge=0.0)
    rewards: dict[str, float] = param(
        {"judge_logprob": 1.0}, "reward name -> weight: judge_logprob, judge_margin, or a user "
        "reward module:function taking (uint8 images, labels) and returning one float per image")
    lr: float = param(1e-4, "learning rate (AdamW)", gt=0.0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0.0)
    grad_clip: float = param(1.0, "max global gradient norm; 0 disables", ge=0.0)
    ema_decay: float = param(0.9, "EMA of the fine-tuned weights; 0 disables", ge=0.0, lt=1.0)
    eval_every: int = param(10, "gFD-judge on a fixed sample every N updates (reward hacking "
                            "watch); 0 = only at the end", ge=0)
    eval_per_class: int = param(50, "samples per class for the periodic evaluation", ge=1)
    save_every: int = param(10, "checkpoint every N updates", ge=1)
    seed: int = param(0, "seed of labels, rollouts and evaluation samples", ge=0)


@dataclass(kw_only=True)
class EvaluateConfig:
    """The final, protocol-recorded evaluation of everything the pipeline produced."""

    per_class: int = param(100, "generated samples per class (class-balanced)", ge=2)
    sample_steps: int = param(25, "ODE steps for evaluation samples", ge=1)
    sampler: Literal["euler", "heun"] = param("heun", "ODE sampler")
    cfg_scale: float | None = param(1.0, "CFG scale for base and RL alike (1.0 = the scale RL "
                                    "trains at); null = each model's own", ge=0.0)
    seed: int = param(1000, "seed of evaluation samples", ge=0)
    inception_weights: str | None = param(
        None, "local Inception-v3 FID weights (pytorch-fid format) for FID/rFID/gFID; null = "
        "FD-judge only. Never downloaded")


@dataclass(kw_only=True)
class ComputeConfig:
    ray_address: str | None = param(
        None, "null: a local Ray instance; else a cluster address (e.g. auto, ray://host:10001)")
    num_workers: int = param(1, "Ray Train workers / Ray Data actors; with 1 and no ray_address "
                             "training and sampling run in-process (caching always uses Ray "
                             "Data)", ge=1)
    use_gpu: bool = param(False, "give each worker one GPU")
    cpus_per_worker: int = param(1, "CPUs reserved per worker; torch threads follow it", ge=1)
    storage_path: str | None = param(
        None, "where Ray Train workers report checkpoints: an s3:// URL or a folder every node "
        "mounts; null = a folder beside the stage's checkpoints (one machine only)")
    ship_code: bool = param(False, "send the latentforge code to the cluster's workers through "
                            "Ray's runtime_env (else their image must have it: infra/Dockerfile)")


@dataclass(kw_only=True)
class TrackingConfig:
    experiment: str = param("latentforge", "MLflow experiment name")
    artifact_location: str | None = param(
        None, "where a new experiment keeps artifacts (e.g. s3://bucket/mlflow); null = beside "
        "the SQLite store, or where a tracking server keeps them (its --artifacts-destination). "
        "The store itself comes from MLFLOW_TRACKING_URI")
    enabled: bool = param(True, "log runs to MLflow")


@dataclass(kw_only=True)
class StorageConfig:
    remote: str | None = param(
        None, "DVC remote (local path or s3:// URL) that `latentforge run` pushes outputs to; "
        "S3 endpoint and credentials come from the AWS environment, never from here")


@dataclass(kw_only=True)
class Params:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

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
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {_describe(key_tp)} to {_describe(value_tp)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _range_text(meta: Mapping[str, Any]) -> str:
    bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(k) is not None]
    return " and ".join(bounds)


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
            return float(value)
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
            raise ConfigError(f"{source}: {key} = {value!r} is out of range: expected {_range_text(meta)}")


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
        try:
            coerced = _coerce(value, tp)
        except _Mismatch:
            rng = _range_text(f.metadata)
            allowed = _describe(tp) + (f" {rng}" if rng else "")
            raise ConfigError(f"{source}: {key} = {value!r} is invalid: expected {allowed}") from None
        _check_range(key, coerced, f.metadata, source)
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
    return Params(**{name: build_section(hints[name], raw.get(name), name, source)
                     for name in fields})


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


def _yaml_loader() -> Any:
    """PyYAML's safe loader, plus YAML 1.2 floats such as 2e-3 (PyYAML's 1.1 rules read them as
    strings; DVC's ruamel reads them as numbers, and params.yaml must mean the same to both)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def yaml_load(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML params file into a plain dict, with a clear error for bad YAML."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` (the syntax of `dvc exp run -S`) into a key path and a value."""
    import yaml

    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': expected a key path like prepare.resolution")
    try:
        value = yaml_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
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
    import yaml

    return yaml.safe_dump(params.to_dict(), sort_keys=False, default_flow_style=False)


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
                node[key] = value
    buf = io.StringIO()
    yaml.dump(doc, buf)
    new_text = buf.getvalue()
    if new_text == old_text:
        return False
    write_bytes_atomic(path, new_text.encode())
    return True


def documented_yaml(params: Params | None = None) -> str:
    """params.yaml text: every key with its value and its doc as a comment."""
    import yaml

    params = params or Params()

    def dump(obj: Any, indent: int) -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value, pad = getattr(obj, f.name), "  " * indent
            if dataclasses.is_dataclass(value):
                out += [f"{pad}{f.name}:", *dump(value, indent + 1)]
                out += [""] if indent == 0 else []
                continue
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"{pad}{f.name}: {text}  # {f.metadata.get('doc', '')}")
        return out

    header = ("# LatentForge parameters: one section per stage plus compute, tracking, storage.\n"
              "# `latentforge params --explain` documents every key; `latentforge run -S KEY=VALUE`"
              " and\n# `dvc exp run -S KEY=VALUE` edit this file. Presets for other machines live "
              "in presets/.\n\n")
    return header + "\n".join(dump(params, 0)).rstrip() + "\n"


def explain(cls: type = Params, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every parameter, for `latentforge params --explain`."""
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
        rows.append((key, repr(default), doc))
    return rows
