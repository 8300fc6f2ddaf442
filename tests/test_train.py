"""The training stage: learning, determinism, the loss of each head, the checkpoint, and the
complete MLflow run (in a real temporary SQLite store), parametrized over the variant table."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.entities import Run

from mnist_pipeline import paths
from mnist_pipeline.cli import main
from mnist_pipeline.config import Recipe, load_params
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.device import resolve_device
from mnist_pipeline.loop import Split, evaluate_split, train_epoch
from mnist_pipeline.models import VARIANTS, build_model, logits_view
from tests.conftest import make_images, tiny_project
from tests.helpers import Trained as TrainResult
from tests.helpers import train

EPOCH_METRICS = (
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "time/epoch_seconds",
    "time/samples_per_second",
)


def tiny_split(n: int = 400, seed: int = 3) -> Split:
    images, labels = make_images(n, seed)
    x = torch.from_numpy(images).unsqueeze(1).float() / 255
    return Split(x, torch.from_numpy(labels).long())


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_lowers_the_loss(variant):
    torch.manual_seed(0)
    data = tiny_split()
    model = build_model(variant)
    lr = 0.5 if variant.startswith(("ffn", "logistic")) else 3e-3
    cls = torch.optim.SGD if variant.startswith(("ffn", "logistic")) else torch.optim.Adam
    optimizer = cls(model.parameters(), lr=lr)
    before, _ = evaluate_split(model, data)
    for _ in range(3):
        train_epoch(model, optimizer, data, 32, generator=torch.Generator().manual_seed(0))
    after, _ = evaluate_split(model, data)
    assert after < before


def test_probability_head_trains_on_the_log_of_its_output():
    """NLL of log(softmax output), computed stably as log_softmax of the logits."""
    torch.manual_seed(0)
    model = build_model("mlp_tanh_sigmoid_softmax").eval()
    data = tiny_split(64)
    nll_of_log_probs = F.nll_loss(torch.log(model(data.x)), data.y)
    stable = F.cross_entropy(logits_view(model)(data.x), data.y)
    double_softmax = F.cross_entropy(model(data.x), data.y)  # the tutorial's bug
    assert torch.allclose(nll_of_log_probs, stable, atol=1e-5)
    assert not torch.allclose(stable, double_softmax, atol=1e-3)


def test_train_epoch_visits_every_sample_once_without_shuffle():
    data = tiny_split(100)
    model = build_model("logistic_regression")
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), data, 32, generator=None)
    assert seen == [32, 32, 32, 4]


def test_cuda_requested_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    from mnist_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="cuda"):
        resolve_device("cuda")
    assert resolve_device("auto").type in {"cpu", "mps"}


def _runs(root: Path) -> list[Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@dataclass(frozen=True)
class Trained:
    """One training of `variant` in a project of its own, and the one run its store holds."""

    root: Path
    variant: str
    recipe: Recipe
    result: TrainResult
    run: Run

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")


@pytest.fixture(scope="module", params=["ffn1_relu", "mlp_tanh_sigmoid_softmax"])
def one_trained(request, tiny_mirror, tmp_path_factory) -> Iterator[Trained]:
    variant = request.param
    with pytest.MonkeyPatch.context() as monkeypatch:
        root = tiny_project(
            monkeypatch, tiny_mirror, tmp_path_factory.mktemp(variant) / "p", data=True
        )
        params = load_params(root / "params.yaml")
        result = train(params, variant, root)
        (run,) = _runs(root)
        yield Trained(root, variant, params.variants[variant], result, run)


@pytest.fixture
def trained(one_trained: Trained) -> Trained:
    """The module's training, with MLflow's process-wide store pointed at its own."""
    mlflow.set_tracking_uri(f"sqlite:///{one_trained.root / 'mlflow.db'}")
    return one_trained


def test_the_run_is_finished_and_named_after_variant_and_host(trained):
    run = trained.run
    assert run.info.run_id == trained.result.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{trained.variant}@{run.data.tags['host']}"
    assert run.data.tags["run.kind"] == "pipeline"
    assert trained.variant in run.data.tags["mlflow.note.content"]  # the run's description


def test_the_recipe_settings_and_size_are_params(trained):
    params, recipe = trained.run.data.params, trained.recipe
    assert params["variant"] == trained.variant
    assert params["optimizer"] == recipe.optimizer
    assert float(params["lr"]) == recipe.lr
    assert params["batch_size"] == str(recipe.batch_size)
    assert params["epochs"] == str(recipe.epochs)
    assert params["val_size"] == "100"
    size = sum(p.numel() for p in build_model(trained.variant).parameters())
    assert params["num_params"] == str(size)


def test_each_epoch_metric_has_one_step_per_epoch(trained):
    for name in EPOCH_METRICS:
        history = trained.client.get_metric_history(trained.run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, trained.recipe.epochs + 1)), name


def test_the_tags_name_variant_host_device_versions_commit_and_data(trained):
    tags = trained.run.data.tags
    for key in (
        "variant",
        "host",
        "device",
        "device.name",
        "torch.version",
        "cuda.version",
        "git.commit",
        "data.dataset",
        "data.checksum",
    ):
        assert tags.get(key), key
    assert tags["device"] == "cpu" and tags["data.dataset"] == "mnist"


def test_the_data_is_a_dataset_input_per_context(trained):
    inputs = {i.tags[0].value: i.dataset for i in trained.run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].name == "mnist-train" and len(inputs["training"].digest) == 32


def test_the_torchsummary_table_is_an_artifact(trained):
    artifacts = {a.path for a in trained.client.list_artifacts(trained.run.info.run_id)}
    assert "model_summary.txt" in artifacts
    uri = f"runs:/{trained.run.info.run_id}/model_summary.txt"
    assert "Total params" in mlflow.artifacts.load_text(uri)


def test_the_logged_model_is_named_after_variant_form_host_and_run_and_no_metric_sent_twice(
    trained,
):
    """Training links no metric to the model: linking one means sending the run's point again,
    which a PostgreSQL store refuses as a duplicate (the evaluation record links the test
    figures)."""
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[trained.run.info.experiment_id],
        filter_string=f"source_run_id = '{trained.result.run_id}'",
        output_format="list",
    )
    host, short = trained.run.data.tags["host"], trained.result.run_id[:8]
    assert logged.name == f"{trained.variant}-torch@{host}-{short}"
    assert logged.model_id == trained.result.model_id
    assert logged.tags["export.form"] == "torch"
    assert not logged.metrics


def test_the_logged_model_returns_probabilities(trained):
    model = mlflow.pyfunc.load_model(f"models:/{trained.result.model_id}")
    for n in (1, 5):
        out = np.asarray(model.predict(np.random.rand(n, 1, 28, 28).astype(np.float32)))
        assert out.shape == (n, 10)
        assert np.allclose(out.sum(axis=1), 1, atol=1e-5)


def test_the_run_names_its_checkpoint_by_md5(trained):
    checkpoint = paths.pipeline_outputs(trained.root, trained.variant).checkpoint
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["variant"] == trained.variant and saved["recipe"]["lr"] == trained.recipe.lr
    assert trained.run.data.tags["checkpoint.md5"] == file_md5(checkpoint)


def test_dvc_metrics_and_history_hold_no_timings(trained):
    outputs = paths.pipeline_outputs(trained.root, trained.variant)
    summary = json.loads(outputs.train_metrics.read_text())
    assert summary["kept_epoch"] == trained.recipe.epochs and "val/accuracy" in summary
    assert not any(k.startswith("time/") for k in summary)  # timings: MLflow only
    header = outputs.history.read_text().splitlines()[0]
    assert header.split(",") == ["epoch", *EPOCH_METRICS[:4]]


def test_same_recipe_same_bytes(tiny_data):
    """Two trainings with one recipe and seed: the same DVC outputs, byte for byte; two runs."""
    root = tiny_data
    params = load_params(root / "params.yaml")
    files = (
        paths.pipeline_outputs(root, "mlp_relu_dropout").checkpoint,
        paths.pipeline_outputs(root, "mlp_relu_dropout").train_metrics,
        paths.pipeline_outputs(root, "mlp_relu_dropout").history,
    )
    first = train(params, "mlp_relu_dropout", root)
    before = [p.read_bytes() for p in files]
    second = train(params, "mlp_relu_dropout", root)
    assert [p.read_bytes() for p in files] == before
    assert first.run_id != second.run_id


def test_a_one_off_recipe_leaves_the_pipeline_outputs_alone(tiny_data):
    root = tiny_data
    assert main(["train", "--variant", "ffn1_relu"]) == 0
    pipeline = paths.pipeline_outputs(root, "ffn1_relu")
    files = (pipeline.checkpoint, pipeline.train_metrics, pipeline.history)
    before = [p.read_bytes() for p in files]
    assert main(["train", "--variant", "ffn1_relu", "--epochs", "2", "--lr", "0.05"]) == 0
    assert [p.read_bytes() for p in files] == before
    one_off = paths.one_off_outputs(root, "ffn1_relu")
    assert one_off.checkpoint.is_file() and one_off.checkpoint.parent == root / "one-off/ffn1_relu"
    kinds = {r.data.params["epochs"]: r.data.tags["run.kind"] for r in _runs(root)}
    assert kinds == {"1": "pipeline", "2": "one-off"}
    # evaluate scores the one-off checkpoint where it is, into its own run
    assert main(["evaluate", "--variant", "ffn1_relu", "--one-off"]) == 0
    assert one_off.test_metrics.is_file() and not pipeline.test_metrics.exists()
    evaluated = [r for r in _runs(root) if "test/accuracy" in r.data.metrics]
    assert [r.data.tags["run.kind"] for r in evaluated] == ["one-off"]


def test_an_override_equal_to_params_is_the_pipeline_recipe(tiny_data):
    """`--lr 0.1` where params.yaml says 0.1 is the pipeline's recipe: DVC's outputs."""
    lr = load_params(tiny_data / "params.yaml").recipe("ffn1_relu").lr
    assert main(["train", "--variant", "ffn1_relu", "--lr", str(lr)]) == 0
    assert paths.pipeline_outputs(tiny_data, "ffn1_relu").checkpoint.is_file()
    assert not (tiny_data / "one-off").exists()


def test_logged_model_loads_without_this_package(tiny_data):
    root = tiny_data
    result = train(load_params(root / "params.yaml"), "mlp_relu_dropout", root)
    code = f"""
