"""MLflow pyfunc wrapper for LatentForge models, logged as "models from code".

`mlflow.pyfunc.load_model(uri).predict(images)` runs the stage's model on uint8 images
(N, H, W, C): the judge returns class log-probabilities, the tokenizer its reconstructions.
A generator takes int64 class labels (N,) and returns uint8 images, sampled as its stage
sampled the images its metrics grade unless `params` say otherwise: `predict(labels,
params={"seed": 1, "steps": 50, "cfg_scale": 2.0, "sampler": "euler"})`. A base generator
decodes with the tokenizer's own decoder; an RL one with the decoder logged beside it.
Weights come from the logged safetensors folder; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel


def model_kind(folder: str | Path) -> str:
    """judge, evaluator, tokenizer or generator: which stage output `folder` is, from the JSON
    file each stage writes beside the weights (a judge's names its role)."""
    from latentforge.checkpoint import folder_kind

    found = folder_kind(folder, but="decoder.json")
    if found is None:
        raise ValueError(f"{folder}: no judge.json, tokenizer.json or generator.json; not a "
                         "LatentForge model folder")
    name, kind = found
    if kind == "judge":
        return str(json.loads((Path(folder) / name).read_text()).get("role", "judge"))
    return kind


class LatentForgeModel(PythonModel):
    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow reads these hints
        folder = context.artifacts["model_dir"]
        # Models logged before the kind came from the folder carry it as model_config (which
        # MLflow also logged as a run param, clashing when one run logs a judge and an
        # evaluator).
        kind = (context.model_config or {}).get("kind") or model_kind(folder)
        if kind in ("judge", "evaluator"):  # the evaluator is a judge-like classifier
            from latentforge.tasks.judge import load_judge

            self.model = load_judge(folder)
        elif kind == "tokenizer":
            from latentforge.tasks.tokenizer import load_tokenizer

            self.model = load_tokenizer(folder)
        elif kind == "generator":
            # Latents decode with the tokenizer logged beside the generator (checked against the
            # sha256 the generator recorded); models logged without one use the pipeline's.
            from latentforge import paths
            from latentforge.tasks.generator import load_generator

            self.model = load_generator(folder, context.artifacts.get("tokenizer_dir",
                                                                      paths.TOKENIZER))
            if "decoder_dir" in context.artifacts:  # an RL model fine-tuned through a
                from latentforge.tasks.posttrain import apply_decoder  # post-trained decoder

                apply_decoder(self.model.tokenizer, context.artifacts["decoder_dir"])
        else:
            raise ValueError(f"unknown LatentForge model kind {kind!r}")
        self.kind = kind
        self.artifacts = dict(context.artifacts)  # local paths of the logged folders

    # np.ndarray: a hint MLflow accepts without inferring a schema from it (the shapes differ
    # per model kind; `signature` gives them); without a hint it warns on every log_model.
    def predict(self, context, model_input: np.ndarray, params=None):  # noqa: ANN001, ANN201
        if self.kind == "generator":  # input: class labels; output: uint8 images
            labels = np.asarray(model_input, dtype=np.int64).reshape(-1)
            classes = len(self.model.class_names)
            if labels.size == 0 or labels.min() < 0 or labels.max() >= classes:
                raise ValueError(f"model_input: expected one or more class labels in "
                                 f"[0, {classes - 1}] ({', '.join(self.model.class_names)}), "
                                 f"got {labels.tolist()[:8]}")
            seed, options = generator_options(self.model.meta, params)
            return self.model.sample_images(labels, seed=seed, **options)
        images = np.asarray(model_input, dtype=np.uint8)
        if self.kind in ("judge", "evaluator"):
            return self.model.score(images)[1]
        return self.model.reconstruct(images)


def generator_options(meta: dict[str, Any], params: Mapping[str, Any] | None
                      ) -> tuple[int, dict[str, Any]]:
    """(seed, sample_images options) for a generator: each inference param that is given and
    not None, else how the model's stage sampled it (its meta). Out-of-range values are a
    ValueError naming the param."""
    import math
    from numbers import Integral, Real

    from latentforge.config import MAX_SAMPLE_STEPS, MAX_SEED
    from latentforge.tasks.generator import SAMPLING_KEYS, sampling_defaults

    given = {k: v for k, v in (params or {}).items() if v is not None}
    options = sampling_defaults(meta)
    options.update({k: given[k] for k in SAMPLING_KEYS if k in given})
    seed = given.get("seed", 0)

    def integer(value: Any, low: int, high: int) -> bool:
        return (isinstance(value, Integral) and not isinstance(value, bool)
                and low <= int(value) <= high)

    def scale(value: Any) -> bool:
        return (isinstance(value, Real) and not isinstance(value, bool)
                and math.isfinite(float(value)) and float(value) >= 0)

    for name, value, ok, expected in (
            ("seed", seed, integer(seed, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
            ("steps", options["steps"], integer(options["steps"], 1, MAX_SAMPLE_STEPS),
             f"an integer in [1, {MAX_SAMPLE_STEPS}]"),
            ("cfg_scale", options["cfg_scale"], scale(options["cfg_scale"]),
             "a finite number >= 0"),
            ("sampler", options["sampler"], options["sampler"] in ("euler", "heun"),
             "euler or heun")):
        if not ok:
            raise ValueError(f"params[{name!r}] = {value!r}: expected {expected}")
    return int(seed), {**options, "steps": int(options["steps"]),
                       "cfg_scale": float(options["cfg_scale"])}


def signature(kind: str, artifacts: Mapping[str, str | Path]) -> Any:
    """The MLflow signature of a `kind` model, from the JSON files of its logged folders.

    judge, evaluator: uint8 images (N, H, W, C) -> float64 class log-probabilities (N, classes);
    tokenizer: uint8 images -> uint8 reconstructions; generator: int64 class labels (N,) ->
    uint8 images (N, H, W, C), the image shape from the tokenizer logged beside it, with
    inference params seed, steps, cfg_scale and sampler (defaults: as its stage sampled it).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from latentforge.tasks import judge, tokenizer

    def model_cfg(folder_key: str, meta_name: str) -> dict[str, Any]:
        return json.loads((Path(artifacts[folder_key]) / meta_name).read_text())["model"]

    # Unnamed tensors: pyfunc then passes predict the array itself, not {name: array}.
    def images(cfg: Mapping[str, Any] | None) -> TensorSpec:
        shape = (-1, cfg["image_size"], cfg["image_size"], cfg["channels"]) if cfg else (-1,) * 4
        return TensorSpec(np.dtype(np.uint8), shape)

    if kind in ("judge", "evaluator"):
        cfg = model_cfg("model_dir", judge.META)
        inputs, outputs = images(cfg), TensorSpec(np.dtype(np.float64), (-1, cfg["num_classes"]))
    elif kind == "tokenizer":
        cfg = model_cfg("model_dir", tokenizer.META)
        inputs, outputs = images(cfg), images(cfg)
    elif kind == "generator":
        from mlflow.types import ParamSchema, ParamSpec

        from latentforge.tasks import generator

        tok = model_cfg("tokenizer_dir", tokenizer.META) if "tokenizer_dir" in artifacts else None
        inputs, outputs = TensorSpec(np.dtype(np.int64), (-1,)), images(tok)
        # Inference params, defaulting to how the stage sampled the model (its metrics' setting).
        meta = json.loads((Path(artifacts["model_dir"]) / generator.META).read_text())
        d = generator.sampling_defaults(meta)
        params = ParamSchema([ParamSpec("seed", "long", 0),
                              ParamSpec("steps", "long", d["steps"]),
                              ParamSpec("cfg_scale", "double", d["cfg_scale"]),
                              ParamSpec("sampler", "string", d["sampler"])])
        return ModelSignature(inputs=Schema([inputs]), outputs=Schema([outputs]), params=params)
    else:
        raise ValueError(f"unknown LatentForge model kind {kind!r}")
    return ModelSignature(inputs=Schema([inputs]), outputs=Schema([outputs]))


set_model(LatentForgeModel())
