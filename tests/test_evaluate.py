"""The evaluate stage: metrics files, the DVC confusion plot, the record made from them in the
training run, and a run rebuilt from the outputs when the training run is not in this store."""

from __future__ import annotations

import json
import pickle

import mlflow
import numpy as np
import pytest
import torch

from mnist_pipeline import paths
from mnist_pipeline.checkpoint import FORMAT
from mnist_pipeline.checkpoint import load as load_checkpoint
from mnist_pipeline.cli import main
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.evaluate import evaluate
from mnist_pipeline.metrics import DVC_METRICS, classification_metrics, confusion
from tests.helpers import train


def test_classification_metrics_by_hand():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion(y, pred)
    metrics = classification_metrics(cm, loss=0.5)
    assert cm[0].tolist()[:3] == [1, 1, 0] and cm[1].tolist()[:3] == [0, 2, 0]
    assert metrics["test/accuracy"] == pytest.approx(4 / 6)
    # class 0: p=1/2 r=1/2; class 1: p=2/3 r=1; class 2: p=1 r=1/2; classes 3-9 absent -> 0
    assert metrics["test/recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 10)
    assert metrics["test/precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 10)
    assert metrics["test/accuracy_class_1"] == 1.0


def _evaluated(root, variant):
    """Evaluate the pipeline's checkpoint of `variant`, as the `evaluate` command does."""
    params = load_params(root / "params.yaml")
    return evaluate(params, variant, root, paths.pipeline_outputs(root, variant))


def test_evaluate_writes_the_metrics_and_predictions_and_leaves_the_store_alone(tiny_data):
    root = tiny_data
    result = train(load_params(root / "params.yaml"), "ffn1_relu", root)
    metrics = _evaluated(root, "ffn1_relu")
    saved = json.loads(paths.pipeline_outputs(root, "ffn1_relu").test_metrics.read_text())
    # DVC's metrics file: what a person compares; per-class figures go to MLflow
    assert set(saved) == set(DVC_METRICS)
    assert saved["test/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
    rows = paths.pipeline_outputs(root, "ffn1_relu").predictions.read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 200
    # the record is sync's: the training run has no test figures yet
    assert "test/accuracy" not in mlflow.MlflowClient().get_run(result.run_id).data.metrics


def test_sync_records_the_evaluation_into_the_training_run(tiny_data, capsys):
    root = tiny_data
    result = train(load_params(root / "params.yaml"), "ffn1_relu", root)
    metrics = _evaluated(root, "ffn1_relu")
    assert main(["sync"]) == 0
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/misclassified.png"} <= names
    assert "evaluation/per_class.csv" in names
    # the test set as an evaluation input; the test figures linked to the logged model
    contexts = {i.tags[0].value: i.dataset.name for i in runs[0].inputs.dataset_inputs}
    assert contexts["evaluation"] == "mnist-test"
    logged = mlflow.get_logged_model(result.model_id)
    linked = {m.key: m for m in logged.metrics}
    assert linked["test/accuracy"].value == pytest.approx(metrics["test/accuracy"])
    assert linked["test/accuracy"].dataset_name == "mnist-test"
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "test/accuracy")
    assert len(history) == 1  # one value per name: the other forms' have names of their own


def test_every_run_of_the_same_bytes_is_complete_and_one_version_lists_every_host(
    tiny_data, monkeypatch, capsys
):
    """Two hosts (and a retrain) write the same checkpoint: each run gets the evaluation read
    back from the outputs, and the registry holds one version naming both hosts."""
    root = tiny_data
    params = load_params(root / "params.yaml")
    monkeypatch.setenv("MNIST_PIPELINE_HOST", "laptop")
    first = train(params, "logistic_regression", root)
    monkeypatch.setenv("MNIST_PIPELINE_HOST", "gpu-box")
    second = train(params, "logistic_regression", root)
    again = train(params, "logistic_regression", root)
    written = _evaluated(root, "logistic_regression")
    assert main(["sync"]) == 0
    client = mlflow.MlflowClient()
    for result in (first, second, again):
        run = client.get_run(result.run_id)
        assert run.data.metrics["test/accuracy"] == pytest.approx(written["test/accuracy"])
        assert "evaluation/confusion_matrix.png" in {
            a.path for a in client.list_artifacts(result.run_id, "evaluation")
        }
        linked = {m.key for m in mlflow.get_logged_model(result.model_id).metrics}
        assert "test/accuracy" in linked
    (version,) = client.search_model_versions("name = 'mnist-logistic_regression'")
    assert version.tags["hosts"] == "gpu-box,laptop"
    assert "gpu-box, laptop" in version.description and "**" not in version.description
    capsys.readouterr()
    assert main(["sync", "--verify"]) == 0
    assert "(0 recorded)" in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'mnist-logistic_regression'")) == 1


def test_checkpoint_from_another_store_gets_a_run_rebuilt_from_the_outputs(tiny_data, monkeypatch):
    root = tiny_data
    params = load_params(root / "params.yaml")
    trained = train(params, "ffn2_relu", root)  # into <root>/mlflow.db
    _evaluated(root, "ffn2_relu")

    other = root / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert main(["sync"]) == 0

    mlflow.set_tracking_uri(f"sqlite:///{other}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    checkpoint = paths.pipeline_outputs(root, "ffn2_relu").checkpoint
    assert run.info.run_id != trained.run_id and run.info.status == "FINISHED"
    assert run.data.tags["record.source"] == "outputs"
    assert run.data.tags["checkpoint.md5"] == file_md5(checkpoint)
    assert run.data.tags["run.kind"] == "pipeline"
    assert run.data.params["lr"] == str(params.variants["ffn2_relu"].lr)
    assert "test/accuracy" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [1]
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    assert logged.name.startswith("ffn2_relu-torch@")
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    assert np.asarray(model.predict(np.zeros((2, 1, 28, 28), np.float32))).shape == (2, 10)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda path: path.write_bytes(b"not a checkpoint"), id="garbage"),
        pytest.param(lambda path: path.write_bytes(pickle.dumps(Exploit())), id="pickled-code"),
        pytest.param(lambda path: torch.save({"state_dict": {}}, path), id="foreign-dict"),
        pytest.param(
            lambda path: torch.save(
                {"format": FORMAT, "variant": "ffn1_relu", "state_dict": {}},
                path,
            ),
            id="wrong-weights",
        ),
    ],
)
def test_foreign_or_tampered_checkpoint_is_refused(tmp_path, capsys, payload):
    path = tmp_path / "model.pt"
    payload(path)
    with pytest.raises(PipelineError, match="refused to load"):
        load_checkpoint(path, "ffn1_relu")
    assert "pwned" not in capsys.readouterr().out


def test_evaluate_without_checkpoint_says_to_train(tiny_data, capsys):
    assert main(["evaluate", "--variant", "ffn1_relu"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "mnist-pipeline train --variant ffn1_relu" in err
    assert err.count("\n") == 1
