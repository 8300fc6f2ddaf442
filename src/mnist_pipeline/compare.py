"""`mnist-pipeline compare`: the tracking store as one table, variants × host/device.

    mnist-pipeline compare                                  # latest run per variant, host, device
    mnist-pipeline compare --hosts laptop,gpu-box --variants ffn1_relu,mlp512_relu
    mnist-pipeline compare --all-runs --csv cmp.csv --markdown cmp.md --chart cmp.png
    mnist-pipeline compare --exp bulky-pita         # a DVC experiment beside its baseline
    MLFLOW_TRACKING_URI=http://mlflow.internal:5000 mnist-pipeline compare

One row per variant, one column group per `host · device` (the `host` and `device` tags `train`
sets; MNIST_PIPELINE_HOST names the host), answering "the same model? how much faster?":

- `bytes`: whether the run's checkpoint has the bytes of the first group's (`same`), or else how
  far its test accuracy is from that one's (`+0.12 pt`): one CPU kind reproduces the bytes,
  another CPU kind or a GPU gives close but different weights;
- test accuracy, seconds per epoch and training images per second (medians over the epochs: the
  first pays for warm-up);
- inference latency at batch 1 of each form (the PyTorch model on the run's device, ONNX and int8
  under ONNX Runtime on the CPU) and the int8 model's accuracy, as that host measured them.

Only finished training runs of the params.yaml recipes count (`--one-off` adds one-off runs);
`mlflow run`'s parent runs, a search's runs and the forms' child runs (no `variant` tag) are left
out; a run rebuilt from the pipeline's outputs (`mnist-pipeline sync`: no timings) shows as
device `rebuilt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_pipeline import plots, tracking
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
    ("inference/latency_b1_ms", "torch ms", lambda v: f"{v:.3f}"),
    ("onnx/inference/latency_b1_ms", "onnx ms", lambda v: f"{v:.3f}"),
    ("int8/inference/latency_b1_ms", "int8 ms", lambda v: f"{v:.3f}"),
    ("int8/test/accuracy", "int8 acc", lambda v: f"{v:.2%}"),
)
BYTES = "bytes"  # the column that says whether a group's checkpoint is the first group's


def compare(
    params: Params,
    root: Path,
    *,
    experiment: str | None = None,
    variants: Sequence[str] | None = None,
    hosts: Sequence[str] | None = None,
    dvc_exp: str | None = None,
    latest_only: bool = True,
    one_off: bool = False,
    csv_path: Path | None = None,
    markdown_path: Path | None = None,
    chart_path: Path | None = None,
) -> pd.DataFrame:
    """Print (and write, when asked) the comparison table; return it, numbers unformatted.

    Columns are a MultiIndex (`host · device`, metric name); rows are variants, or (variant,
    run) pairs with `latest_only=False`, run 1 being the latest. With `dvc_exp`, the columns are
    that DVC experiment's runs and its baseline commit's, per host.
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
    where = f"experiment {name!r} at {uri}"
    if dvc_exp:
        runs = beside_baseline(runs, dvc_exp, where)
    runs = _keep(runs, "variant", variants, where, "no finished runs of")
    runs = _keep(runs, "host", hosts, where, "no runs from host")
    if runs.empty:
        raise PipelineError(f"{where} holds only one-off runs ({skipped}); add --one-off")
    table = pivot(runs, latest_only)

    kind = "latest run" if latest_only else "every run (1 = latest)"
    print(f"{name} at {uri}: {kind} per variant and host · device")
    print(_shown(table).to_string())
    if skipped and not one_off:
        print(f"({skipped} one-off run{'s' * (skipped > 1)} left out: add --one-off to include)")
    title = f"{name}: {kind} per variant and host · device"
    _write(table, title, csv_path=csv_path, markdown_path=markdown_path, chart_path=chart_path)
    return table


def _keep(runs: pd.DataFrame, column: str, wanted, where: str, missing: str) -> pd.DataFrame:
    """The runs whose `column` is one of `wanted` (all when None); none is a one-line error."""
    if not wanted:
        return runs
    kept = runs[runs[column].isin(wanted)]
    if kept.empty:
        present = ", ".join(sorted(runs[column].dropna().unique()))
        missing += " " + ", ".join(wanted)
        raise PipelineError(f"{where} has {missing} ({column}s there: {present})")
    return kept


