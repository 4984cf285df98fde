"""The interval arithmetic on known cases: the weighted, batched FD of a resample against FD of
the resampled rows themselves, the t-interval across seeds, and the seed aggregate and the
guidance verdict of tasks/compare.py on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from latentforge import intervals, metrics
from latentforge.tasks import compare


def test_weighted_fd_of_a_resample_is_fd_of_the_resampled_rows() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 6))
    sets = rng.normal(size=(3, 120, 6)) @ rng.normal(size=(6, 6))
    rows = rng.integers(0, 120, 120)
    counts = np.bincount(rows, minlength=120)
    got = intervals.Reference(ref).fds(sets, counts)
    for s in range(3):
        # float64 throughout; the two routes sum in other orders, so equal to rounding only.
        assert got[s] == pytest.approx(metrics.fd_from_features(ref, sets[s][rows]), rel=1e-9)


def test_a_metric_without_a_bootstrap_is_refused() -> None:
    s = intervals.PerSample(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="reward_mean asked of a set scored without rewards"):
        intervals.bootstrap_intervals(np.zeros((4, 2)), {"a": s}, np.arange(4), seed=0)
    with pytest.raises(ValueError, match="no bootstrap for metric 'recall'"):
        intervals.bootstrap_intervals(np.zeros((4, 2)), {"a": s}, np.arange(4), seed=0,
                                      keys=("recall",))


def test_interval_across_seeds_is_students_t() -> None:
    mean, low, high = intervals.across_seeds([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.3027; s = 1; half width = 4.3027 / sqrt(3)
    assert mean == 2.0 and high - mean == pytest.approx(4.3027 / np.sqrt(3), rel=1e-4)
    assert mean - low == pytest.approx(high - mean)
    # The shared draw's sample noise widens it: half widths add in quadrature.
    _, low2, high2 = intervals.across_seeds([1.0, 2.0, 3.0], sample_sd=1.0)
    assert high2 - 2.0 == pytest.approx(np.hypot(4.3027 / np.sqrt(3), 1.96), rel=1e-4)
    mean, low, high = intervals.across_seeds([0.7])
    assert mean == 0.7 and np.isnan(low) and np.isnan(high)


def nested(rl_values: list[dict[str, float]], guided: dict[str, float]) -> dict:
    base = {"eval_accuracy": 0.95, "gfd_eval": 0.6, "diversity": 6.0, "recall": 0.9,
            "is_eval": 9.0, "reward_mean": -0.2, "precision": 0.9}
    out = {"base": base, "guided": {**base, **guided}}
    for i, values in enumerate(rl_values):
        out["rl" if i == 0 else f"rl_seed{i}"] = {**base, **values}
    return out


def test_seed_aggregate_and_the_distillation_verdict() -> None:
    seeds = compare.seed_sets(0, [1, 2])
    n = nested([{"eval_accuracy": 0.99, "gfd_eval": 0.30, "diversity": 5.8},
                {"eval_accuracy": 0.99, "gfd_eval": 0.32, "diversity": 5.7},
                {"eval_accuracy": 0.99, "gfd_eval": 0.31, "diversity": 5.9}],
               {"eval_accuracy": 0.99, "gfd_eval": 0.40, "diversity": 4.0,
                "gfd_eval_ci_low": 0.1, "gfd_eval_ci_high": 0.9})
    agg = compare.seeds_summary(n, seeds)
    assert agg["n"] == 3 and agg["mean_gfd_eval"] == pytest.approx(0.31)
    assert agg["diff_gfd_eval"] == pytest.approx(0.31 - 0.6)
    assert agg["diff_gfd_eval_ci_low"] < agg["diff_gfd_eval"] < agg["diff_gfd_eval_ci_high"]
    d = compare.distil_summary(n, seeds, "guided", 1.25, 1.0)
    assert d["accuracy_not_lower"] == d["gfd_not_higher"] == d["diversity_kept"] == 1.0
    assert d["not_shown_worse"] == 1.0
    assert d["guided_gfd_eval_ci_high"] == 0.9
    assert d["diversity_ratio_to_guided"] == pytest.approx(5.8 / 4.0)
    # Diversity more than 10% below the guided base's fails; so does a gFD interval that
    # reaches above the guided base's, or fewer than three seeds.
    n["guided"]["diversity"] = 7.0  # RL's mean 5.8 is 0.83 of it
    assert compare.distil_summary(n, seeds, "guided", 1.25, 1.0)["diversity_kept"] == 0.0
    n["guided"]["diversity"] = 4.0
    for name in ("rl", "rl_seed1", "rl_seed2"):  # consistently above the guided base's 0.40
        n[name]["gfd_eval"] += 0.2
    d = compare.distil_summary(n, seeds, "guided", 1.25, 1.0)
    assert d["rl_minus_guided_gfd_eval_ci_low"] > 0
    assert d["gfd_not_higher"] == 0.0 and d["not_shown_worse"] == 0.0
    assert "not_shown_worse" not in compare.distil_summary(n, seeds[:2], "guided", 1.25, 1.0)
    # The ratio to the base names the scale the base was sampled at (evaluate.cfg_scale null:
    # the generator's own 1.5, beside RL's 1), not RL's.
    text = "\n".join(compare.distil_lines(compare.distil_summary(n, seeds, "guided", 1.25, 1.0,
                                                                 base_scale=1.5)))
    assert "to the base at CFG 1.5: " in text and "unguided" not in text
    text = "\n".join(compare.distil_lines(d))
    assert "to the unguided base at CFG 1: " in text


def test_one_seed_has_no_interval_across_seeds() -> None:
    seeds = compare.seed_sets(0, [])
    n = nested([{"gfd_eval": 0.5, "gfd_eval_ci_low": 0.2, "gfd_eval_ci_high": 0.8}], {})
    n["rl_vs_guided"] = {"gfd_eval_ci_low": -0.3, "gfd_eval_ci_high": 0.1,
                         "eval_accuracy_ci_low": -0.02, "eval_accuracy_ci_high": 0.01}
    agg = compare.seeds_summary(n, seeds)
    assert "diff_gfd_eval" in agg and "diff_gfd_eval_ci_low" not in agg
    d = compare.distil_summary(n, seeds, "guided", 1.0, 1.0)
    # One seed: its bootstrap intervals stand in, and the verdict names what is missing.
    assert (d["rl_gfd_eval_ci_low"], d["rl_gfd_eval_ci_high"]) == (0.2, 0.8)
    assert d["rl_minus_guided_gfd_eval_ci_low"] == -0.3
    assert d["gfd_not_higher"] == d["accuracy_not_lower"] == 1.0
    assert "not_shown_worse" not in d  # undetermined: no 0 that reads as a verdict
    text = "\n".join(compare.distil_lines(d))
    # Every check passed, and one seed cannot carry the claim: undetermined, not "no".
    assert "RL not shown worse than the guided base at 95%: undetermined** (a claim needs at " \
           "least 3 seeds; this run has 1" in text
    assert "at 95%: no" not in text
    d["seeds"] = 3.0
    assert "at 95%: no**" in "\n".join(compare.distil_lines(d))


def test_the_sample_noise_of_a_mean_over_seeds_is_the_replicates_std() -> None:
    """Seeds that differ from the base by a constant share its sample noise exactly: the
    mean difference has no sample noise; a seed with its own noise gives it some."""
    rng = np.random.default_rng(0)
    n, classes = 200, 4
    labels = np.repeat(np.arange(classes), n // classes)
    logp = np.log(np.full((n, classes), 1.0 / classes))
    feats = rng.normal(size=(n, 3))
    base = intervals.PerSample(feats, logp, rng.normal(size=n))
    sets = {"base": base,
            "a": intervals.PerSample(feats, logp, base.rewards + 0.1),
            "b": intervals.PerSample(feats, logp, base.rewards + 0.3),
            "c": intervals.PerSample(feats, logp, rng.normal(size=n))}
    out = intervals.bootstrap_intervals(rng.normal(size=(100, 3)), sets, labels, seed=1,
                                        replicates=100, pairs={},
                                        means={"ab": ("base", ["a", "b"]),
                                               "ac": ("base", ["a", "c"])})
    assert out["ab"]["reward_mean_sd"] == pytest.approx(0.0, abs=1e-12)
    assert out["ab"]["gfd_eval_sd"] == pytest.approx(0.0, abs=1e-12)
    # (c - base) / 2 of independent unit normals: std sqrt(2) / 2 / sqrt(n) per replicate
    assert out["ac"]["reward_mean_sd"] == pytest.approx(np.sqrt(2) / 2 / np.sqrt(n), rel=0.3)


def test_the_reference_resample_keeps_its_class_counts_when_given_them() -> None:
    """With the reference's labels, each replicate resamples within each class: features that
    cluster by class (as an evaluator's do) then give FD intervals without the noise of class
    proportions, which a stratified split fixes. Without labels the reference is resampled
    whole, and the same set's interval is several times wider."""
    rng = np.random.default_rng(0)
    classes, dim = 10, 8
    centres = rng.normal(scale=8.0, size=(classes, dim))
    ref_labels = np.repeat(np.arange(classes), 150)
    ref = centres[ref_labels] + rng.normal(size=(len(ref_labels), dim))
    labels = np.repeat(np.arange(classes), 50)
    gen = intervals.PerSample(centres[labels] + rng.normal(size=(len(labels), dim)),
                              np.zeros((len(labels), classes)))
    kwargs = {"seed": 0, "replicates": 100, "keys": ("gfd_eval",)}
    whole = intervals.bootstrap_intervals(ref, {"g": gen}, labels, **kwargs)["g"]
    within = intervals.bootstrap_intervals(ref, {"g": gen}, labels, ref_labels=ref_labels,
                                           **kwargs)["g"]
    width = {name: iv["gfd_eval_ci_high"] - iv["gfd_eval_ci_low"]
             for name, iv in (("whole", whole), ("within", within))}
    assert width["whole"] > 2 * width["within"] > 0, width  # measured 4.4-5.4x (3 seeds)
    with pytest.raises(ValueError, match="ref_labels has 3 rows, the reference 1500"):
        intervals.bootstrap_intervals(ref, {"g": gen}, labels, ref_labels=ref_labels[:3],
                                      **kwargs)


def test_fd_pixels_is_bootstrapped_on_its_own_reference_with_the_same_resamples() -> None:
    """FD-pixels rides the evaluator metrics' resamples: asking for it changes none of their
    intervals; its own interval follows the pixel features, with the reference's pixel rows
    drawn with its feature rows."""
    rng = np.random.default_rng(0)
    classes, dim, pdim = 4, 3, 5
    labels = np.repeat(np.arange(classes), 50)
    ref_labels = np.repeat(np.arange(classes), 80)
    ref, ref_px = rng.normal(size=(len(ref_labels), dim)), rng.normal(size=(len(ref_labels), pdim))
    logp = np.log(np.full((len(labels), classes), 1.0 / classes))
    feats = rng.normal(size=(len(labels), dim))
    like = intervals.PerSample(feats, logp, pixels=rng.normal(size=(len(labels), pdim)))
    shifted = intervals.PerSample(feats, logp, pixels=rng.normal(size=(len(labels), pdim)) + 1.0)
    sets = {"like": like, "shifted": shifted}
    kwargs = {"seed": 3, "replicates": 60, "ref_labels": ref_labels}
    plain = intervals.bootstrap_intervals(ref, sets, labels, keys=("eval_accuracy", "gfd_eval"),
                                          **kwargs)
    both = intervals.bootstrap_intervals(ref, sets, labels, ref_pixels=ref_px,
                                         keys=("eval_accuracy", "gfd_eval", "fd_pixels"), **kwargs)
    for name in ("like", "shifted", "diff"):
        assert {k: v for k, v in both[name].items() if "fd_pixels" not in k} == plain[name]
    # a mean shift of 1 in each of 5 dims: FD about 5 above the like set's, interval and all
    assert both["diff"]["fd_pixels_ci_low"] > 3.5
    assert both["like"]["fd_pixels_ci_high"] < 1.0
    # pixels that are the features, with the reference's pixels its features: FD-pixels'
    # intervals are gFD-eval's, so each replicate draws the pixel reference's rows with its own
    twin = {n: intervals.PerSample(p.features, p.log_probs, pixels=p.features)
            for n, p in sets.items()}
    same = intervals.bootstrap_intervals(ref, twin, labels, ref_pixels=ref,
                                         keys=("gfd_eval", "fd_pixels"), **kwargs)
    for name in ("like", "shifted", "diff"):
        for end in ("ci_low", "ci_high"):
            assert same[name][f"fd_pixels_{end}"] == same[name][f"gfd_eval_{end}"]
    with pytest.raises(ValueError, match="fd_pixels needs ref_pixels"):
        intervals.bootstrap_intervals(ref, sets, labels, keys=("fd_pixels",), **kwargs)
    with pytest.raises(ValueError, match="fd_pixels asked of a set without pixel features"):
        intervals.bootstrap_intervals(ref, {"a": intervals.PerSample(feats, logp)}, labels,
                                      keys=("fd_pixels",), ref_pixels=ref_px, **kwargs)
