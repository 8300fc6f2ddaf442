"""`mnist-pipeline compare`: the tracking store as one table, variants × host/device.

    mnist-pipeline compare                                  # latest run per variant, host, device
    mnist-pipeline compare --hosts laptop,gpu-box --variants ffn1_relu,mlp512_relu
    mnist-pipeline compare --all-runs --csv cmp.csv --markdown cmp.md --chart cmp.png
    MLFLOW_TRACKING_URI=http://mlflow.internal:5000 mnist-pipeline compare

One row per variant, one column group per `host · device` (the `host` and `device` tags `train`
sets; MNIST_PIPELINE_HOST names the host): test accuracy, seconds per epoch and training images
per second, both timings the median over the run's epochs (the first epoch pays for warm-up).
Only finished training runs of the params.yaml recipes count (`--one-off` adds one-off runs);
`mlflow run`'s parent runs (no `variant` tag) are left out. A run whose checkpoint was evaluated
under another run (the same bytes, retrained) shows that accuracy; one never evaluated, a blank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_pipeline import tracking
from mnist_pipeline.config import Params, check_variant
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import write_atomic, write_text_atomic
from mnist_pipeline.models import VARIANTS

if TYPE_CHECKING:
    import pandas as pd

# (metric, label in the printed table, how the printed table shows it)
COLUMNS = (
    ("test/accuracy", "accuracy", lambda v: f"{v:.2%}"),
    ("time/median_epoch_seconds", "s/epoch", lambda v: f"{v:.3g}"),
    ("time/median_samples_per_second", "img/s", lambda v: f"{v:,.0f}"),
)


def compare(
    params: Params,
    root: Path,
    *,
    experiment: str | None = None,
    variants: Sequence[str] | None = None,
    hosts: Sequence[str] | None = None,
    latest_only: bool = True,
    one_off: bool = False,
    csv_path: Path | None = None,
    markdown_path: Path | None = None,
    chart_path: Path | None = None,
) -> pd.DataFrame:
    """Print (and write, when asked) the comparison table; return it, numbers unformatted.

    Columns are a MultiIndex (`host · device`, metric name); rows are variants, or (variant,
    run) pairs with `latest_only=False`, run 1 being the latest.
    """
    for variant in variants or ():
        check_variant(variant)
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri, writing=False)  # compare only reads
    _check_store_exists(uri)
    name = experiment or tracking.experiment_name(params.data.dataset)
    runs = training_runs(uri, name)
    skipped = int((runs["kind"] == "one-off").sum())
    if not one_off:
        runs = runs[runs["kind"] != "one-off"]
    if variants:
        present = ", ".join(v for v in VARIANTS if v in set(runs["variant"]))
        runs = runs[runs["variant"].isin(variants)]
        if runs.empty:
            raise PipelineError(
                f"experiment {name!r} at {uri} has no finished runs of {', '.join(variants)} "
                f"(variants there: {present})"
            )
    if hosts:
        present = ", ".join(sorted(runs["host"].unique()))
        runs = runs[runs["host"].isin(hosts)]
        if runs.empty:
            raise PipelineError(
                f"experiment {name!r} at {uri} has no runs from host {', '.join(hosts)}"
                f"{' of these variants' if variants else ''} (hosts there: {present})"
            )
    if runs.empty:
        raise PipelineError(
            f"experiment {name!r} at {uri} holds only one-off runs ({skipped}); add --one-off"
        )
    table = pivot(runs, latest_only)

    kind = "latest run" if latest_only else "every run (1 = latest)"
    print(f"{name} at {uri}: {kind} per variant and host · device")
    print(_shown(table).to_string())
    if skipped and not one_off:
        print(f"({skipped} one-off run{'s' * (skipped > 1)} left out: add --one-off to include)")
    written = []
    if csv_path:
        flat = table.copy()
        flat.columns = [f"{group}: {metric}" for group, metric in table.columns]
        write_text_atomic(csv_path, flat.to_csv())
        written.append(csv_path)
    if markdown_path:
        shown = _shown(table)
        shown.columns = [f"{group}: {label}" for group, label in shown.columns]
        shown = shown.reset_index()
        align = ["left" if c == "variant" else "right" for c in shown.columns]
        title = f"# {name}: {kind} per variant and host · device\n\n"
        text = shown.to_markdown(index=False, colalign=align)
        write_text_atomic(markdown_path, title + text + "\n")
        written.append(markdown_path)
    if chart_path:
        latest = table if latest_only else table.xs(1, level="run")
        write_atomic(chart_path, lambda tmp: _chart(latest, tmp, name))
        written.append(chart_path)
    for path in written:
        print(f"wrote {path}")
    return table


def _check_store_exists(uri: str) -> None:
    """A local store that is not there is a user mistake; opening it would create it, empty."""
    from urllib.parse import unquote, urlparse

    if uri.startswith("sqlite:///"):
        path = Path(unquote(uri[len("sqlite:///") :]))
    elif uri.startswith("file:"):
        path = Path(unquote(urlparse(uri).path))
    elif "://" not in uri and not uri.startswith("databricks"):
        path = Path(uri)  # a bare folder: MLflow's file store
    else:
        return
    if not path.exists():
        raise PipelineError(
            f"no tracking store at {path}; train a variant first (`mnist-pipeline train "
            "--variant NAME`), or point MLFLOW_TRACKING_URI at the store to read"
        )


def training_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The experiment's finished training runs: one row each, newest first, with the columns
    run_id, start_time, variant, host, device and test/accuracy (NaN where not evaluated)."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        names = [e.name for e in mlflow.search_experiments()]
        raise PipelineError(
            f"no experiment named {experiment!r} at {uri}; experiments there: "
            f"{', '.join(names) or 'none'} (choose one with --experiment)"
        )
    raw = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    columns = {
        "run_id": "run_id",
        "start_time": "start_time",
        "tags.variant": "variant",
        "tags.host": "host",
        "tags.device": "device",
        "tags.run.kind": "kind",
        "tags.checkpoint.md5": "checkpoint",
        **{f"metrics.{metric}": metric for metric, _, _ in COLUMNS},
    }
    runs = pd.DataFrame(
        {new: raw.get(old, pd.Series(index=raw.index)) for old, new in columns.items()}
    )
    runs = runs[runs["variant"].notna()]
    if runs.empty:
        raise PipelineError(
            f"experiment {experiment!r} at {uri} holds no finished training runs; train one "
            "with `mnist-pipeline train --variant NAME` (or `dvc repro`)"
        )
    for metric, _, _ in COLUMNS:
        runs[metric] = runs[metric].astype(float)
    # The test result belongs to the checkpoint's bytes: a retrain that wrote the same checkpoint
    # (DVC then skips evaluate) shares the accuracy its twin was evaluated at.
    by_checkpoint = runs.dropna(subset=["checkpoint", "test/accuracy"]).groupby("checkpoint")
    shared = runs["checkpoint"].map(by_checkpoint["test/accuracy"].first())
    runs["test/accuracy"] = runs["test/accuracy"].fillna(shared)
    runs = runs.fillna({"host": "unknown", "device": "unknown", "kind": "pipeline"})
    return runs.reset_index(drop=True)


def pivot(runs: pd.DataFrame, latest_only: bool = True) -> pd.DataFrame:
    """Rows: variants in the order of models.VARIANTS; columns: (`host · device`, metric)."""
    import pandas as pd

    runs = runs.sort_values("start_time", ascending=False).assign(
        group=runs["host"] + " · " + runs["device"]
    )
    if latest_only:
        runs = runs.drop_duplicates(["variant", "group"])
        index: str | list[str] = "variant"
    else:
        runs = runs.assign(run=runs.groupby(["variant", "group"]).cumcount() + 1)
        index = ["variant", "run"]
    metrics = [metric for metric, _, _ in COLUMNS]
    table = runs.pivot(index=index, columns="group", values=metrics)
    table = table.swaplevel(axis=1)
    groups = sorted(table.columns.get_level_values(0).unique())
    table = table.reindex(columns=pd.MultiIndex.from_product([groups, metrics]))
    table.columns.names = ["host · device", "metric"]
    # The registry's order; a variant it does not know (a newer checkout's) goes last.
    order = {name: i for i, name in enumerate(VARIANTS)}
    table = table.sort_index()
    return table.sort_index(
        key=lambda level: level.map(
            lambda v: order.get(v, len(order)) if isinstance(v, str) else v
        ),
        kind="stable",
    )


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: short column labels, percentages and thousands separators."""
    import pandas as pd

    shown = table.copy().astype(object)
    labels = {metric: (label, fmt) for metric, label, fmt in COLUMNS}
    for column in table.columns:
        fmt = labels[column[1]][1]
        shown[column] = table[column].map(lambda v, fmt=fmt: "" if pd.isna(v) else fmt(v))
    shown.columns = pd.MultiIndex.from_tuples(
        [(group, labels[metric][0]) for group, metric in table.columns],
        names=table.columns.names,
    )
    return shown