def beside_baseline(runs: pd.DataFrame, name: str, where: str) -> pd.DataFrame:
    """The runs of DVC experiment `name` and the runs of its baseline commit (the pipeline's,
    outside any experiment), each group labelled by what it is and its host."""
    import pandas as pd

    ours = runs[runs["exp"] == name]
    if ours.empty:
        present = ", ".join(sorted(runs["exp"].dropna().unique())) or "none"
        raise PipelineError(
            f"{where} has no runs of DVC experiment {name!r} (experiments there: {present}); "
            "`dvc exp show` lists them"
        )
    baseline = str(ours["baseline"].dropna().iloc[0]) if ours["baseline"].notna().any() else ""
    base = runs[runs["exp"].isna() & runs["commit"].fillna("").str.startswith(baseline or "-")]
    labelled = (
        ours.assign(host=f"{name} · " + ours["host"]),
        base.assign(host=f"baseline {baseline[:7]} · " + base["host"]),
    )
    return pd.concat(labelled, ignore_index=True)


def _write(table: pd.DataFrame, title: str, **targets: Path | None) -> None:
    """The table as CSV, Markdown and a chart, each where asked."""
    written = []
    if path := targets["csv_path"]:
        flat = table.copy()
        flat.columns = [f"{group}: {metric}" for group, metric in table.columns]
        write_text_atomic(path, flat.to_csv())
        written.append(path)
    if path := targets["markdown_path"]:
        shown = _shown(table)
        shown.columns = [f"{group}: {label}" for group, label in shown.columns]
        shown = shown.reset_index()
        align = ["left" if c == "variant" else "right" for c in shown.columns]
        text = shown.to_markdown(index=False, colalign=align)
        write_text_atomic(path, f"# {title}\n\n{text}\n")
        written.append(path)
    if path := targets["chart_path"]:
        latest = table if "run" not in table.index.names else table.xs(1, level="run")
        write_atomic(path, lambda tmp: plots.comparison(latest, tmp, title.split(":")[0]))
        written.append(path)
    for path in written:
        print(f"wrote {path}")


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
        "tags.record.source": "source",
        "tags.dvc.exp.name": "exp",
        "tags.dvc.exp.baseline": "baseline",
        "tags.git.commit": "commit",
        **{f"metrics.{metric}": metric for metric, _, _ in COLUMNS},
    }
    runs = pd.DataFrame(
        {new: raw.get(old, pd.Series(index=raw.index)) for old, new in columns.items()}
    )
    # A search's runs, a form's child runs and `mlflow run`'s parent carry no `variant` tag.
    runs = runs[runs["variant"].notna()]
    if runs.empty:
        raise PipelineError(
            f"experiment {experiment!r} at {uri} holds no finished training runs; train one "
            "with `mnist-pipeline train --variant NAME` (or `dvc repro`)"
        )
    for metric, _, _ in COLUMNS:
        runs[metric] = runs[metric].astype(float)
    runs = runs.fillna({"host": "unknown", "device": "unknown", "kind": "pipeline"})
    # A run rebuilt from the outputs has no timings and no device: say so in its column.
    runs.loc[runs["source"] == "outputs", "device"] = "rebuilt"
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
    table = runs.pivot(index=index, columns="group", values=[*metrics, "checkpoint"])
    table = table.swaplevel(axis=1)
    groups = sorted(table.columns.get_level_values(0).unique())
    for group in groups:
        table[(group, BYTES)] = _same_bytes(table, group, groups[0])
    table = table.drop(columns=[(g, "checkpoint") for g in groups])
    table = table.reindex(columns=pd.MultiIndex.from_product([groups, [BYTES, *metrics]]))
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


def _same_bytes(table: pd.DataFrame, group: str, first: str):
    """Per row: `same` where `group`'s checkpoint has the bytes of `first`'s (the reference
    group: `first` itself reads `same`), else its test accuracy less `first`'s, in points."""
    import pandas as pd

    mine, theirs = table[(group, "checkpoint")], table[(first, "checkpoint")]
    delta = (table[(group, "test/accuracy")] - table[(first, "test/accuracy")]) * 100
    return pd.Series(
        [
            "" if pd.isna(a) or pd.isna(b) else "same" if a == b else f"{d:+.2f} pt"
            for a, b, d in zip(mine, theirs, delta, strict=True)
        ],
        index=table.index,
        dtype=object,
    )


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: short column labels, percentages and thousands separators."""
    import pandas as pd

    shown = table.copy().astype(object)
    labels = {metric: (label, fmt) for metric, label, fmt in COLUMNS}
    labels[BYTES] = (BYTES, str)
    for column in table.columns:
        if column[1] == BYTES:
            continue
        fmt = labels[column[1]][1]
        shown[column] = table[column].map(lambda v, fmt=fmt: "" if pd.isna(v) else fmt(v))
    shown.columns = pd.MultiIndex.from_tuples(
        [(group, labels[metric][0]) for group, metric in table.columns],
        names=table.columns.names,
    )
    return shown
