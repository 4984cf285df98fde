"""95% intervals for generated-sample metrics: a bootstrap over samples and reference (one
evaluation's noise) and a t-interval over RL seeds (the noise between training runs).

The two answer different questions. The bootstrap says how much one generated set's numbers
would move with another draw of samples from the same model; it cannot say whether another RL
run would have landed elsewhere. On the default digits, three RL seeds moved gFD-eval by more
than one seed's bootstrap interval, so a claim about RL needs the interval across seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentforge import metrics

# Bootstrap: replicates, and the metrics that get a 95% interval (resampling with replacement
# is sound for them; precision/recall and diversity count near neighbours, and duplicates
# made by resampling would shrink their radii and distances).
BOOTSTRAP_REPLICATES = 200
INTERVAL_METRICS = ("eval_accuracy", "gfd_eval", "is_eval", "reward_mean")
# FD of raw pixels (metrics.pixel_features), no network involved: on request, for sets that
# carry pixels, against a reference that does (evaluate asks for it).
PIXEL_METRIC = "fd_pixels"
# Where a metric's values lie: a bias-shifted interval is clipped to it (a differences' not).
METRIC_RANGE = {"eval_accuracy": (0.0, 1.0), "gfd_eval": (0.0, np.inf), "is_eval": (1.0, np.inf),
                "reward_mean": (-np.inf, np.inf), PIXEL_METRIC: (0.0, np.inf)}


@dataclass
class PerSample:
    """What the bootstrap resamples of one generated set: (N, F) features, (N, C) log-probs,
    (N,) rewards (None where no reward was computed), (N, P) pixel features (None where not
    asked for); row i of every set compared with another comes from the same label and noise."""

    features: np.ndarray
    log_probs: np.ndarray
    rewards: np.ndarray | None = None
    pixels: np.ndarray | None = None


class Reference:
    """A reference feature set's statistics, with the square root of its covariance that
    every Frechet distance against it needs once (metrics._trace_sqrt_product's route)."""

    def __init__(self, features: np.ndarray) -> None:
        self.mu, sigma = metrics.feature_statistics(features)
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def fd(self, features: np.ndarray) -> float:
        return float(self.fds(np.asarray(features, dtype=np.float64)[None])[0])

    def fds(self, features: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """FD to each of S sets (S, N, F) at once; `counts` (N,) weights row i by how often a
        resample drew it, which gives exactly the resampled rows' mean and covariance without
        copying them."""
        n_rows = features.shape[1]
        w = np.ones(n_rows) if counts is None else counts.astype(np.float64)
        n = w.sum()
        mu = np.einsum("n,snf->sf", w, features) / n  # (S, F)
        centred = features - mu[:, None, :]
        sigma = (centred * w[None, :, None]).transpose(0, 2, 1) @ centred / (n - 1)  # (S, F, F)
        m = self.root @ sigma @ self.root
        ev = np.linalg.eigvalsh((m + m.transpose(0, 2, 1)) / 2)
        diff = self.mu[None] - mu
        fd = ((diff * diff).sum(1) + self.trace + np.trace(sigma, axis1=1, axis2=2)
              - 2.0 * np.sqrt(np.clip(ev, 0.0, None)).sum(1))
        return np.maximum(fd, 0.0)


class _Stacked:
    """Every set's per-sample arrays side by side, for one vectorised pass per replicate."""

    def __init__(self, sets: Mapping[str, PerSample], labels: np.ndarray,
                 keys: Sequence[str]) -> None:
        known = (*INTERVAL_METRICS, PIXEL_METRIC)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"no bootstrap for metric {unknown[0]!r}; known: {known}")
        if "reward_mean" in keys and any(s.rewards is None for s in sets.values()):
            raise ValueError("reward_mean asked of a set scored without rewards")
        if PIXEL_METRIC in keys and any(s.pixels is None for s in sets.values()):
            raise ValueError(f"{PIXEL_METRIC} asked of a set without pixel features")
        self.names, self.keys = list(sets), tuple(keys)
        values = list(sets.values())
        self.features = np.stack([np.asarray(s.features, np.float64) for s in values])
        self.correct = np.stack([(np.asarray(s.log_probs).argmax(1) == labels)
                                 for s in values]).astype(np.float64)  # (S, N)
        self.log_probs = [np.asarray(s.log_probs, np.float64) for s in values]
        self.rewards = (np.stack([np.asarray(s.rewards, np.float64) for s in values])
                        if "reward_mean" in keys else None)
        self.pixels = (np.stack([np.asarray(s.pixels, np.float64) for s in values])
                       if PIXEL_METRIC in keys else None)

    def metrics(self, ref: Reference, rows: np.ndarray | None,
                ref_pixels: Reference | None = None) -> dict[str, dict[str, float]]:
        """{set: {key: value}} on the resample `rows` (None: every row once)."""
        n = self.features.shape[1]
        counts = np.ones(n) if rows is None else np.bincount(rows, minlength=n).astype(float)
        out: dict[str, np.ndarray | list[float]] = {}
        if "eval_accuracy" in self.keys:
            out["eval_accuracy"] = self.correct @ counts / counts.sum()
        if "gfd_eval" in self.keys:
            out["gfd_eval"] = ref.fds(self.features, counts)
        if "is_eval" in self.keys:
            pick = slice(None) if rows is None else rows
            out["is_eval"] = [metrics.inception_score(lp[pick])[0] for lp in self.log_probs]
        if self.rewards is not None:
            out["reward_mean"] = self.rewards @ counts / counts.sum()
        if self.pixels is not None and ref_pixels is not None:
            out[PIXEL_METRIC] = ref_pixels.fds(self.pixels, counts)
        return {name: {k: float(out[k][i]) for k in self.keys}
                for i, name in enumerate(self.names)}


def bootstrap_intervals(ref_features: np.ndarray, sets: Mapping[str, PerSample],
                        labels: np.ndarray, seed: int,
                        replicates: int = BOOTSTRAP_REPLICATES,
                        pairs: Mapping[str, tuple[str, str]] | None = None,
                        keys: Sequence[str] = INTERVAL_METRICS,
                        means: Mapping[str, tuple[str, Sequence[str]]] | None = None,
                        ref_labels: np.ndarray | None = None,
                        ref_pixels: np.ndarray | None = None
                        ) -> dict[str, dict[str, float]]:
    """95% bias-shifted percentile intervals of `keys` for each generated set, resampling the
    generated samples (within each class, so every replicate stays class-balanced) and the
    reference set (within each class of `ref_labels` when given); and paired intervals of the
    differences second - first for each
    `pairs[name] = (first, second)` (default: {"diff": the two sets} when there are two): one
    resample of sample indices serves every set, whose row i shares its label and noise.

    Bias-shifted (not Efron's BC, which needs replicates on both sides of the full-set value):
    the 2.5/97.5 percentiles of the replicates, shifted by the replicates' mean minus the
    full-set value. FD needs it: resampled duplicates lower the effective count
    and FD grows as counts fall, so its replicates sit above the full-set value (on the default
    digits by ~0.5 for gFD 0.64); for means (accuracy, reward) the shift is ~0.

    `means[name] = (first, seconds)`: the replicates' std of the mean over `seconds` of the
    paired differences second - first, as {metric_sd} under out[name]: the sample noise of
    a mean over RL seeds that share one evaluation draw (which a spread across seeds cannot
    show; `across_seeds` adds it).

    `ref_labels`: the reference's classes. The pipeline's splits are class-stratified, so their
    class counts are fixed by design, and a resample that varied them would add noise no
    repeat of the experiment has: the evaluator's features cluster by class, and FD's mean
    term follows the class proportions. Measured on the default digits (1000 maskgit samples,
    gFD-eval 0.60): [0.17, 1.26] with the reference resampled at random, [0.49, 0.75] within
    classes, [0.53, 0.69] with the reference held fixed.

    `ref_pixels`: the reference's pixel features, row for row (resampled with the same rows),
    for PIXEL_METRIC in `keys`.

    Returns {name: {metric_ci_low, metric_ci_high}} per set and per pair."""
    names = list(sets)
    if pairs is None:
        pairs = {"diff": (names[0], names[1])} if len(names) == 2 else {}
    labels = np.asarray(labels)
    stacked = _Stacked(sets, labels, keys)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if ref_labels is not None and len(ref_labels) != len(ref_features):
        raise ValueError(f"ref_labels has {len(ref_labels)} rows, the reference {len(ref_features)}")
    ref_by_class = ([np.arange(len(ref_features))] if ref_labels is None else
                    [np.flatnonzero(ref_labels == c) for c in np.unique(ref_labels)])
    if PIXEL_METRIC in keys and (ref_pixels is None or len(ref_pixels) != len(ref_features)):
        raise ValueError(f"{PIXEL_METRIC} needs ref_pixels, one row per reference row")

    def pixel_ref(picked: np.ndarray) -> Reference | None:
        if ref_pixels is None or PIXEL_METRIC not in keys:
            return None
        return Reference(np.asarray(ref_pixels, np.float64)[picked])

    everything = np.arange(len(ref_features))
    point = stacked.metrics(Reference(ref_features), None, pixel_ref(everything))
    draws: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(replicates):
        rows = np.concatenate([rng.choice(idx, len(idx)) for idx in by_class])
        picked = np.concatenate([rng.choice(idx, len(idx)) for idx in ref_by_class])
        for name, values in stacked.metrics(Reference(ref_features[picked]), rows,
                                            pixel_ref(picked)).items():
            draws[name].append(values)

    def interval(values: np.ndarray, full: float, key: str,
                 bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict[str, float]:
        low, high = np.clip(np.percentile(values, [2.5, 97.5]) - (values.mean() - full), *bounds)
        return {f"{key}_ci_low": float(low), f"{key}_ci_high": float(high)}

    out: dict[str, dict[str, float]] = {}
    for name in names:
        out[name] = {}
        for key in keys:
            out[name].update(interval(np.array([d[key] for d in draws[name]]),
                                      point[name][key], key, METRIC_RANGE[key]))
    for pair, (first, second) in pairs.items():
        out[pair] = {}
        for key in keys:
            diffs = np.array([b[key] - a[key] for a, b in
                              zip(draws[first], draws[second], strict=True)])
            out[pair].update(interval(diffs, point[second][key] - point[first][key], key))
    for name, (first, seconds) in (means or {}).items():
        out[name] = {}
        for key in keys:
            mean_diffs = np.mean([[d[key] for d in draws[second]] for second in seconds], 0) \
                - np.array([d[key] for d in draws[first]])
            out[name][f"{key}_sd"] = float(mean_diffs.std(ddof=1))
    return out


def with_interval(values: Mapping[str, float], key: str, sign: bool = False) -> str:
    """values[key] as report text, "1.23 [1.10, 1.40]" when values carry key's finite 95%
    interval (key_ci_low, key_ci_high), else the number alone ("n/a" when not finite);
    `sign` writes a difference: "+0.12 [-0.03, +0.27]"."""
    value = values[key]
    if not np.isfinite(value):
        return "n/a"
    text = f"{value:+.4g}" if sign else f"{value:.4g}"
    low, high = values.get(f"{key}_ci_low", np.nan), values.get(f"{key}_ci_high", np.nan)
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{low:+.3g}, {high:+.3g}]" if sign else f" [{low:.4g}, {high:.4g}]"
    return text


def across_seeds(values: Sequence[float], sample_sd: float = 0.0
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of one number per RL seed and its 95% interval,
    mean +- sqrt((t(0.975, n - 1) s / sqrt(n))^2 + (1.96 sample_sd)^2): Student-t over the
    seeds (the noise between RL runs), widened by `sample_sd`, the bootstrap std of the same
    mean (the noise of the one evaluation draw every seed shares, which the spread across
    seeds cannot show). With one seed the interval is (nan, nan), as nothing says how far
    another seed would land. With 3 seeds t = 4.30: the interval is wide, by design (it is
    what 3 runs can say)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    seeds_half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    half = float(np.hypot(seeds_half, 1.959964 * sample_sd))
    return mean, mean - half, mean + half
