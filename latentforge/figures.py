"""Report figures: matplotlib pictures as PNG bytes, built without pyplot (no global backend
state, safe in threads and Prefect workers) and without Software/date chunks, so that a rerun
writes identical bytes and DVC sees no change."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def figure_png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib Figure; no Software/date chunks, so reruns give equal bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def new_figure(panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    # Figure without pyplot: no global backend state, safe in threads and Prefect workers.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=100, layout="tight")
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def style_axes(ax: Any, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and token counts
    # Each tick in full, with the digits that tell them apart (231.105, 0.00002): matplotlib's
    # shared offset or exponent text ("+2.311e2", "1e-5") sits above the axes, over the title.
    if ax.get_yscale() == "linear":
        plain = ScalarFormatter(useOffset=False)
        plain.set_scientific(False)
        ax.yaxis.set_major_formatter(plain)
    ax.grid(alpha=0.3)


# Columns of the rl stage's curve shown next to the reward: the leash, the quality watch on the
# fixed evaluation sample (reward hacking = reward up while gFD-eval goes up too), clipping.
WATCH_COLUMNS = {"kl": "KL to reference (per dim)", "eval_gfd_eval": "gFD-eval, eval sample",
                 "eval_eval_accuracy": "evaluator accuracy, eval sample",
                 "clip_fraction": "clip fraction",
                 "approx_kl": "approx. KL to rollout policy (per dim)"}


def reward_plot(curve: Mapping[str, np.ndarray]) -> bytes:
    """Mean rollout reward (+- std) per RL update, and next to it the watch columns."""
    extra = [c for c in WATCH_COLUMNS if c in curve and np.isfinite(curve[c]).any()]
    fig, axes = new_figure(1 + len(extra), width=3.6)
    step = curve["step"]
    mean = curve["reward_mean"]
    axes[0].plot(step, mean, marker="o", ms=3, label="rollouts")
    if "reward_std" in curve:
        std = curve["reward_std"]
        axes[0].fill_between(step, mean - std, mean + std, alpha=0.25, label="+- std")
    if "eval_reward_mean" in curve and np.isfinite(curve["eval_reward_mean"]).any():
        ok = np.isfinite(curve["eval_reward_mean"])
        axes[0].plot(step[ok], curve["eval_reward_mean"][ok], marker="s", ms=4, ls="--",
                     label="eval sample")
    axes[0].legend(loc="best", fontsize=8)
    axes[0].set_title("RL reward")
    for ax, col in zip(axes[1:], extra, strict=True):
        ok = np.isfinite(curve[col])
        ax.plot(step[ok], curve[col][ok], marker="o", ms=3, color="tab:red")
        ax.set_title(WATCH_COLUMNS[col], fontsize="medium")  # the long ones fit the panel
    for ax in axes:
        style_axes(ax, "RL update")
    return figure_png(fig)


def prefix_plot(prefix: Sequence[tuple[int, float]]) -> bytes:
    """Val PSNR of reconstructions from the first k tokens (the tokenizer stage and the
    report)."""
    fig, (ax,) = new_figure(1, width=5.0)
    ax.plot([k for k, _ in prefix], [v for _, v in prefix], marker="o")
    style_axes(ax, "tokens kept (prefix length)")
    ax.set_ylabel("val PSNR (dB)")
    ax.set_title("Reconstruction per prefix length")
    return figure_png(fig)


def losses_plot(curves: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    fig, axes = new_figure(len(curves), width=3.6)
    for ax, (stage, curve) in zip(axes, curves.items(), strict=True):
        ok = np.isfinite(curve["loss"])
        ax.plot(curve["step"][ok], curve["loss"][ok])
        loss = curve["loss"][ok]
        if len(loss) and loss.min() > 0 and loss.max() > 10 * loss.min():
            ax.set_yscale("log")  # a loss spanning decades: log scale shows the late steps
        ax.set_title(f"{stage} training loss")
        style_axes(ax, "step")
    return figure_png(fig)


def side_by_side(grids: Mapping[str, np.ndarray], gap: int = 12, header: int = 18) -> np.ndarray:
    """Grids (H, W, 3) next to each other under their titles, on one canvas."""
    from PIL import Image, ImageDraw

    width = sum(g.shape[1] for g in grids.values()) + gap * (len(grids) - 1)
    height = header + max(g.shape[0] for g in grids.values())
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, grid in grids.items():
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(grid), (x, header))
        x += grid.shape[1] + gap
    return np.asarray(canvas)


def points_with_intervals(panels: Sequence[tuple[str, Sequence[tuple[str, float, float, float]]]],
                          references: Mapping[str, Mapping[str, float]] | None = None) -> bytes:
    """One panel per (title, points); each point (label, value, low, high) is drawn with its
    interval as an error bar (none where low or high is nan), left to right in the given
    order. `references[title]` draws labelled horizontal lines (e.g. another model's value)."""
    fig, axes = new_figure(len(panels), width=max(3.6, 0.75 * max(len(p) for _, p in panels)))
    for ax, (title, points) in zip(axes, panels, strict=True):
        x = np.arange(len(points))
        for i, (_, value, low, high) in enumerate(points):
            # The segment is drawn from its ends, not as +- errors: a bias-shifted bootstrap
            # interval need not hold its point value.
            if np.isfinite(low) and np.isfinite(high):
                ax.vlines(i, low, high, color="tab:blue")
                ax.hlines([low, high], i - 0.08, i + 0.08, color="tab:blue")
            ax.plot([i], [value], "o", color="tab:blue")
        for j, (name, level) in enumerate((references or {}).get(title, {}).items()):
            ax.axhline(level, ls="--", lw=1, color=f"C{j + 1}", label=name)
        if (references or {}).get(title):
            ax.legend(loc="best", fontsize=7)
        ax.set_xticks(x, [label for label, *_ in points], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    return figure_png(fig)