def _chart(table: pd.DataFrame, path: Path, experiment: str) -> None:
    """Grouped bars: test accuracy and throughput per variant, one colour per host · device;
    the legend above the panels, where it covers no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = list(table.columns.get_level_values(0).unique())
    variants = list(table.index)
    y = np.arange(len(variants))
    height = 0.8 / max(len(groups), 1)
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 2.2 + 0.4 * len(variants) * max(len(groups), 1.5)), sharey=True
    )
    panels = (
        ("test/accuracy", 100, "test accuracy, %"),
        ("time/median_samples_per_second", 1, "training images per second (log scale)"),
    )
    for ax, (metric, scale, label) in zip(axes, panels, strict=True):
        for i, group in enumerate(groups):
            values = table[(group, metric)].to_numpy(dtype=float) * scale
            bars = ax.barh(y + i * height, np.nan_to_num(values), height, label=group)
            text = [f"{v:.2f}" if metric == "test/accuracy" else f"{v:,.0f}" for v in values]
            ax.bar_label(
                bars, labels=["" if t == "nan" else t for t in text], fontsize=7, padding=2
            )
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y + height * (len(groups) - 1) / 2, variants, fontsize=8)
    axes[0].invert_yaxis()
    accuracy = table.xs("test/accuracy", axis=1, level=1).to_numpy(dtype=float) * 100
    if np.isfinite(accuracy).any():
        axes[0].set_xlim(max(0.0, np.nanmin(accuracy) - 3), 100.5)
    speed = axes[1]
    speed.set_xscale("log")
    speed.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
    speed.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    speed.xaxis.set_minor_formatter(NullFormatter())
    throughput = table.xs("time/median_samples_per_second", axis=1, level=1).to_numpy(float)
    if np.isfinite(throughput).any():
        speed.set_xlim(np.nanmin(throughput) / 2, np.nanmax(throughput) * 3)  # room for labels
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncols=min(len(groups), 4),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.95),
        frameon=False,
    )
    fig.suptitle(f"{experiment}: variants by host · device")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
