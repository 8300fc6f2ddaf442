"""The README's table of each variant's three forms, from the tracking store: test accuracy
(the whole test set in one batch, and one image at a time), size, latency at batch 1 (median and
95th percentile) and throughput at batch 256, as this host measured them (`sync`), from each
variant's latest pipeline run on this host. These figures belong to the host: MLflow's alone.

    python benchmarks/export_table.py            # the project's store; MLFLOW_TRACKING_URI wins
"""

from __future__ import annotations

import mlflow

from mnist_pipeline import host, tracking
from mnist_pipeline.config import load_params
from mnist_pipeline.models import VARIANTS
from mnist_pipeline.paths import PARAMS_FILE, project_root

FORMS = {"torch": "checkpoint (torch)", "onnx": "ONNX", "int8": "ONNX int8"}


def figures(metrics: dict, form: str) -> dict:
    """A form's figures from the training run: the PyTorch form's under the shared names, the
    others' under their own (`int8/test/accuracy`, ...)."""
    prefix = "" if form == "torch" else f"{form}/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def main() -> None:
    root = project_root()
    params = load_params(root / PARAMS_FILE)
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    name = tracking.experiment_name(params.data.dataset)
    print(
        "| variant | params | form | accuracy, whole set | accuracy, batch 1 | size "
        "| latency b1, median | latency b1, p95 | images/s, batch 256 |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    for variant in (v for v in VARIANTS if v in params.variants):
        (run,) = mlflow.search_runs(
            experiment_names=[name],
            filter_string=f"tags.variant = '{variant}' and tags.host = '{host.host_label()}' "
            "and tags.`run.kind` = 'pipeline' and metrics.`int8/test/accuracy` >= 0",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        for i, (form, label) in enumerate(FORMS.items()):
            first = f"`{variant}` | {int(run.data.params['num_params']):,}" if i == 0 else " | "
            f = figures(run.data.metrics, form)
            b1 = f"{f['test/accuracy_b1']:.2%}" if "test/accuracy_b1" in f else "(same)"
            print(
                f"| {first} | {label} | {f['test/accuracy']:.2%} | {b1} "
                f"| {f['model/size_bytes'] / 1024:,.0f} KiB "
                f"| {f['inference/latency_b1_ms'] * 1000:.0f} µs "
                f"| {f['inference/latency_b1_p95_ms'] * 1000:.0f} µs "
                f"| {f['inference/throughput_b256']:,.0f} |"
            )


if __name__ == "__main__":
    main()
