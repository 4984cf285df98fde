"""Rewards for RL fine-tuning: a small registry plus user rewards given as `module:function`.

A reward receives decoded images (uint8 (N, H, W, C)) and the requested labels (N,) and
returns one float per image. The built-ins score with the judge:
  judge_logprob  log p_judge(requested class | image)
  judge_prob     p_judge(requested class | image), bounded in [0, 1]
  judge_margin   log p(requested) - max over other classes of log p(c)
  judge_density  how typical the image's judge features are of the requested class's real
                 images: -(squared Mahalanobis distance to the class mean) / (2 x features),
                 under a Gaussian per class with one pooled, shrunk covariance fitted on the
                 prepared train split (0 at the class mean; on the default digits train
                 images average -0.12, held-out ones -0.16, the base's unguided samples
                 -0.25 with a long tail, at CFG 1.25 -0.12)
and two that no network grades (DDPO's), so an RL effect can be shown on a reward that is not
also the evaluator:
  jpeg_compressibility    -(JPEG size in kB) at quality 95: smaller files score higher
  jpeg_incompressibility  +(JPEG size in kB)
judge_prob alone is the default. Adding judge_density (weight 1) on the default digits brought
RL's unguided samples closer to the guided base in the evaluator's features (gFD-eval, accuracy)
but further from the real images in raw pixels (pixel FD 0.60 against 0.51 without it and 0.48
for the base): a reward fitted in one network's features, graded in another's that learnt the
same data, is only partly independent evidence (README, "The RL objective").
`rl.rewards` is a mapping name -> weight; several entries give their weighted sum. A reward
that raises, returns the wrong shape or a non-finite value stops the stage with an error
naming the reward.

A user reward is code: `rl.rewards` naming `module:function` imports that module and runs it in
the stage's process, with the user's permissions, like any Python you run. Only name modules
you trust. The project folder (where params.yaml is) comes first on the import path, so a
`my_rewards.py` beside params.yaml is found as `my_rewards:fn`; anything else must be installed
in the environment (or be on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from latentforge.errors import ConfigError, LatentForgeError

RewardFn = Callable[[np.ndarray, np.ndarray], Any]
Reference = tuple[np.ndarray, np.ndarray]  # real images (N, H, W, C) uint8 and labels (N,)


class RewardError(LatentForgeError):
    """A reward function failed or returned something unusable."""


def judge_logprob(judge: Any, reference: Reference | None = None) -> RewardFn:
    def reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        _, logp = judge.score(images)
        return logp[np.arange(len(labels)), labels]

    return reward


def judge_margin(judge: Any, reference: Reference | None = None) -> RewardFn:
    def reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        _, logp = judge.score(images)
        own = logp[np.arange(len(labels)), labels]
        others = logp.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        return own - others.max(axis=1)

    return reward


def judge_prob(judge: Any, reference: Reference | None = None) -> RewardFn:
    def reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        _, logp = judge.score(images)
        return np.exp(logp[np.arange(len(labels)), labels])

    return reward


DENSITY_SHRINKAGE = 0.1  # weight of the scaled identity in the pooled covariance


class ClassDensity:
    """Per-class Gaussians over features with one pooled within-class covariance (LDA's model).

    The covariance is shrunk towards a multiple of the identity (`shrinkage` of its weight) so
    that it inverts even with fewer images than feature dimensions. `log_density` returns
    -(squared Mahalanobis distance to the class mean) / (2 x dimensions): the Gaussian's
    log-density up to a constant, per dimension, so its scale does not grow with the width.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int,
                 shrinkage: float = DENSITY_SHRINKAGE) -> None:
        features = np.asarray(features, np.float64)
        labels = np.asarray(labels, np.int64)
        counts = np.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            missing = np.flatnonzero(counts == 0).tolist()
            raise RewardError(f"judge_density: class(es) {missing} have no reference images; "
                              "every class needs real images to say what typical looks like")
        self.means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
        centred = features - self.means[labels]
        cov = centred.T @ centred / len(features)
        dim = len(cov)
        scale = float(np.trace(cov)) / dim
        if not scale > 0:  # every feature the same: no spread to measure distances against
            raise RewardError("judge_density: the reference images' features do not vary")
        cov = (1.0 - shrinkage) * cov + shrinkage * scale * np.eye(dim)
        self.precision = np.linalg.inv(cov)

    def log_density(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        d = np.asarray(features, np.float64) - self.means[np.asarray(labels, np.int64)]
        return -0.5 * ((d @ self.precision) * d).sum(axis=1) / len(self.precision)


def judge_density(judge: Any, reference: Reference | None = None) -> RewardFn:
    if reference is None:
        raise ConfigError("rl.rewards: judge_density needs real reference images (the "
                          "prepared train split); this caller gave none")
    images, labels = reference
    density = ClassDensity(judge.score(images)[0], labels, len(judge.class_names))

    def reward(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return density.log_density(judge.score(images)[0], labels)

    return reward


JPEG_QUALITY = 95  # DDPO's setting


def jpeg_kilobytes(images: np.ndarray) -> np.ndarray:
    """Size in kB (1000 bytes) of each uint8 image (N, H, W, C) saved as JPEG, quality 95."""
    import io

    from PIL import Image

    sizes = np.empty(len(images), np.float64)
    for i, image in enumerate(images):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(
            buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


def jpeg_compressibility(judge: Any, reference: Reference | None = None) -> RewardFn:
    return lambda images, labels: -jpeg_kilobytes(images)


def jpeg_incompressibility(judge: Any, reference: Reference | None = None) -> RewardFn:
    return lambda images, labels: jpeg_kilobytes(images)


BUILTIN: dict[str, Callable[[Any, Reference | None], RewardFn]] = {
    "judge_logprob": judge_logprob, "judge_prob": judge_prob, "judge_margin": judge_margin,
    "judge_density": judge_density, "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility}


def check_names(names: Iterable[str], project: Path) -> None:
    """Before a run: each reward is a built-in, or module:function whose top-level package or
    module is found in `project` or the installed packages (found, not imported: the user's
    code runs in the rl stage only). A ConfigError names the first that is not."""
    import importlib.util

    for name in names:
        if name in BUILTIN or ":" not in name:  # config checked the form
            continue
        top = name.partition(":")[0].split(".")[0]
        sys.path.insert(0, str(project))  # as resolve() looks (every finder, editable
        try:                              # installs' too; a top-level name imports nothing)
            found = bool(top) and importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path.remove(str(project))
        if not found:
            raise ConfigError(f"rl.rewards: no module '{top}' for reward '{name}' in {project} "
                              "or the installed packages")


def resolve(name: str, judge: Any, reference: Reference | None = None) -> RewardFn:
    """A built-in reward by name, or `package.module:function` imported from the user's code.
    `reference` (real images and labels: the prepared train split) is what judge_density fits
    its class Gaussians on."""
    if name in BUILTIN:
        return BUILTIN[name](judge, reference)
    if ":" not in name:
        raise ConfigError(f"rl.rewards: unknown reward '{name}'; built-ins: "
                          f"{', '.join(BUILTIN)}, or give a user reward as module:function")
    module_name, _, attr = name.partition(":")
    project = str(Path.cwd())  # stages run in the project folder (DVC and --no-dvc alike)
    if project not in sys.path:
        sys.path.insert(0, project)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rl.rewards: cannot import module '{module_name}' for reward "
                          f"'{name}': {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: '{name}': module '{module_name}' has no function '{attr}'")
    return fn


class _ScoresOnce:
    """The judge, remembering its scores of the last images it was given, so that several
    judge terms in one reward (judge_prob + judge_density) run the network once per batch.
    Keyed by the array's identity: every term of one call receives the same array."""

    def __init__(self, judge: Any) -> None:
        self.judge = judge
        self._images: Any = None
        self._scores: Any = None

    @property
    def class_names(self) -> list[str]:
        return self.judge.class_names

    def score(self, images: Any) -> Any:
        if images is not self._images:
            scores = self.judge.score(images)
            for array in scores:  # shared by the terms: none may change another's input
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False
            self._images, self._scores = images, scores
        return self._scores

    def forget(self) -> None:
        self._images = self._scores = None


class Reward:
    """The weighted sum of the configured rewards, with every term checked."""

    def __init__(self, weights: Mapping[str, float], judge: Any,
                 reference: Reference | None = None) -> None:
        if not weights:
            raise ConfigError("rl.rewards: at least one reward is needed")
        self.weights = dict(weights)
        self._judge = _ScoresOnce(judge) if judge is not None else None
        try:
            self.fns = {name: resolve(name, self._judge, reference) for name in self.weights}
        finally:
            self._forget()

    def _forget(self) -> None:
        if self._judge is not None:
            self._judge.forget()

    def definition(self) -> str:
        """A stable text of what is being optimised, for lineage tags."""
        return " + ".join(f"{w:g}*{n}" for n, w in sorted(self.weights.items()))

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """(total reward (N,), mean of each term)."""
        try:
            return self._sum(images, labels)
        finally:
            self._forget()  # the next call's images may be this array, rewritten in place

    def _sum(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        total = np.zeros(len(images), np.float64)
        parts = {}
        for name, fn in self.fns.items():
            try:
                value = fn(images, labels)
            except Exception as exc:  # a user's reward may raise anything
                raise RewardError(f"reward '{name}' raised {type(exc).__name__}: {exc}") from exc
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (len(images),):
                raise RewardError(f"reward '{name}' returned shape {arr.shape}, expected "
                                  f"({len(images)},): one float per image")
            if not np.all(np.isfinite(arr)):
                bad = int((~np.isfinite(arr)).sum())
                raise RewardError(f"reward '{name}' returned {bad} non-finite value(s) "
                                  f"(NaN or inf) for {len(images)} images")
            total += self.weights[name] * arr
            parts[name] = float(arr.mean())
        return total, parts
