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
                "epochs": train["epochs"],
                "val_accuracy": train.get("val/accuracy"),
                "test_accuracy": test["test/accuracy"],
                "test_f1_macro": test["test/f1_macro"],
                "seconds_per_epoch": train["time/epoch_seconds"],
                "train_seconds": train["time/train_seconds"],
                "samples_per_second": train["time/samples_per_second"],
            }
        )
    return pd.DataFrame(rows)


def report(params: Params, root: Path) -> Path:
    table = collect(params, root)
    out = paths.reports_dir(root)
    shown = table.copy()
    for col in ("val_accuracy", "test_accuracy", "test_f1_macro"):
        shown[col] = (shown[col] * 100).map(lambda v: f"{v:.2f}%" if v == v else "")
    shown["seconds_per_epoch"] = shown["seconds_per_epoch"].map("{:.2f}".format)
    shown["train_seconds"] = shown["train_seconds"].map("{:.1f}".format)
    shown["samples_per_second"] = shown["samples_per_second"].map("{:,.0f}".format)
    shown["params"] = shown["params"].map("{:,}".format)
    title = f"# Results: {params.data.dataset}, test set (10,000 images)\n\n"
    write_text_atomic(out / "results.md", title + shown.to_markdown(index=False) + "\n")
    write_text_atomic(out / "results.csv", table.to_csv(index=False))
    write_atomic(out / "results.png", lambda tmp: _chart(table, tmp, params.data.dataset))
    print(shown.to_markdown(index=False))
    return out


def _chart(table, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, col, label in (
        (axes[0], "params", "trainable parameters (log scale)"),
        (axes[1], "train_seconds", "training time, seconds (log scale)"),
    ):
        ax.scatter(table[col], table["test_accuracy"] * 100)
        for _, row in table.iterrows():
            ax.annotate(
                row["variant"],
                (row[col], row["test_accuracy"] * 100),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^0, 3x10^0 ... overlapped
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, %")
    fig.suptitle(f"{dataset}: accuracy against size and training time")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
