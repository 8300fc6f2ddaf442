"""Stage 4, `mnist-pipeline export --variant NAME`: the kept checkpoint as ONNX and int8 ONNX.

    mnist-pipeline export --variant mlp_relu_dropout

Exports the served form of the checkpoint (dropout as identities, a softmax head: every variant
outputs probabilities; `logged_model.inference_model`) to exports/<variant>/model.onnx (float32
images (N, 1, 28, 28) in [0, 1], dynamic batch), quantises it to int8 weights in
exports/<variant>/model.int8.onnx, and measures the three forms (torch eager, onnx, int8) on the
full test set the ways a model is served: accuracy with the whole set in one batch and one image
at a time (int8's dynamic quantisation scales activations per batch, so its accuracy depends on
the batch), file size, and CPU latency at batch 1 and batch 1,000.

metrics/export/<variant>.json holds what DVC compares and what is the same on every run (accuracy,
bytes). Latencies differ from run to run: they go to MLflow only (metrics, and
`export/benchmark.json` with the machine and versions), with both ONNX models (`record`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import file_md5, load_dataset
from mnist_pipeline.device import as_float
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.fileio import write_atomic, write_json_atomic
from mnist_pipeline.logged_model import inference_model
from mnist_pipeline.models import INPUT_SHAPE

if TYPE_CHECKING:
    import onnx

OPSET = 18  # ONNX Runtime 1.17+ runs it; the exporter's own default moves with torch releases
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
FORMS = ("torch", "onnx", "int8")  # the checkpoint in torch eager, its ONNX export, int8 ONNX
# Latency: medians of this many timed calls after a warm-up; a few seconds per variant on 2 cores.
CALLS = {1: 200, 1_000: 20}
WARMUP = {1: 20, 1_000: 2}


def export(params: Params, variant: str, root: Path) -> dict[str, float]:
    """Write both ONNX forms of `variant`'s checkpoint, measure them with the checkpoint itself,
    write the metrics, and record the forms and the measurements in the training run."""
    from mnist_pipeline import record

    outputs = paths.pipeline_outputs(root, variant)
    model, _ = checkpoint.load(outputs.checkpoint, variant)  # first: a missing one is likeliest
    store = record.open_store(root, params.data.dataset)
    md5 = file_md5(outputs.checkpoint)
    served = inference_model(model)
    fp32 = _guarded(variant, "ONNX export", lambda: to_onnx(served, variant, md5))
    int8 = _guarded(variant, "int8 quantisation", lambda: quantise(fp32))
    data = load_dataset(root, params.data.dataset)
    x = as_float(data.test_images, torch.device("cpu"))
    y = data.test_labels.numpy()
    runners = {
        "torch": lambda: _torch_runner(served),
        "onnx": lambda: _guarded(variant, "ONNX Runtime", lambda: _ort_runner(fp32)),
        "int8": lambda: _guarded(variant, "ONNX Runtime", lambda: _ort_runner(int8)),
    }
    inputs = {"torch": x, "onnx": x.numpy(), "int8": x.numpy()}
    sizes = {"torch": outputs.checkpoint.stat().st_size, "onnx": len(fp32), "int8": len(int8)}
    # One form at a time, each session made just before and dropped after: ONNX Runtime's
    # threads spin a while after a call, which would slow the next form's measurement.
    figures = {
        form: measure(runners[form](), inputs[form], y) | {"bytes": sizes[form]} for form in FORMS
    }

    # Written once all is measured: a failure above leaves the previous export whole.
    folder = outputs.export_dir
    for name, serialised in (
        (record.EXPORT_FILES["onnx"], fp32),
        (record.EXPORT_FILES["int8"], int8),
    ):
        write_atomic(folder / name, lambda tmp, data=serialised: tmp.write_bytes(data))
    kept = {
        f"{form}/{k}": _rounded(v)
        for form in FORMS
        for k, v in figures[form].items()
        if "latency" not in k
    }
    write_json_atomic(outputs.export_metrics, kept)
    training = record.Training(variant, outputs, params.data)
    live = _benchmark(variant, md5, data.name, figures, y)
    done = record.agree(store, training, parts=("export",), live_export=live)
    print(f"{variant}: {_shown(figures)}")
    print(
        f"{variant}: wrote {folder.relative_to(root)}/, "
        f"{outputs.export_metrics.relative_to(root)}; " + "; ".join(done)
    )
    return {f"{form}/{k}": v for form in FORMS for k, v in figures[form].items()}


def _shown(figures: dict) -> str:
    return ", ".join(
        f"{form} {f['accuracy']:.4f} (batch 1: {f['accuracy_b1']:.4f}; {f['bytes'] / 1e3:.0f} kB, "
        f"{f['latency_b1_ms']:.3f} ms/b1, {f['latency_b1000_ms']:.2f} ms/b1000)"
        for form, f in figures.items()
    )


def _rounded(value: float) -> float | int:
    return value if isinstance(value, int) else round(float(value), 6)


def _guarded(variant: str, what: str, step: Callable[[], Any]) -> Any:
    """Run one step of the export; any failure is one PipelineError line naming the variant."""
    try:
        return step()
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(f"{variant}: {what} failed ({first_line(err)})") from err


# --- the two ONNX forms ---------------------------------------------------------------------------


def to_onnx(served: nn.Sequential, variant: str, checkpoint_md5: str) -> bytes:
    """The served model as a single-file ONNX model (serialised), batch dimension dynamic.

    torch.export-based exporter (the TorchScript one is deprecated). What differs between two
    hosts exporting the same checkpoint is dropped: per-node debug metadata (stack traces with
    absolute paths) and the torch build suffix (+cpu, +cu130); the same checkpoint, torch and
    onnxscript then give the same bytes."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        served,
        (torch.zeros(2, *INPUT_SHAPE),),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    proto = program.model_proto
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del item.metadata_props[:]
    del graph.metadata_props[:]
    proto.producer_version = torch.__version__.split("+")[0]
    proto.doc_string = f"mnist-pipeline {variant}: float32 images (N, 1, 28, 28) in [0, 1] -> " + (
        "class probabilities (N, 10)"
    )
    onnx.helper.set_model_props(
        proto, {"mnist_pipeline.variant": variant, "mnist_pipeline.checkpoint_md5": checkpoint_md5}
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def quantise(fp32: bytes) -> bytes:
    """int8 weights, activations quantised per batch at run time (ONNX Runtime's dynamic
    quantisation): no calibration data, and the activation range always fits the batch.

    ORT quantises MatMul, not Gemm (what nn.Linear exports to), dynamically: each Gemm becomes
    MatMul + Add first. Weights per output channel: one scale per column keeps small columns
    precise. Pre-processed for shapes only: ORT's graph optimisation there would fuse MatMul + Add
    back into Gemm."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = _gemm_as_matmul(onnx.load_from_string(fp32))
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(model, source, skip_optimization=True)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
        return target.read_bytes()


def _gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W, b) with a constant W and plain attributes (alpha = beta = 1, transA = 0) as
    MatMul(x, W or Wᵀ) + b: the same function, in the ops ORT's dynamic quantisation covers."""
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0)
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        weight = weights[node.input[1]]
        if attrs.get("transB", 0):
            array = np.ascontiguousarray(numpy_helper.to_array(weight).T)
            weight.CopyFrom(numpy_helper.from_array(array, weight.name))
        bias = node.input[2] if len(node.input) > 2 else ""
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], node.name))
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], [node.output[0]], f"{node.name}_b")
            )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # shapes of the old layout; the quantiser infers them again
    return model


