"""Every chart the project draws: the evaluation's, the report's and compare's.

matplotlib is imported (headless) when a chart is drawn, torch by the one chart that needs it:
`report` must not load torch, nor `compare` matplotlib without --chart."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    _pyplot().close(fig)


def confusion_matrix(cm: torch.Tensor, path: Path, title: str) -> None:
    plt = _pyplot()
    counts = cm.numpy()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(counts, cmap="Blues")
    dark = counts.max() / 2
    for (i, j), value in np.ndenumerate(counts):
        colour = "white" if value > dark else "black"
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10))
    ax.set_title(f"{title}: confusion matrix (test set)", fontsize=10)
    _save(fig, path)


def misclassified(
    images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor, path: Path, *, title: str
) -> None:
    """The first 36 misclassified test images (`make_grid`), captioned true→predicted."""
    import torch
    from torchvision.utils import make_grid

    cols, pad, count = 6, 6, 36
    wrong = (pred != labels).nonzero().flatten()[:count]
    plt = _pyplot()
    rows = max(1, -(-len(wrong) // cols))
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.15 + 0.4))
    ax.axis("off")
    ax.set_title(f"{title}: misclassified test images (true→predicted)", fontsize=9)
    if len(wrong):
        tiles = 255 - images[wrong].unsqueeze(1)  # dark digits on white
        grid = make_grid(tiles, nrow=cols, padding=pad, pad_value=255)[0]
        ax.imshow(grid.to(torch.uint8).numpy(), cmap="gray", vmin=0, vmax=255)
        size = images.shape[-1] + pad
        for k, i in enumerate(wrong.tolist()):
            r, c = divmod(k, cols)
            x, y = c * size + size / 2 + pad / 2, r * size + pad / 2 - 0.5
            caption = f"{labels[i].item()}→{pred[i].item()}"
            ax.text(x, y, caption, ha="center", va="center", fontsize=7, color="crimson")
    else:
        ax.text(0.5, 0.5, "none: every test image is right", ha="center", va="center")
    _save(fig, path)


def results(table: pd.DataFrame, path: Path, dataset: str) -> None:
    """Left: test accuracy against size, every variant labelled. Right: the variants ranked."""
    plt = _pyplot()
    accuracy = table["test_accuracy"] * 100
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=[1.15, 1])
    left.scatter(table["params"], accuracy, zorder=3)
    from matplotlib.ticker import EngFormatter

    _log_axis(left.xaxis, subs=(1.0, 2.0, 5.0), label=EngFormatter(sep=""))  # 10k, 2M
    low, high = table["params"].min(), table["params"].max()
    left.set_xlim(low / 1.6, high * 4)  # room on the right for the labels
    span = max(accuracy.max() - accuracy.min(), 1.0)
    left.set_ylim(accuracy.min() - 0.12 * span, accuracy.max() + 0.12 * span)
    # Labels to the right of their points, nudged apart vertically where points crowd.
    order = accuracy.sort_values().index
    placed = _spread(accuracy[order].to_list(), gap=0.065 * span)
    line = {"arrowstyle": "-", "color": "0.6", "lw": 0.6}
    for idx, y in zip(order, placed, strict=True):
        x, name = table.loc[idx, "params"], table.loc[idx, "variant"]
        left.annotate(
            name, (x, accuracy[idx]), (x * 1.35, y), fontsize=8, va="center", arrowprops=line
        )
    left.set(xlabel="trainable parameters (log scale)", ylabel="test accuracy, %")
    left.set_title("accuracy against size", fontsize=10)
    left.grid(alpha=0.3)

    ranked = table.assign(acc=accuracy).sort_values("acc")
    right.barh(ranked["variant"], ranked["acc"], color="tab:blue")
    for i, value in enumerate(ranked["acc"]):
        right.text(value + 0.05, i, f"{value:.2f}", va="center", fontsize=8)
    right.set_xlim(max(0.0, ranked["acc"].min() - 2), min(100.0, ranked["acc"].max() + 1))
    right.set_xlabel("test accuracy, %")
    right.set_title("variants ranked", fontsize=10)
    right.tick_params(axis="y", labelsize=8)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{dataset}: test accuracy of every variant (10,000 test images)")
    fig.tight_layout()
    _save(fig, path)


def _log_axis(axis, subs: tuple[float, ...], label) -> None:
    """A log x axis, major ticks at `subs` times powers of ten labelled by `label`."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(label)
    axis.set_minor_formatter(NullFormatter())


def _spread(values: list[float], gap: float) -> list[float]:
    """Sorted positions moved at least `gap` apart, centred on where they were."""
    placed: list[float] = []
    for v in values:
        placed.append(max(v, placed[-1] + gap) if placed else v)
    shift = (sum(placed) - sum(values)) / max(len(values), 1)
    return [p - shift for p in placed]


def comparison(table: pd.DataFrame, path: Path, experiment: str) -> None:
    """Per variant and host · device: accuracy and throughput bars, each form's latency dots."""
    plt = _pyplot()
    groups = list(table.columns.get_level_values(0).unique())
    variants = list(table.index)
    y = np.arange(len(variants))
    height = 0.8 / max(len(groups), 1)
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 2.2 + 0.4 * len(variants) * max(len(groups), 1.5)), sharey=True
    )
    panels = (
        ("test/accuracy", 100, "test accuracy, %", "{:.2f}"),
        ("time/median_samples_per_second", 1, "training images per second (log scale)", "{:,.0f}"),
    )
    colours = {}
    for ax, (metric, scale, label, fmt) in zip(axes, panels, strict=False):
        for i, group in enumerate(groups):
            values = table[(group, metric)].to_numpy(dtype=float) * scale
            bars = ax.barh(y + i * height, np.nan_to_num(values), height, label=group)
            colours[group] = bars.patches[0].get_facecolor() if len(bars.patches) else None
            text = ["" if np.isnan(v) else fmt.format(v) for v in values]
            ax.bar_label(bars, labels=text, fontsize=7, padding=2)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    forms = (("inference/latency_b1_ms", "o"), ("onnx/inference/latency_b1_ms", "s"))
    forms += (("int8/inference/latency_b1_ms", "^"),)
    for i, group in enumerate(groups):
        for metric, marker in forms:
            values = table[(group, metric)].to_numpy(dtype=float)
            axes[2].scatter(values, y + i * height, marker=marker, color=colours[group], s=22)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("inference latency at batch 1, ms (log): torch ●, onnx ■, int8 ▲")
    axes[2].grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y + height * (len(groups) - 1) / 2, variants, fontsize=8)
    axes[0].invert_yaxis()
    accuracy = table.xs("test/accuracy", axis=1, level=1).to_numpy(dtype=float) * 100
    if np.isfinite(accuracy).any():
        axes[0].set_xlim(max(0.0, np.nanmin(accuracy) - 3), 100.5)
    _log_axis(axes[1].xaxis, subs=(1.0, 3.0), label="{x:,.0f}")
    throughput = table.xs("time/median_samples_per_second", axis=1, level=1).to_numpy(float)
    if np.isfinite(throughput).any():
        axes[1].set_xlim(np.nanmin(throughput) / 2, np.nanmax(throughput) * 3)  # room for labels
    place = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.95), "frameon": False}
    fig.legend(*axes[0].get_legend_handles_labels(), ncols=min(len(groups), 4), fontsize=8, **place)
    fig.suptitle(f"{experiment}: variants by host · device")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save(fig, path)
