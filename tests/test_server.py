"""A team's set-up in miniature: a real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts
proxied into a temporary folder). Training logs to it over HTTP, the model loads back from it,
`compare` reads it; a server that is not there stops training at once, with one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mnist_pipeline.cli import main
from mnist_pipeline.compare import compare
from mnist_pipeline.config import load_params
from tests.conftest import tiny_project
from tests.helpers import free_port, serving


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path  # where the server stores the artifacts it proxies


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    artifacts = base / "artifacts"
    command = [
        *(str(Path(sys.executable).with_name("mlflow")), "server"),
        *("--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}"),
        *("--serve-artifacts", "--artifacts-destination", artifacts.as_uri()),
        *("--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # one process less; no jobs here
    with serving(command, url=f"{url}/health", log=base / "server.log", env=env):
        yield Server(url, artifacts)


@pytest.fixture
def remote(server: Server, tiny_data: Path, monkeypatch) -> Iterator[Path]:
    """tiny_data's project, tracked on the server in an experiment of its own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{time.monotonic_ns()}")
    yield tiny_data
    mlflow.set_tracking_uri(None)  # the server goes away; leave no process-wide pointer to it


def train_as(host: str, variant: str, *flags: str, monkeypatch) -> str:
    monkeypatch.setenv("MNIST_PIPELINE_HOST", host)
    assert main(["train", "--variant", variant, *flags]) == 0
    (run,) = mlflow.search_runs(
        experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]],
        filter_string=f"tags.host = '{host}' and tags.variant = '{variant}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return run.info.run_id


def test_training_logs_over_http_and_the_model_loads_back(server, remote, monkeypatch):
    run_id = train_as("laptop", "ffn1_relu", "--device", "cpu", monkeypatch=monkeypatch)
    for command in (["evaluate", "--variant", "ffn1_relu"], ["export", "--variant", "ffn1_relu"]):
        assert main(command) == 0
    assert main(["sync"]) == 0

    run = mlflow.MlflowClient(server.url).get_run(run_id)
    assert run.data.tags["host"] == "laptop" and run.data.tags["device"] == "cpu"
    expected = {"train/loss", "val/accuracy", "time/median_epoch_seconds", "test/accuracy"}
    expected |= {"inference/latency_b1_ms", "int8/test/accuracy"}  # measured on this host
    assert expected <= set(run.data.metrics)
    # Artifacts went through the server into its own folder, not into the project.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(server.artifacts.rglob("MLmodel"))
    assert not (remote / "mlflow.db").exists() and not (remote / "mlartifacts").exists()

    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    forms = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string="tags.`export.form` = 'int8'",
        output_format="list",
    )
    int8 = mlflow.pyfunc.load_model(f"models:/{forms[0].model_id}")  # through the server too
    batch = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert np.asarray(model.predict(batch)).shape == (4, 10)
    assert int8.predict(batch)["probabilities"].shape == (4, 10)  # ONNX: outputs by name
    # ...and it is registered there, the champion of its name
    champion = mlflow.pyfunc.load_model("models:/mnist-ffn1_relu@champion")
    assert np.allclose(np.asarray(champion.predict(batch)).sum(axis=1), 1, atol=1e-5)


@dataclass(frozen=True)
class TwoHosts:
    """Runs from two hosts on the server, each host's pipeline as `dvc repro` would run it (the
    laptop: ffn1_relu; the gpu-box: ffn1_relu again, and logistic_regression; each host's `sync`
    last), then `compare` with every output; its groups are (laptop, box)."""

    root: Path
    table: pd.DataFrame
    printed: str
    out: Path

    @property
    def groups(self) -> tuple[str, str]:
        found = self.table.columns.get_level_values(0).unique()
        laptop, box = sorted(found, key=lambda g: not g.startswith("cpu-laptop"))
        return laptop, box


