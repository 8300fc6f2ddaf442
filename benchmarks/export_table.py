"""The README's export table, from the tracking store: each variant's latest pipeline run on this
host, its three forms' test accuracy (whole test set in one batch, and one image at a time),
size and CPU latency. Latencies are MLflow's alone (they differ from run to run), so the table
is read from there, not from DVC's outputs.

    python benchmarks/export_table.py            # the project's store; MLFLOW_TRACKING_URI wins
"""

from __future__ import annotations

from mnist_pipeline import tracking
from mnist_pipeline.config import load_params
from mnist_pipeline.models import VARIANTS
from mnist_pipeline.paths import PARAMS_FILE, project_root

FORMS = {"torch": "checkpoint (torch)", "onnx": "ONNX", "int8": "ONNX int8"}


def main() -> None:
    import mlflow

    root = project_root()
    params = load_params(root / PARAMS_FILE)
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    name = tracking.experiment_name(params.data.dataset)
    print(
        "| variant | params | form | accuracy, whole set | accuracy, batch 1 | size "
        "| latency, batch 1 | latency, batch 1,000 |\n|---|---:|---|---:|---:|---:|---:|---:|"
    )
    for variant in (v for v in VARIANTS if v in params.variants):
        (run,) = mlflow.search_runs(
            experiment_names=[name],
            filter_string=f"tags.variant = '{variant}' and tags.host = '{tracking.host_label()}' "
            "and tags.`run.kind` = 'pipeline' and metrics.`export/onnx/accuracy` >= 0",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        for i, (form, label) in enumerate(FORMS.items()):
            first = f"`{variant}` | {int(run.data.params['num_params']):,}" if i == 0 else " | "
            f = {k.split("/")[-1]: v for k, v in run.data.metrics.items() if f"/{form}/" in k}
            print(
                f"| {first} | {label} | {f['accuracy']:.2%} | {f['accuracy_b1']:.2%} "
                f"| {f['bytes'] / 1024:,.0f} KiB | {f['latency_b1_ms'] * 1000:.0f} µs "
                f"| {f['latency_b1000_ms']:.2f} ms |"
            )


if __name__ == "__main__":
    main()
