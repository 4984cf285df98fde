"""What the evaluate stage concludes across RL seeds and against the guided base.

One RL run is one draw: on the default digits the sign of its gFD change moved with the seed.
`rl.seeds` gives several fine-tunings of one base; evaluate samples each with the same labels and
noise, and this module aggregates them:

- per seed, the evaluator's numbers and the paired bootstrap interval of its difference to the
  base (one evaluation's sample noise);
- over seeds, the mean difference and its 95% interval: Student-t across seeds (the noise
  between RL runs, which the bootstrap cannot see) widened by the bootstrap std of that mean
  (the noise of the one evaluation draw all seeds share, which the spread cannot see);
- "does RL distil guidance?": RL at its own CFG scale against the base at its best CFG scale
  (the lowest gFD-eval of evaluate.cfg_sweep), sampled at the evaluation's count with the same
  labels and noise, so the numbers compare. The verdict is "not shown worse at 95%", and the
  report says so next to the point estimates: with 3 seeds the interval is wide, so "not shown
  worse" is a weak claim and is never printed as "as good".

Pure functions of the nested metrics dict that tasks/evaluate.py builds ({set name: {metric:
value, metric_ci_low: ..., ...}}), so they are tested without sampling anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentforge.figures import points_with_intervals
from latentforge.intervals import across_seeds, with_interval

# Metrics aggregated over seeds (each set has them; intervals where the bootstrap gives one).
SEED_METRICS = ("eval_accuracy", "gfd_eval", "is_eval", "reward_mean", "precision", "recall",
                "diversity", "fd_pixels")
# The guidance-distillation comparison: accuracy up to the guided base's, gFD no worse, and
# diversity kept within this fraction of the guided base's. (Guidance itself costs diversity:
# on the default digits CFG 1.25 has 30% less than CFG 1, so "RL at CFG 1 does what CFG does"
# is measured against the guided base's diversity; the ratio to the unguided base is reported
# beside it.)
DISTIL_METRICS = ("eval_accuracy", "gfd_eval", "diversity", "recall", "fd_pixels")
VERDICT_METRICS = ("eval_accuracy", "gfd_eval", "diversity")  # what the verdict reads
DIVERSITY_KEPT = 0.9
MIN_SEEDS_FOR_CLAIM = 3
SEEDS_PNG = "rl_seeds.png"


@dataclass(frozen=True)
class SeedSet:
    """Where one RL seed's numbers live in the nested metrics."""

    seed: int
    samples: str  # its generated set: "rl" for the first seed, "rl_seed<n>" for the others
    diff: str  # its paired difference to the base: "diff" or "diff_seed<n>"


def _interval(out: dict[str, float], key: str, mean: float, low: float, high: float) -> None:
    """out[key] = mean, with key_ci_low/high where there is an interval (not with one seed:
    the DVC metrics hold finite numbers only)."""
    out[key] = mean
    if np.isfinite(low) and np.isfinite(high):
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high


def seed_sets(first: int | None, others: Sequence[int]) -> list[SeedSet]:
    """The first seed (None: an rl folder from before rl.seeds, one unnamed seed) and the
    others, in rl.seeds order."""
    sets = [SeedSet(-1 if first is None else first, "rl", "diff")]
    return sets + [SeedSet(s, f"rl_seed{s}", f"diff_seed{s}") for s in others]


def seeds_summary(nested: Mapping[str, Mapping[str, float]], seeds: Sequence[SeedSet],
                  sample_sd: Mapping[str, float] | None = None) -> dict[str, float]:
    """Over seeds: n, the mean of each metric, and the mean difference to the base with its
    95% interval across seeds (none with one seed), widened by sample_sd[f"{metric}_sd"]
    (the bootstrap std of the mean difference) where given."""
    sd = sample_sd or {}
    out: dict[str, float] = {"n": float(len(seeds))}
    base = nested["base"]
    for key in SEED_METRICS:
        if not all(key in nested[s.samples] for s in seeds) or key not in base:
            continue
        out[f"mean_{key}"] = float(np.mean([nested[s.samples][key] for s in seeds]))
        _interval(out, f"diff_{key}",
                  *across_seeds([nested[s.samples][key] - base[key] for s in seeds],
                                sd.get(f"{key}_sd", 0.0)))
    return out


