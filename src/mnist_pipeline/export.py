"""The export stage: a checkpoint's served form as ONNX and int8 ONNX.

ONNX is imported inside: `record.export` reads QUANTISATION without it."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.fileio import write_atomic, write_json_atomic
from mnist_pipeline.models import INPUT_SHAPE, inference_model

if TYPE_CHECKING:
    import onnx
    from torch import nn

OPSET = 18  # ONNX Runtime 1.17+ runs it; the exporter's own default moves with torch releases
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
# 7-bit int8 weights (`reduce_range`): without VNNI, ORT's u8s8 kernels sum pairs of products in
# int16 (VPMADDUBSW), which 8-bit weights saturate (2 x 255 x 127 > 32,767: -0.74 pt for
# logistic_regression); 7 bits never do, so every x86 CPU computes the same int8 products.
QUANTISATION = {"per_channel": True, "reduce_range": True, "weight_type": "QInt8"}


def export(variant: str, outputs: paths.Outputs) -> dict[str, int]:
    """Write both ONNX forms of the checkpoint and their sizes, once every step has succeeded."""
    model, _ = checkpoint.load(outputs.checkpoint, variant)
    served = inference_model(model)
    md5 = file_md5(outputs.checkpoint)
    fp32 = _guarded(variant, "ONNX export", lambda: to_onnx(served, variant, md5))
    _guarded(variant, "the ONNX check", lambda: check_onnx(served, fp32))
    int8 = _guarded(variant, "int8 quantisation", lambda: quantise(fp32))
    for target, data in ((outputs.onnx, fp32), (outputs.int8, int8)):
        write_atomic(target, lambda tmp, data=data: tmp.write_bytes(data))
    sizes = {"torch/bytes": outputs.checkpoint.stat().st_size}
    sizes |= {"onnx/bytes": len(fp32), "int8/bytes": len(int8)}
    write_json_atomic(outputs.export_metrics, sizes)
    shown = ", ".join(f"{k.split('/')[0]} {v / 1e3:.0f} kB" for k, v in sizes.items())
    folder = outputs.export_dir
    print(f"{variant}: wrote {outputs.onnx.name}, {outputs.int8.name} in {folder} ({shown})")
    return sizes


def _guarded(variant: str, what: str, step):
    try:
        return step()
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(f"{variant}: {what} failed ({first_line(err)})") from err


def to_onnx(served: nn.Sequential, variant: str, checkpoint_md5: str, dynamo=False) -> bytes:
    """The served model as single-file ONNX, batch dynamic. TorchScript's exporter by default:
    0.5 s against 2.7 s for `dynamo=True` (benchmarks/README.md), the same graph. Debug metadata
    and torch's build suffix are dropped: one checkpoint and torch give the same bytes."""
    import onnx

    args = (served, (torch.zeros(2, *INPUT_SHAPE),))
    names = {"opset_version": OPSET, "input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if dynamo:
        batch = ({0: torch.export.Dim("batch", min=1)},)
        program = torch.onnx.export(
            *args, dynamo=True, dynamic_shapes=batch, verbose=False, **names
        )
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        batch = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the choice above, made knowingly
            torch.onnx.export(*args, buffer, dynamo=False, dynamic_axes=batch, **names)
        proto = onnx.load_from_string(buffer.getvalue())
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del item.metadata_props[:]
    del graph.metadata_props[:]
    proto.producer_version = torch.__version__.split("+")[0]
    proto.doc_string = (
        f"mnist-pipeline {variant}: float32 images (N, 1, 28, 28) in [0, 1] -> "
        "class probabilities (N, 10)"
    )
    props = {"mnist_pipeline.variant": variant, "mnist_pipeline.checkpoint_md5": checkpoint_md5}
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def check_onnx(served: nn.Sequential, fp32: bytes) -> None:
    """The same probabilities for seeded random images under ONNX Runtime as under torch."""
    x = torch.rand(64, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = served(x).numpy()
    got = ort_runner(fp32)(x.numpy())
    if not np.allclose(got, expected, atol=1e-5):
        worst = float(np.abs(got - expected).max())
        raise PipelineError(f"the ONNX model's probabilities differ from torch's by {worst:.2g}")


def ort_runner(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on its own graph rewrites
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def quantise(fp32: bytes) -> bytes:
    """ONNX Runtime's dynamic quantisation (QUANTISATION). It covers MatMul, not Gemm: each
    Gemm becomes MatMul + Add, and the pre-processing skips the optimisation that fuses them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = {**QUANTISATION, "weight_type": QuantType[QUANTISATION["weight_type"]]}
    model = _gemm_as_matmul(onnx.load_from_string(fp32))
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(model, source, skip_optimization=True)
        quantize_dynamic(source, target, **settings)
        return target.read_bytes()


def _gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W, b) with a constant W, alpha = beta = 1, transA = 0, as MatMul(x, W or Wᵀ) + b."""
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA")
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
            add = helper.make_node("Add", [product, bias], [node.output[0]], f"{node.name}_b")
            nodes.append(add)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # shapes of the old layout; the quantiser infers them again
    return model
