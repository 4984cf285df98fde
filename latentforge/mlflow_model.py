"""MLflow pyfunc wrapper for LatentForge models, logged as "models from code".

`mlflow.pyfunc.load_model(uri).predict(images)` runs the stage's model on uint8 images
(N, H, W, C): the judge returns class log-probabilities, the tokenizer its reconstructions.
Weights come from the logged safetensors folder; nothing is unpickled.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class LatentForgeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow reads these hints
        kind = (context.model_config or {}).get("kind")
        folder = context.artifacts["model_dir"]
        if kind == "judge":
            from latentforge.tasks.judge import load_judge

            self.model = load_judge(folder)
        elif kind == "tokenizer":
            from latentforge.tasks.tokenizer import load_tokenizer

            self.model = load_tokenizer(folder)
        elif kind == "generator":
            # Latents decode with the pipeline's tokenizer (checked against the recorded sha).
            from latentforge.tasks.generator import load_generator

            self.model = load_generator(folder)
        else:
            raise ValueError(f"unknown LatentForge model kind {kind!r}")
        self.kind = kind

    # np.ndarray is a hint MLflow accepts without inferring a schema from it (the shapes differ
    # per model kind); without a hint it warns on every log_model.
    def predict(self, context, model_input: np.ndarray, params=None):  # noqa: ANN001, ANN201
        if self.kind == "generator":  # input: class labels; output: uint8 images
            labels = np.asarray(model_input, dtype=np.int64).reshape(-1)
            return self.model.sample_images(labels, seed=0, steps=25, cfg_scale=1.5)
        images = np.asarray(model_input, dtype=np.uint8)
        if self.kind == "judge":
            return self.model.score(images)[1]
        return self.model.reconstruct(images)


set_model(LatentForgeModel())