def distil_summary(nested: Mapping[str, Mapping[str, float]], seeds: Sequence[SeedSet],
                   guided: str, guided_scale: float, rl_scale: float,
                   sample_sd: Mapping[str, float] | None = None,
                   base_scale: float | None = None) -> dict[str, float]:
    """RL (mean over seeds, at rl_scale) against the base at its best CFG scale (the set named
    `guided`), and whether RL distils guidance. The differences RL - guided base are paired
    (same labels and noise); their 95% interval is Student-t across seeds widened by
    sample_sd (as in seeds_summary), or with one seed the paired bootstrap interval
    nested[f"{samples}_vs_guided"]:
      accuracy_not_lower: RL's accuracy is not shown lower than the guided base's (the upper
        end of the difference's interval >= 0);
      gfd_not_higher: RL's gFD-eval is not shown higher (the lower end of the difference's
        interval <= 0);
      diversity_kept: RL's mean diversity >= DIVERSITY_KEPT x the guided base's (the ratio to
        the base as the evaluation sampled it, at base_scale (default: rl_scale), is
        diversity_ratio_to_base);
      not_shown_worse: all three, over at least MIN_SEEDS_FOR_CLAIM seeds; absent with fewer
        (undetermined: a 0 there read as a verdict in MLflow and `dvc exp show`)."""
    sd = sample_sd or {}
    g = nested[guided]
    out: dict[str, float] = {"guided_cfg_scale": guided_scale, "rl_cfg_scale": rl_scale,
                             "base_cfg_scale": rl_scale if base_scale is None else base_scale,
                             "seeds": float(len(seeds))}
    for key in DISTIL_METRICS:
        if key not in VERDICT_METRICS and not all(
                key in nested[x] for x in (guided, *(s.samples for s in seeds))):
            continue  # a row beside the verdict, only where every set was graded for it
        out[f"guided_{key}"] = g[key]
        for end in ("ci_low", "ci_high"):
            if f"{key}_{end}" in g:
                out[f"guided_{key}_{end}"] = g[f"{key}_{end}"]
        values = [nested[s.samples][key] for s in seeds]
        mean, low, high = across_seeds(values)
        if len(seeds) == 1 and f"{key}_ci_low" in nested[seeds[0].samples]:
            low, high = (nested[seeds[0].samples][f"{key}_{e}"] for e in ("ci_low", "ci_high"))
        _interval(out, f"rl_{key}", mean, low, high)
        diff = across_seeds([v - g[key] for v in values], sd.get(f"{key}_sd", 0.0))
        paired = nested.get(f"{seeds[0].samples}_vs_guided", {})
        if len(seeds) == 1 and f"{key}_ci_low" in paired:
            diff = (diff[0], paired[f"{key}_ci_low"], paired[f"{key}_ci_high"])
        _interval(out, f"rl_minus_guided_{key}", *diff)
    out["diversity_ratio_to_base"] = out["rl_diversity"] / max(nested["base"]["diversity"], 1e-12)
    out["diversity_ratio_to_guided"] = out["rl_diversity"] / max(g["diversity"], 1e-12)
    tol = 1e-9  # a mean of equal numbers may round past them
    acc_high = out.get("rl_minus_guided_eval_accuracy_ci_high", np.nan)
    gfd_low = out.get("rl_minus_guided_gfd_eval_ci_low", np.nan)
    checks = {"accuracy_not_lower": bool(np.isfinite(acc_high)) and acc_high >= -tol,
              "gfd_not_higher": bool(np.isfinite(gfd_low)) and gfd_low <= tol,
              "diversity_kept": out["diversity_ratio_to_guided"] >= DIVERSITY_KEPT - tol}
    out.update({k: float(v) for k, v in checks.items()})
    if len(seeds) >= MIN_SEEDS_FOR_CLAIM:
        out["not_shown_worse"] = float(all(checks.values()))
    return out


TABLE_METRICS = (("eval_accuracy", "accuracy"), ("gfd_eval", "gFD-eval"),
                 ("fd_pixels", "FD-pixels"), ("diversity", "diversity"),
                 ("reward_mean", "reward"))


def seeds_section(nested: Mapping[str, Mapping[str, float]], seeds: Sequence[SeedSet]
                  ) -> list[str]:
    """The report's per-seed table, the mean over seeds, and the distillation verdict."""
    if "seeds" not in nested:
        return []
    agg, base = nested["seeds"], nested["base"]
    head = "| RL seed | " + " | ".join(f"{label} | delta {label}" for _, label in TABLE_METRICS)
    lines = ["## RL seeds", "",
             f"{len(seeds)} RL fine-tunings of the same base (`rl.seeds`), sampled with the "
             "evaluation's labels and noise. Per seed, [low, high] is the paired bootstrap "
             "interval of its difference to the base (sample noise only); the mean row's is the "
             "95% Student-t interval across seeds (the noise between RL runs) widened by the "
             "bootstrap std of the mean (the sample noise of the draw all seeds share); none "
             "with one seed.", "", head + " |", "|---|" + "---|---|" * len(TABLE_METRICS)]
    for s in seeds:
        cells = []
        for key, _ in TABLE_METRICS:
            diff = nested[s.diff] if key in nested[s.diff] else \
                {key: nested[s.samples][key] - base[key]}
            cells += [with_interval(nested[s.samples], key), with_interval(diff, key, sign=True)]
        name = "(unnamed)" if s.seed < 0 else str(s.seed)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for key, _ in TABLE_METRICS:
        if f"mean_{key}" in agg:
            cells += [f"{agg[f'mean_{key}']:.4g}", with_interval(agg, f"diff_{key}", sign=True)]
        else:
            cells += ["", ""]
    lines += [f"| **mean of {len(seeds)}** | " + " | ".join(cells) + " |", ""]
    if "distil" in nested:
        lines += distil_lines(nested["distil"])
    return lines