# --- measuring ------------------------------------------------------------------------------------

Runner = Callable[[Any], np.ndarray]


def _torch_runner(served: nn.Sequential) -> Runner:
    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return served(batch).numpy()

    return run


def _ort_runner(model: bytes) -> Runner:
    """An ONNX Runtime CPU session (default threads and graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on its own graph rewrites
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {INPUT_NAME: batch})[0]


def measure(run: Runner, x: Any, y: np.ndarray) -> dict[str, float]:
    """Accuracy over the whole test set in one batch and one image at a time, and the median
    latency in ms of one call at batch 1 and at batch 1,000 (the test images, repeated if there
    are fewer)."""
    figures = {
        "accuracy": float((run(x).argmax(1) == y).mean()) if len(y) else 0.0,
        "accuracy_b1": sum(int(run(x[i : i + 1]).argmax(1)[0] == y[i]) for i in range(len(y)))
        / max(len(y), 1),
    }
    for size, calls in CALLS.items():
        index = np.arange(size * (WARMUP[size] + calls)) % len(y)
        batches = [x[index[i : i + size]] for i in range(0, len(index), size)]
        seconds = []
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            run(batch)
            if i >= WARMUP[size]:
                seconds.append(time.perf_counter() - start)
        figures[f"latency_b{size}_ms"] = statistics.median(seconds) * 1e3
    return figures


def _benchmark(variant, md5, dataset, figures, y) -> dict[str, Any]:
    """Everything measured, and what it depends on (versions, the CPU, thread counts)."""
    import onnx
    import onnxruntime as ort
    import onnxscript

    from mnist_pipeline.tracking import cpu_model

    return {
        "variant": variant,
        "checkpoint_md5": md5,
        "dataset": dataset,
        "test_images": len(y),
        "forms": {form: {k: _rounded(v) for k, v in figures[form].items()} for form in FORMS},
        "latency": {
            "unit": "ms, median of one call",
            "calls": {f"batch_{k}": v for k, v in CALLS.items()},
            "warmup_calls": {f"batch_{k}": v for k, v in WARMUP.items()},
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_provider": "CPUExecutionProvider",
        },
        "int8": "ONNX Runtime dynamic quantisation: int8 weights per channel, uint8 activations",
        "cpu": cpu_model(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnxscript": onnxscript.__version__,
        },
    }
