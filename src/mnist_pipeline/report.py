"""Stage 4, `mnist-pipeline report`: every variant side by side, from the DVC metrics files.

mnist-pipeline report      # -> reports/results.md, reports/results.csv, reports/results.png
"""

from __future__ import annotations

import json
from pathlib import Path

from mnist_pipeline import paths
from mnist_pipeline.config import Params
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import write_atomic, write_text_atomic


def collect(params: Params, root: Path):
    """One row per variant in params.yaml: size, test metrics and timings."""
    import pandas as pd

    rows = []
    for variant, recipe in params.variants.items():
        files = {
            "train": paths.train_metrics_path(root, variant),
            "test": paths.test_metrics_path(root, variant),
        }
        missing = [str(p.relative_to(root)) for p in files.values() if not p.is_file()]
        if missing:
            raise PipelineError(
                f"no results for {variant} ({', '.join(missing)} missing); run "
                f"`dvc repro evaluate@{variant}` first"
            )
        train, test = (json.loads(p.read_text()) for p in files.values())
        rows.append(
            {
                "variant": variant,
                "params": train["params"],
                "optimizer": recipe.optimizer,
                "lr": recipe.lr,
                "batch_size": recipe.batch_size,
                "epochs": recipe.epochs,
                "kept_epoch": train.get("kept_epoch"),
                "val_accuracy": train.get("val/accuracy"),
                "test_accuracy": test["test/accuracy"],
                "test_loss": test["test/loss"],
                "test_f1_macro": test["test/f1_macro"],
            }
        )
    return pd.DataFrame(rows)


def report(params: Params, root: Path) -> Path:
    table = collect(params, root)
    out = paths.reports_dir(root)
    shown = table.copy()
    for col in ("val_accuracy", "test_accuracy", "test_f1_macro"):
        shown[col] = (shown[col] * 100).map(lambda v: f"{v:.2f}%" if v == v else "")
    shown["test_loss"] = shown["test_loss"].map("{:.4f}".format)
    shown["params"] = shown["params"].map("{:,}".format)
    title = f"# Results: {params.data.dataset}, test set (10,000 images)\n\n"
    write_text_atomic(out / "results.md", title + shown.to_markdown(index=False) + "\n")
    write_text_atomic(out / "results.csv", table.to_csv(index=False))
    write_atomic(out / "results.png", lambda tmp: _chart(table, tmp, params.data.dataset))
    print(shown.to_markdown(index=False))
    for name in ("results.md", "results.csv", "results.png"):
        print(f"wrote {(out / name).relative_to(root)}")
    return out


def _chart(table, path: Path, dataset: str) -> None:
    """Left: test accuracy against size (log axis, every variant labelled, labels kept apart).
    Right: the variants ranked by test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    accuracy = table["test_accuracy"] * 100
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.15, 1]}
    )
    left.scatter(table["params"], accuracy, zorder=3)
    left.set_xscale("log")
    left.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    left.xaxis.set_minor_formatter(NullFormatter())
    low, high = table["params"].min(), table["params"].max()
    left.set_xlim(low / 1.6, high * 4)  # room on the right for the labels
    span = max(accuracy.max() - accuracy.min(), 1.0)
    left.set_ylim(accuracy.min() - 0.12 * span, accuracy.max() + 0.12 * span)
    # Labels to the right of their points, nudged apart vertically where points crowd.
    order = accuracy.sort_values().index
    placed = _spread(accuracy[order].to_list(), gap=0.065 * span)
    for idx, y in zip(order, placed, strict=True):
        x = table.loc[idx, "params"]
        left.annotate(
            table.loc[idx, "variant"],
            xy=(x, accuracy[idx]),
            xytext=(x * 1.35, y),
            fontsize=8,
            va="center",
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
        )
    left.set_xlabel("trainable parameters (log scale)")
    left.set_ylabel("test accuracy, %")
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
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _spread(values: list[float], gap: float) -> list[float]:
    """Sorted positions moved apart so that neighbours are at least `gap` apart, staying as
    close to where they were as the gap allows (centred on the original group)."""
    placed: list[float] = []
    for v in values:
        placed.append(max(v, placed[-1] + gap) if placed else v)
    shift = (sum(placed) - sum(values)) / max(len(values), 1)
    return [p - shift for p in placed]


def _compact(value: float) -> str:
    """10,000 -> 10k, 2,000,000 -> 2M: tick labels that fit side by side on a log axis."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"
