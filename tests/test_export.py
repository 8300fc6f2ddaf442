"""The export stage and its record: ONNX and int8 ONNX files that serve the checkpoint's
probabilities (dynamic batch), a metrics file of sizes alone, byte-identical re-exports, int8
weights that no x86 CPU saturates, one-line errors; then `sync`'s record on this host: each form's
figures measured here, and each ONNX form a child run with its logged model."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.cli import main
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import file_md5, load_dataset
from mnist_pipeline.device import as_float
from mnist_pipeline.evaluate import evaluate
from mnist_pipeline.export import QUANTISATION, export, to_onnx
from mnist_pipeline.models import build_model, inference_model
from tests.conftest import tiny_project
from tests.helpers import train

SHARED = (  # a form's figures, under the names every form shares
    "test/accuracy",
    "test/accuracy_b1",
    "inference/latency_b1_ms",
    "inference/latency_b1_p95_ms",
    "inference/throughput_b256",
    "model/size_bytes",
)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Exported:
    """One training, evaluation, export and sync of `variant` in a project of its own."""

    root: Path
    variant: str
    run_id: str
    model_id: str

    @property
    def outputs(self) -> paths.Outputs:
        return paths.pipeline_outputs(self.root, self.variant)

    @property
    def test_images(self) -> torch.Tensor:
        data = load_dataset(self.root, "mnist")
        return as_float(data.test_images, torch.device("cpu"))

    def served(self) -> torch.nn.Sequential:
        return inference_model(checkpoint.load(self.outputs.checkpoint, self.variant)[0])

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")

    def run(self):
        return self.client.get_run(self.run_id)

    def forms(self) -> dict:
        """{form: child run} of the training run."""
        children = self.client.search_runs(
            [self.run().info.experiment_id], f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        )
        return {child.data.tags["export.form"]: child for child in children}


@pytest.fixture(scope="module", params=["mlp_relu_dropout", "mlp_tanh_sigmoid_softmax"])
def one_exported(request, tiny_mirror, tmp_path_factory) -> Iterator[Exported]:
    variant = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = tmp_path_factory.mktemp(variant) / "project"
        root = tiny_project(monkeypatch, tiny_mirror, folder, data=True)
        params = load_params(root / "params.yaml")
        trained = train(params, variant, root)
        outputs = paths.pipeline_outputs(root, variant)
        evaluate(params, variant, root, outputs)
        export(variant, outputs)
        assert main(["sync"]) == 0
        yield Exported(root, variant, trained.run_id, trained.model_id)


@pytest.fixture
def exported(one_exported: Exported) -> Exported:
    """The module's export, with MLflow's process-wide store pointed at its own."""
    mlflow.set_tracking_uri(f"sqlite:///{one_exported.root / 'mlflow.db'}")
    return one_exported


def test_each_form_is_one_self_contained_file_and_nothing_else(exported):
    # no external weights beside them, no measurement (what a host measures: MLflow only)
    found = sorted(p.name for p in exported.outputs.export_dir.iterdir())
    assert found == sorted([exported.outputs.onnx.name, exported.outputs.int8.name])


def test_the_onnx_input_is_float_images_with_a_dynamic_batch(exported):
    proto = onnx.load(exported.outputs.onnx)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_onnx_gives_the_checkpoints_probabilities(exported):
    x = exported.test_images
    with torch.inference_mode():
        expected = exported.served()(x).numpy()
    probabilities = session(exported.outputs.onnx).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("form", ["onnx", "int8"])
def test_each_form_gives_probabilities_at_any_batch_size(exported, form):
    net, x = session(getattr(exported.outputs, form)), exported.test_images
    for n in (1, 7):
        out = net.run(None, {"images": x[:n].numpy()})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_the_metrics_file_holds_only_what_is_the_same_on_every_host(exported):
    """Sizes: a function of the bytes. Accuracy under int8 kernels and latency belong to a
    host: MLflow only."""
    metrics = json.loads(exported.outputs.export_metrics.read_text())
    assert set(metrics) == {"torch/bytes", "onnx/bytes", "int8/bytes"}
    assert metrics["int8/bytes"] <= metrics["onnx/bytes"] / 2  # 100k+ parameters


def test_int8_keeps_the_fp32_accuracy_here(exported):
    """As this host's kernels compute it, from the run's record; on the tests' small models a
    few images may flip, so the bound is looser than the full data's 0.1 pt."""
    metrics = exported.run().data.metrics
    assert metrics["onnx/test/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=0.005)
    assert metrics["int8/test/accuracy"] == pytest.approx(metrics["onnx/test/accuracy"], abs=0.02)


def test_int8_weights_have_seven_bits_so_no_x86_cpu_saturates(exported):
    """Without VNNI, x86's u8s8 kernels add two uint8 x int8 products in int16 (VPMADDUBSW):
    8-bit weights can overflow it (2 x 255 x 127 > 32,767), 7-bit ones (|w| <= 64) cannot
    (2 x 255 x 64 = 32,640)."""
    assert QUANTISATION == {"per_channel": True, "reduce_range": True, "weight_type": "QInt8"}
    proto = onnx.load(exported.outputs.int8)
    weights = [
        numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights and all(abs(int(w.min())) <= 64 and w.max() <= 64 for w in weights)


def test_the_same_checkpoint_exports_the_same_bytes(exported):
    # the export drops host paths and the torch build suffix
    md5 = file_md5(exported.outputs.checkpoint)
    again = to_onnx(exported.served(), exported.variant, md5)
    assert again == exported.outputs.onnx.read_bytes()


def test_the_torch_export_based_exporter_gives_the_same_model(exported):
    """The way forward when torch drops the TorchScript exporter: the same probabilities."""
    x = exported.test_images[:64].numpy()
    md5 = file_md5(exported.outputs.checkpoint)
    other = to_onnx(exported.served(), exported.variant, md5, dynamo=True)
    ours = session(exported.outputs.onnx).run(None, {"images": x})[0]
    theirs = ort.InferenceSession(other, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(theirs.run(None, {"images": x})[0], ours, atol=1e-6)


def test_the_training_run_holds_each_forms_figures_under_its_own_name(exported):
    metrics, run_id = exported.run().data.metrics, exported.run_id
    assert set(SHARED) - {"test/accuracy_b1"} <= set(metrics)  # the PyTorch form's
    assert {f"int8/{name}" for name in SHARED} <= set(metrics)  # int8: batch 1 scored too
    assert {f"onnx/{name}" for name in SHARED} - set(metrics) == {"onnx/test/accuracy_b1"}
    for name in ("test/accuracy", "inference/latency_b1_ms", "int8/test/accuracy"):
        assert len(exported.client.get_metric_history(run_id, name)) == 1, name
    measured = mlflow.artifacts.load_dict(f"runs:/{run_id}/inference/measured.json")
    assert set(measured["forms"]) == {"torch", "onnx", "int8"}
    assert measured["conditions"]["cpu"]["cpu.model"]


def test_each_onnx_form_is_a_child_run_with_its_logged_model(exported):
    forms, parent = exported.forms(), exported.run()
    assert set(forms) == {"onnx", "int8"}
    for form, child in forms.items():
        assert child.info.status == "FINISHED"
        assert child.info.run_name == f"{parent.info.run_name} · {form}"
        assert "variant" not in child.data.tags  # grouping runs by variant: pipeline runs only
        (model,) = mlflow.search_logged_models(
            experiment_ids=[child.info.experiment_id],
            filter_string=f"source_run_id = '{child.info.run_id}'",
            output_format="list",
        )
        assert (
            model.name
            == f"{exported.variant}-{form}@{parent.data.tags['host']}-" + (exported.run_id[:8])
        )
        linked = {m.key: m for m in model.metrics}
        # the Models tab: every form in the same columns (batch 1 scored for int8 alone)
        assert set(linked) == set(SHARED) - ({"test/accuracy_b1"} if form == "onnx" else set())
        assert {m.dataset_name for m in linked.values()} == {"mnist-test"}
        assert linked["test/accuracy"].value == parent.data.metrics[f"{form}/test/accuracy"]


def test_the_pytorch_model_carries_the_shared_names_too(exported):
    linked = {m.key for m in mlflow.get_logged_model(exported.model_id).metrics}
    assert set(SHARED) - {"test/accuracy_b1"} <= linked


def test_a_second_sync_measures_nothing_again(exported, capsys):
    before = exported.run().data.metrics["inference/latency_b1_ms"]
    assert main(["sync", "--verify"]) == 0
    assert "(0 recorded)" in capsys.readouterr().out
    assert exported.run().data.metrics["inference/latency_b1_ms"] == before
    assert len(exported.forms()) == 2


def test_latency_off_measures_the_accuracy_alone(tiny_data, monkeypatch, capsys):
    root, variant = tiny_data, "ffn1_relu"
    monkeypatch.setenv("MNIST_PIPELINE_LATENCY", "off")
    params = load_params(root / "params.yaml")
    run_id = train(params, variant, root).run_id
    export(variant, paths.pipeline_outputs(root, variant))
    assert main(["sync"]) == 0
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert "int8/test/accuracy" in metrics
    assert not [k for k in metrics if k.startswith(("inference/", "int8/inference/"))]


def test_export_without_checkpoint_says_to_train(tiny_data, capsys):
    assert main(["export", "--variant", "ffn1_relu"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "mnist-pipeline train --variant ffn1_relu" in err
    assert err.count("\n") == 1
    assert not paths.pipeline_outputs(tiny_data, "ffn1_relu").export_dir.exists()


def test_failing_quantisation_is_one_line_and_writes_nothing(tiny_data, monkeypatch, capsys):
    root = tiny_data
    params = load_params(root / "params.yaml")
    variant = "ffn1_relu"
    outputs = paths.pipeline_outputs(root, variant)
    checkpoint.save(outputs.checkpoint, build_model(variant), variant, params.variants[variant])

    def broken(_fp32: bytes) -> bytes:
        raise RuntimeError("no kernel for this op\nmore detail")

    monkeypatch.setattr("mnist_pipeline.export.quantise", broken)
    assert main(["export", "--variant", variant]) == 1
    err = capsys.readouterr().err
    assert "ffn1_relu: int8 quantisation failed (no kernel for this op)" in err
    assert err.count("\n") == 1
    assert not outputs.export_dir.exists()
    assert not outputs.export_metrics.exists()


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 question")
def test_int8_keeps_its_accuracy_on_a_cpu_without_vnni(exported):
    """The int8 model under ONNX Runtime on an emulated AVX2 CPU without VNNI (QEMU's Haswell):
    the kernels whose int16 sums saturated 8-bit weights (logistic_regression lost 0.74 pt on
    such a CPU). Its accuracy is this host's, and the fp32 model's, as strict as above."""
    if QEMU is None:
        if os.environ.get("CI"):  # CI never silently skips: `make test` installs qemu-user
            pytest.fail("qemu-x86_64 missing (make test-tools)")
        pytest.skip("needs Debian's qemu-user (make test-tools)")
    code = f"""
import json, numpy as np, onnxruntime as ort
x = np.load({str(exported.root / "x.npy")!r}); y = np.load({str(exported.root / "y.npy")!r})
found = {{}}
forms = {{"onnx": {str(exported.outputs.onnx)!r}, "int8": {str(exported.outputs.int8)!r}}}
for form, path in forms.items():
    net = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    found[form] = float((net.run(None, {{"images": x}})[0].argmax(1) == y).mean())
print(json.dumps(found))
"""
    data = load_dataset(exported.root, "mnist")
    np.save(exported.root / "x.npy", exported.test_images.numpy())
    np.save(exported.root / "y.npy", data.test_labels.numpy())
    command = [QEMU, "-cpu", "Haswell", sys.executable, "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    here = exported.run().data.metrics
    assert found["onnx"] == pytest.approx(here["onnx/test/accuracy"], abs=1e-9)
    assert found["int8"] == pytest.approx(found["onnx"], abs=0.02)
    assert found["int8"] == pytest.approx(here["int8/test/accuracy"], abs=0.005)
