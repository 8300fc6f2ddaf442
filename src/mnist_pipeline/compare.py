"""Compare: the tracking store as one table, variants × host/device.

Per group, `same` where the checkpoint has the first group's bytes (else the accuracy difference),
then COLUMNS. Finished training runs only; a run rebuilt by `sync` shows as device `rebuilt`."""

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd

from mnist_pipeline import plots, tracking
from mnist_pipeline.config import Params, check_variant
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import write_atomic, write_text_atomic
from mnist_pipeline.models import VARIANTS

COLUMNS = (  # (metric, label in the printed table, how the printed table shows it)
    ("test/accuracy", "accuracy", lambda v: f"{v:.2%}"),
    ("time/median_epoch_seconds", "s/epoch", lambda v: f"{v:.3g}"),
    ("time/median_samples_per_second", "img/s", lambda v: f"{v:,.0f}"),
    ("inference/latency_b1_ms", "torch ms", lambda v: f"{v:.3f}"),
    ("onnx/inference/latency_b1_ms", "onnx ms", lambda v: f"{v:.3f}"),
    ("int8/inference/latency_b1_ms", "int8 ms", lambda v: f"{v:.3f}"),
    ("int8/test/accuracy", "int8 acc", lambda v: f"{v:.2%}"),
)
BYTES = "bytes"  # the column that says whether a group's checkpoint is the first group's
TAGS = {  # run tag -> column
    "variant": "variant",
    "search.variant": "searched",  # a search's trial: `--one-off` lists it under its variant
    "host": "host",
    "device": "device",
    "run.kind": "kind",
    "checkpoint.md5": "checkpoint",
    "record.source": "source",
    "dvc.exp.name": "exp",
    "dvc.exp.baseline": "baseline",
    "git.commit": "commit",
}


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
    """Print, and write where asked, the table; return it unformatted."""
    for variant in variants or ():
        check_variant(variant)
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri, writing=False)  # compare only reads
    _check_store_exists(uri)
    name = experiment or tracking.experiment_name(params.data.dataset)
    runs = training_runs(uri, name)
    skipped = int(runs["kind"].isin(["one-off", "trial"]).sum())
    if not one_off:
        runs = runs[~runs["kind"].isin(["one-off", "trial"])]
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
        plural = "s" * (skipped > 1)
        print(f"({skipped} one-off or trial run{plural} left out: add --one-off to include)")
    title = f"{name}: {kind} per variant and host · device"
    for path, write in ((csv_path, _csv), (markdown_path, _markdown), (chart_path, _chart)):
        if path:
            write(table, title, path)
            print(f"wrote {path}")
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
    """DVC experiment `name`'s runs and its baseline commit's, labelled as such and by host."""
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


def _csv(table: pd.DataFrame, title: str, path: Path) -> None:
    flat = table.set_axis([f"{group}: {metric}" for group, metric in table.columns], axis=1)
    write_text_atomic(path, flat.to_csv())


def _markdown(table: pd.DataFrame, title: str, path: Path) -> None:
    shown = _shown(table)
    shown.columns = [f"{group}: {label}" for group, label in shown.columns]
    shown = shown.reset_index()
    align = ["left" if c == "variant" else "right" for c in shown.columns]
    write_text_atomic(path, f"# {title}\n\n{shown.to_markdown(index=False, colalign=align)}\n")


def _chart(table: pd.DataFrame, title: str, path: Path) -> None:
    latest = table if "run" not in table.index.names else table.xs(1, level="run")
    write_atomic(path, lambda tmp: plots.comparison(latest, tmp, title.split(":")[0]))


def _check_store_exists(uri: str) -> None:
    """A local store that is not there is a user mistake; opening it would create it, empty."""
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
    """The experiment's finished training runs, newest first: the TAGS' and COLUMNS' columns."""
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        names = [e.name for e in mlflow.search_experiments()]
        raise PipelineError(
            f"no experiment named {experiment!r} at {uri}; experiments there: "
            f"{', '.join(names) or 'none'} (choose one with --experiment)"
        )
    finished, newest = "attributes.status = 'FINISHED'", ["attributes.start_time DESC"]
    raw = mlflow.search_runs([found.experiment_id], finished, order_by=newest)
    columns = {"run_id": "run_id", "start_time": "start_time"}
    columns |= {f"tags.{tag}": column for tag, column in TAGS.items()}
    columns |= {f"metrics.{metric}": metric for metric, _, _ in COLUMNS}
    runs = raw.rename(columns=columns).reindex(columns=list(columns.values()))
    trial = runs["kind"] == "trial"
    runs["variant"] = runs["variant"].astype(object).where(~trial, runs["searched"])
    # A search's parent, a form's child runs and `mlflow run`'s parent carry no `variant` tag.
    runs = runs[runs["variant"].notna()].drop(columns="searched")
    if runs.empty:
        raise PipelineError(
            f"experiment {experiment!r} at {uri} holds no finished training runs; train one "
            "with `mnist-pipeline train --variant NAME` (or `dvc repro`)"
        )
    for metric, _, _ in COLUMNS:
        runs[metric] = runs[metric].astype(float)
    runs = runs.fillna({"host": "unknown", "device": "unknown", "kind": "pipeline"})
    runs.loc[runs["source"] == "outputs", "device"] = "rebuilt"  # no timings, no device
    return runs.reset_index(drop=True)


def pivot(runs: pd.DataFrame, latest_only: bool = True) -> pd.DataFrame:
    """Rows: variants in the order of models.VARIANTS; columns: (`host · device`, metric)."""
    runs = runs.assign(group=runs["host"] + " · " + runs["device"])
    runs = runs.sort_values("start_time", ascending=False)
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

    def rank(level: pd.Index) -> pd.Index:
        return level.map(lambda v: order.get(v, len(order)) if isinstance(v, str) else v)

    return table.sort_index().sort_index(key=rank, kind="stable")


def _same_bytes(table: pd.DataFrame, group: str, first: str) -> pd.Series:
    """Per row: `same` where `group`'s checkpoint is `first`'s, else the accuracy difference."""
    mine, theirs = table[(group, "checkpoint")], table[(first, "checkpoint")]
    delta = (table[(group, "test/accuracy")] - table[(first, "test/accuracy")]) * 100
    shown = [
        "" if pd.isna(a) or pd.isna(b) else "same" if a == b else f"{d:+.2f} pt"
        for a, b, d in zip(mine, theirs, delta, strict=True)
    ]
    return pd.Series(shown, index=table.index, dtype=object)


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.copy().astype(object)
    labels = {metric: (label, fmt) for metric, label, fmt in COLUMNS}
    for column in table.columns:
        if column[1] != BYTES:
            fmt = labels[column[1]][1]
            shown[column] = table[column].map(lambda v, fmt=fmt: "" if pd.isna(v) else fmt(v))
    labels[BYTES] = (BYTES, str)
    shown.columns = pd.MultiIndex.from_tuples(
        [(group, labels[metric][0]) for group, metric in table.columns], names=table.columns.names
    )
    return shown