import sys, numpy as np, mlflow
mlflow.set_tracking_uri("sqlite:///{root / "mlflow.db"}")
model = mlflow.pyfunc.load_model("models:/{result.model_id}")
out = np.asarray(model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32)))
assert out.shape == (3, 10), out.shape
assert np.allclose(out.sum(axis=1), 1, atol=1e-5), out.sum(axis=1)
assert not any(m.startswith("mnist_pipeline") for m in sys.modules)
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_cli_overrides_the_recipe(tiny_data):
    assert main(["train", "--variant", "ffn1_relu", "--epochs", "2", "--lr", "0.05"]) == 0
    (run,) = _runs(tiny_data)
    assert run.data.params["epochs"] == "2" and float(run.data.params["lr"]) == 0.05
    assert run.data.tags["run.kind"] == "one-off"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "nope"], "unknown variant 'nope'; choose from: logistic_regression"),
        (["--variant", "ffn1_relu", "--lr", "0"], "variants.ffn1_relu.lr: must be a positive"),
        (["--variant", "ffn1_relu", "--lr", "-1"], "variants.ffn1_relu.lr: must be a positive"),
        (["--variant", "ffn1_relu", "--epochs", "0"], "variants.ffn1_relu.epochs: must be at"),
        (["--variant", "ffn1_relu", "--batch-size", "0"], "batch_size: must be at least 1"),
        (["--variant", "ffn1_relu", "--optimizer", "rmsprop"], "'rmsprop' is not one of: sgd"),
        (["--variant", "ffn1_relu", "--device", "tpu"], "train.device: 'tpu' is not one of"),
        (["--variant", "ffn1_relu", "--use-dropout"], "unknown key 'use_dropout'"),
    ],
)
def test_bad_recipe_is_one_line_exit_2_and_no_run(tiny_data, capsys, args, message):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tiny_data / "mlflow.db").exists()
    assert not (tiny_data / "models").exists()