@pytest.fixture(scope="module")
def two_hosts(server, tiny_mirror, tmp_path_factory) -> Iterator[TwoHosts]:
    base = tmp_path_factory.mktemp("two-hosts")
    with pytest.MonkeyPatch.context() as monkeypatch:
        root = tiny_project(monkeypatch, tiny_mirror, base / "project", data=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-two-hosts")
        train_as("cpu-laptop", "ffn1_relu", "--device", "cpu", monkeypatch=monkeypatch)
        for command in ("evaluate", "export"):
            assert main([command, "--variant", "ffn1_relu"]) == 0
        assert main(["sync"]) == 0
        train_as("gpu-box", "ffn1_relu", monkeypatch=monkeypatch)  # auto: CUDA where there is
        train_as("gpu-box", "logistic_regression", monkeypatch=monkeypatch)
        for variant in ("ffn1_relu", "logistic_regression"):
            for command in ("evaluate", "export"):
                assert main([command, "--variant", variant]) == 0
        assert main(["sync"]) == 0
        out = base / "out"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            table = compare(
                load_params(root / "params.yaml"),
                root,
                csv_path=out / "compare.csv",
                markdown_path=out / "compare.md",
                chart_path=out / "compare.png",
            )
        print(printed.getvalue())  # what the user saw; `pytest -rP` shows it
        yield TwoHosts(root, table, printed.getvalue(), out)
    mlflow.set_tracking_uri(None)  # the server goes away; leave no process-wide pointer to it


def test_compare_shows_two_hosts_as_two_column_groups(two_hosts):
    laptop, box = two_hosts.groups
    assert len(two_hosts.table.columns.get_level_values(0).unique()) == 2
    assert laptop == "cpu-laptop · cpu" and box.startswith("gpu-box · ")
    assert laptop in two_hosts.printed and box in two_hosts.printed


def test_compare_lists_the_variants_in_the_registrys_order(two_hosts):
    assert list(two_hosts.table.index) == ["logistic_regression", "ffn1_relu"]


def test_compare_shows_each_hosts_own_figures(two_hosts):
    table, (laptop, box) = two_hosts.table, two_hosts.groups
    assert table.loc["ffn1_relu", (laptop, "test/accuracy")] > 0.5
    assert pd.isna(table.loc["logistic_regression", (laptop, "time/median_epoch_seconds")])
    assert table.loc["logistic_regression", (box, "time/median_samples_per_second")] > 0


def test_compare_says_whether_the_bytes_are_the_same(two_hosts):
    """On a CPU the gpu-box wrote the laptop's ffn1_relu checkpoint, byte for byte: `same`,
    and the same accuracy, recorded in its own run. On a GPU: the accuracy difference."""
    table, (laptop, box) = two_hosts.table, two_hosts.groups
    box_accuracy = table.loc["ffn1_relu", (box, "test/accuracy")]
    assert table.loc["ffn1_relu", (laptop, "bytes")] == "same"  # the reference group
    if box.endswith(" · cpu"):
        assert table.loc["ffn1_relu", (box, "bytes")] == "same"
        assert box_accuracy == table.loc["ffn1_relu", (laptop, "test/accuracy")]
    else:
        assert table.loc["ffn1_relu", (box, "bytes")].endswith(" pt")


def test_compare_shows_each_hosts_own_inference_figures(two_hosts):
    table, (laptop, box) = two_hosts.table, two_hosts.groups
    for group in (laptop, box):
        for metric in ("inference/latency_b1_ms", "int8/inference/latency_b1_ms"):
            assert table.loc["ffn1_relu", (group, metric)] > 0, (group, metric)
        assert table.loc["ffn1_relu", (group, "int8/test/accuracy")] > 0.5


def test_compare_writes_csv_markdown_and_a_chart(two_hosts):
    laptop, box = two_hosts.groups
    csv = pd.read_csv(two_hosts.out / "compare.csv", index_col=0)
    assert f"{laptop}: test/accuracy" in csv.columns and f"{box}: test/accuracy" in csv.columns
    assert f"{box}: int8/inference/latency_b1_ms" in csv.columns
    assert (two_hosts.out / "compare.md").read_text().count("\n| ") == 3  # header, 2 variants
    assert (two_hosts.out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_keeps_the_hosts_asked_for(two_hosts, server, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_PIPELINE_ROOT", str(two_hosts.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-two-hosts")
    assert main(["compare", "--hosts", "gpu-box"]) == 0
    printed = capsys.readouterr().out
    assert "gpu-box" in printed and "cpu-laptop" not in printed


def store_counts(client, experiment_id: str, registered: str) -> dict[str, int]:
    """What a second sync must not add to: runs, metric rows, logged models, model versions."""
    runs = client.search_runs([experiment_id])
    rows = sum(
        len(client.get_metric_history(run.info.run_id, key))
        for run in runs
        for key in run.data.metrics
    )
    run_ids = {run.info.run_id for run in runs}
    versions = [v for v in client.search_model_versions(f"name = '{registered}'")]
    return {
        "runs": len(runs),
        "metric rows": rows,
        "logged models": len(mlflow.search_logged_models(experiment_ids=[experiment_id])),
        "model versions": sum(v.run_id in run_ids for v in versions),
    }


def test_sync_rebuilds_a_new_server_from_the_outputs_once(server, remote, monkeypatch, capsys):
    """The outputs were recorded in another store; a new, empty server gets each variant's run
    rebuilt from them (tagged so, no timings), and a second sync adds nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{remote / 'elsewhere.db'}")
    for command in ("train", "evaluate", "export"):
        assert main([command, "--variant", "ffn1_relu"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    capsys.readouterr()
    assert main(["sync"]) == 0
    assert "ffn1_relu: rebuilt run" in capsys.readouterr().out

    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.`run.kind` = 'pipeline'"
    )  # and its forms' child runs
    assert run.data.tags["record.source"] == "outputs" and run.info.status == "FINISHED"
    assert run.data.tags["device"] == "unknown"
    assert not any(key.startswith("time/") for key in run.data.metrics)  # none invented
    written = json.loads((remote / "metrics" / "test" / "ffn1_relu.json").read_text())
    assert run.data.metrics["test/accuracy"] == written["test/accuracy"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    models = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id], output_format="list"
    )
    assert sorted(m.tags["export.form"] for m in models) == ["int8", "onnx", "torch"]
    assert all(m.name.startswith("ffn1_relu-") for m in models)
    # one version per checkpoint bytes, on this server whichever experiment and host made it
    versions = client.search_model_versions("name = 'mnist-ffn1_relu'")
    md5 = run.data.tags["checkpoint.md5"]
    (version,) = [v for v in versions if v.tags["checkpoint.md5"] == md5]
    assert "rebuilt from the pipeline's outputs" in version.description

    before = store_counts(client, experiment.experiment_id, "mnist-ffn1_relu")
    assert main(["sync"]) == 0
    assert store_counts(client, experiment.experiment_id, "mnist-ffn1_relu") == before
    assert "(0 recorded)" in capsys.readouterr().out
