"""The export stage: ONNX and int8 ONNX files that serve the checkpoint's probabilities (dynamic
batch), the metrics file, the figures, the benchmark and two logged models in the training run,
byte-identical re-exports, and one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.cli import main
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import file_md5, load_dataset
from mnist_pipeline.device import as_float
from mnist_pipeline.export import export, to_onnx
from mnist_pipeline.logged_model import inference_model
from mnist_pipeline.models import build_model
from mnist_pipeline.train import train
from tests.conftest import tiny_project

FIGURES = ("accuracy", "accuracy_b1", "bytes", "latency_b1_ms", "latency_b1000_ms")
KEPT = FIGURES[:3]  # in the DVC metrics file: the same on every run


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Exported:
    """One training and export of `variant` in a project of its own."""

    root: Path
    variant: str
    run_id: str

    @property
    def folder(self) -> Path:
        return paths.pipeline_outputs(self.root, self.variant).export_dir

    @property
    def test_images(self) -> torch.Tensor:
        data = load_dataset(self.root, "mnist")
        return as_float(data.test_images, torch.device("cpu"))

    def served(self) -> torch.nn.Sequential:
        path = paths.checkpoint_path(self.root, self.variant)
        return inference_model(checkpoint.load(path, self.variant)[0])

    def run(self):
        return mlflow.MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}").get_run(self.run_id)


@pytest.fixture(scope="module", params=["mlp_relu_dropout", "mlp_tanh_sigmoid_softmax"])
def one_exported(request, tiny_mirror, tmp_path_factory) -> Iterator[Exported]:
    variant = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = tmp_path_factory.mktemp(variant) / "project"
        root = tiny_project(monkeypatch, tiny_mirror, folder, data=True)
        params = load_params(root / "params.yaml")
        trained = train(params, variant, root)
        export(params, variant, root)
        yield Exported(root, variant, trained.run_id)


@pytest.fixture
def exported(one_exported: Exported) -> Exported:
    """The module's export, with MLflow's process-wide store pointed at its own."""
    mlflow.set_tracking_uri(f"sqlite:///{one_exported.root / 'mlflow.db'}")
    return one_exported


def test_each_form_is_one_self_contained_file_and_nothing_else(exported):
    # no external weights beside them, no measurement (latencies go to MLflow only)
    assert sorted(p.name for p in exported.folder.iterdir()) == ["model.int8.onnx", "model.onnx"]


def test_the_onnx_input_is_float_images_with_a_dynamic_batch(exported):
    proto = onnx.load(exported.folder / "model.onnx")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_onnx_gives_the_checkpoints_probabilities(exported):
    x = exported.test_images
    with torch.inference_mode():
        expected = exported.served()(x).numpy()
    probabilities = session(exported.folder / "model.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("form", ["model.onnx", "model.int8.onnx"])
def test_each_form_gives_probabilities_at_any_batch_size(exported, form):
    net, x = session(exported.folder / form), exported.test_images
    for n in (1, 7):
        out = net.run(None, {"images": x[:n].numpy()})[0]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_the_metrics_file_holds_what_is_the_same_on_every_run(exported):
    outputs = paths.pipeline_outputs(exported.root, exported.variant)
    metrics = json.loads(outputs.export_metrics.read_text())
    assert set(metrics) == {f"{f}/{k}" for f in ("torch", "onnx", "int8") for k in KEPT}
    assert metrics["onnx/accuracy"] == pytest.approx(metrics["torch/accuracy"], abs=0.005)
    assert metrics["int8/accuracy"] == pytest.approx(metrics["torch/accuracy"], abs=0.05)
    assert metrics["int8/bytes"] <= metrics["onnx/bytes"] / 2  # 100k+ parameters


def test_the_same_checkpoint_exports_the_same_bytes(exported):
    # the export drops host paths and the torch build suffix
    md5 = file_md5(paths.checkpoint_path(exported.root, exported.variant))
    again = to_onnx(exported.served(), exported.variant, md5)
    assert again == (exported.folder / "model.onnx").read_bytes()


def test_the_training_run_gets_every_forms_measurements(exported):
    run = exported.run()
    assert run.info.status == "FINISHED"
    uri = f"runs:/{exported.run_id}/export/benchmark.json"
    benchmark = mlflow.artifacts.load_dict(uri)
    assert set(benchmark["forms"]["int8"]) == set(FIGURES)
    for form in ("torch", "onnx", "int8"):
        assert {f"export/{form}/{k}" for k in FIGURES} <= set(run.data.metrics)


def test_both_forms_are_logged_models_with_their_test_accuracy(exported):
    run, variant = exported.run(), exported.variant
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{exported.run_id}'",
        output_format="list",
    )
    by_name = {m.name: m for m in models}
    assert set(by_name) == {variant, f"{variant}-onnx", f"{variant}-int8"}
    for form in ("onnx", "int8"):
        linked = by_name[f"{variant}-{form}"].metrics
        # each logged model's test accuracy under one name: the Models tab compares every form
        keys = {f"export/{form}/{k}" for k in FIGURES} | {"test/accuracy"}
        assert {m.key for m in linked} == keys
        assert {m.dataset_name for m in linked} == {"mnist-test"}
    assert {m.model_id for m in run.outputs.model_outputs} == {m.model_id for m in models}


def test_checkpoint_without_a_training_run_gets_one_rebuilt(tiny_data):
    root = tiny_data
    params = load_params(root / "params.yaml")
    variant = "logistic_regression"  # an untrained one, saved by hand: no run in this store
    torch.manual_seed(0)
    model = build_model(variant)
    checkpoint.save(paths.checkpoint_path(root, variant), model, variant, params.variants[variant])
    figures = export(params, variant, root)
    assert figures["onnx/accuracy"] == figures["torch/accuracy"]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["record.source"] == "outputs"
    assert run.data.metrics["export/onnx/accuracy"] == figures["onnx/accuracy"]


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
    recipe = params.variants[variant]
    checkpoint.save(paths.checkpoint_path(root, variant), build_model(variant), variant, recipe)

    def broken(_fp32: bytes) -> bytes:
        raise RuntimeError("no kernel for this op\nmore detail")

    monkeypatch.setattr("mnist_pipeline.export.quantise", broken)
    assert main(["export", "--variant", variant]) == 1
    err = capsys.readouterr().err
    assert "ffn1_relu: int8 quantisation failed (no kernel for this op)" in err
    assert err.count("\n") == 1
    assert not paths.pipeline_outputs(root, variant).export_dir.exists()
    assert not paths.pipeline_outputs(root, variant).export_metrics.exists()