@pytest.mark.parametrize(
    ("accuracies", "keep", "kept"),
    [
        ([0.90, 0.95, 0.93], "best", 2),
        ([0.90, 0.95, 0.95], "best", 2),  # a tie keeps the first epoch to get there
        ([0.90, 0.93, 0.95], "best", 3),
        ([0.90, 0.95, 0.93], "last", 3),
    ],
)
def test_the_checkpoint_keeps_the_best_validation_epoch(tiny_data, accuracies, keep, kept):
    """`fit` keeps the epoch `keep` names; the validation accuracies are the test's."""
    from mnist_pipeline.loop import SetUp, fit, make_optimizer

    params = load_params(tiny_data / "params.yaml")
    recipe = dataclasses.replace(params.variants["logistic_regression"], epochs=len(accuracies))
    model = build_model("logistic_regression")
    split = Split(torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,)))
    epochs = iter(enumerate(accuracies, start=1))

    def validate(model, data):
        epoch, accuracy = next(epochs)
        with torch.no_grad():
            model[1].bias.fill_(epoch)  # the weights say which epoch they are from
        return 1.0, accuracy

    with mock.patch("mnist_pipeline.loop.evaluate_split", validate):
        setup = SetUp(model, make_optimizer(recipe, model), None, split, split)
        fitted = fit(setup, recipe=recipe, keep=keep, on_epoch=lambda row, epoch: None, label="t")
    assert fitted.kept_epoch == kept
    assert fitted.kept_state["1.bias"][0].item() == kept
    assert [row["val/accuracy"] for row in fitted.history] == accuracies


def test_a_copied_project_keeps_its_store_whole(tiny_data, tmp_path, monkeypatch, capsys):
    """The local store records absolute artifact paths: a copy of the project (the original then
    deleted) must read its old runs' artifacts and write new ones inside itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the project's own store, <root>/mlflow.db
    first = train(load_params(tiny_data / "params.yaml"), "logistic_regression", tiny_data)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    shutil.rmtree(tiny_data)
    monkeypatch.setenv("MNIST_PIPELINE_ROOT", str(copy))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # mlflow.set_tracking_uri exported the first's
    capsys.readouterr()
    second = train(load_params(copy / "params.yaml"), "logistic_regression", copy)
    assert (
        f"the project moved from {(tiny_data / 'mlartifacts').as_uri()}" in capsys.readouterr().out
    )

    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    for result in (first, second):
        run = client.get_run(result.run_id)
        assert run.info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
        assert "model_summary.txt" in {a.path for a in client.list_artifacts(result.run_id)}
    mlflow.set_tracking_uri(f"sqlite:///{copy / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{first.model_id}")
    assert np.asarray(model.predict(np.zeros((1, 1, 28, 28), np.float32))).shape == (1, 10)