def distil_lines(d: Mapping[str, float]) -> list[str]:
    def verdict(flag: str) -> str:
        return "yes" if d[flag] else "**no**"

    def ahead(key: str, higher: bool) -> str:
        diff = d[f"rl_minus_guided_{key}"]
        better = diff > 0 if higher else diff < 0
        return f"{abs(diff):.3g} {'ahead of' if better else 'behind'} the guided base"

    n = int(d["seeds"])
    return [
        "### Does RL distil guidance?", "",
        f"RL at CFG {d['rl_cfg_scale']:g} (mean of {n} seed{'s' * (n != 1)}) against the base "
        f"at its best CFG scale, {d['guided_cfg_scale']:g} (lowest gFD-eval in the sweep), "
        "sampled at this evaluation's count with the same labels and noise:", "",
        "Intervals: RL's and the difference's are 95% Student-t across seeds, the difference's "
        "widened by the sample noise of the draw all seeds share (paired bootstrap with one "
        "seed); the guided base's, its bootstrap over samples. None holds the noise of "
        "training the earlier stages (tokenizer, judge, evaluator, base), one training each: "
        "on the default digits the verdict held over three generator seeds and turned around "
        "where other fp32 kernels trained those stages (README, \"What `latentforge run` "
        "does\").", "",
        "| metric | RL (mean, 95% interval) | base at best CFG | RL - guided base |",
        "|---|---|---|---|",
        *(f"| {label} | {with_interval(d, f'rl_{key}')} | {with_interval(d, f'guided_{key}')} | "
          f"{with_interval(d, f'rl_minus_guided_{key}', sign=True)} |"
          for key, label in (("eval_accuracy", "evaluator accuracy ↑"),
                             ("gfd_eval", "gFD-eval ↓"), ("diversity", "diversity ↑"),
                             ("recall", "recall ↑"),
                             ("fd_pixels", "FD-pixels ↓ (raw pixels, no network; not in the "
                                           "verdict)"))
          if f"rl_{key}" in d),
        "",
        f"- evaluator accuracy not shown lower than the guided base's (the upper end of the "
        f"difference's interval >= 0): {verdict('accuracy_not_lower')}",
        f"- gFD-eval not shown higher (the lower end of the difference's interval <= 0): "
        f"{verdict('gfd_not_higher')}",
        f"- diversity within {1 - DIVERSITY_KEPT:.0%} of the guided base's (ratio "
        f"{d['diversity_ratio_to_guided']:.3f}; to the "
        f"{'unguided ' if d.get('base_cfg_scale', d['rl_cfg_scale']) == 1 else ''}base at CFG "
        f"{d.get('base_cfg_scale', d['rl_cfg_scale']):g}: {d['diversity_ratio_to_base']:.3f}): "
        f"{verdict('diversity_kept')}",
        "- **RL not shown worse than the guided base at 95%: "
        + (f"{'yes' if d.get('not_shown_worse') else 'no'}**" if n >= MIN_SEEDS_FOR_CLAIM else
           f"undetermined** (a claim needs at least {MIN_SEEDS_FOR_CLAIM} seeds; this run has "
           f"{n}, so distil.not_shown_worse is not logged)"),
        f"- point estimates: RL is {ahead('eval_accuracy', higher=True)} in accuracy and "
        f"{ahead('gfd_eval', higher=False)} in gFD-eval. \"Not shown worse\" is not \"as good\": "
        "an interval that holds 0 also holds the differences at its ends.", "",
    ]


def seeds_plot(nested: Mapping[str, Mapping[str, float]], seeds: Sequence[SeedSet],
               base_scale: float) -> bytes:
    """Evaluator accuracy, gFD-eval and diversity: the base, each RL seed (bootstrap
    interval), the mean over seeds (t-interval) and, when swept, the base at its best CFG."""
    agg = nested["seeds"]
    panels = []
    for key, title in (("eval_accuracy", "evaluator accuracy ↑"), ("gfd_eval", "gFD-eval ↓"),
                       ("diversity", "diversity ↑")):
        def point(label: str, values: Mapping[str, float], k: str = key
                  ) -> tuple[str, float, float, float]:
            return (label, values[k], values.get(f"{k}_ci_low", np.nan),
                    values.get(f"{k}_ci_high", np.nan))

        points = [point(f"base CFG {base_scale:g}", nested["base"])]
        points += [point("RL" if s.seed < 0 else f"RL seed {s.seed}", nested[s.samples])
                   for s in seeds]
        base_value = nested["base"][key]
        mean_row = {"m": agg[f"mean_{key}"],
                    "m_ci_low": base_value + agg.get(f"diff_{key}_ci_low", np.nan),
                    "m_ci_high": base_value + agg.get(f"diff_{key}_ci_high", np.nan)}
        points.append(point(f"RL mean of {len(seeds)}", mean_row, "m"))
        if "distil" in nested:
            d = nested["distil"]
            points.append(point(f"base CFG {d['guided_cfg_scale']:g} (best)",
                                {k.removeprefix("guided_"): v for k, v in d.items()
                                 if k.startswith("guided_")}))
        panels.append((title, points))
    return points_with_intervals(panels)
