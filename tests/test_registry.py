"""Shipping the model: every variant's logged model returns probabilities, each evaluation
registers it as `<dataset>-<variant>`, the `champion` alias moves only to a better version, a
champion loads where this package is not installed, and `mlflow models serve` serves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from mnist_pipeline.cli import main
from mnist_pipeline.dataset import read_idx
from mnist_pipeline.models import VARIANTS
from tests.conftest import Mirror, tiny_params
from tests.helpers import free_port, serving

STARTUP_TIMEOUT_S = 180  # `mlflow models serve` imports MLflow, torch and a web server


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_mirror: Mirror) -> Iterator[Path]:
    """A project where every variant was trained (1 tiny epoch) and evaluated once."""
    root = tmp_path_factory.mktemp("registry")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    shutil.copytree(tiny_mirror.raw, root / "data" / "mnist")
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            env.delenv(name, raising=False)
        env.setenv("MNIST_PIPELINE_ROOT", str(root))
        env.setenv("MNIST_CHECKSUMS_FILE", str(tiny_mirror.checksums))
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        env.setenv("MNIST_PIPELINE_HOST", "registry-test")
        for variant in VARIANTS:
            assert main(["train", "--variant", variant]) == 0
            assert main(["evaluate", "--variant", variant]) == 0
        assert main(["sync"]) == 0  # records every evaluation, registers every model
        yield root


def test_each_evaluated_variant_is_registered_and_champion(registry):
    client = mlflow.MlflowClient()
    for variant in VARIANTS:
        champion = client.get_model_version_by_alias(f"mnist-{variant}", "champion")
        assert str(champion.version) == "1"
        assert champion.tags["hosts"] == "registry-test" and champion.tags["devices"] == "cpu"
        run = client.get_run(champion.run_id)
        assert float(champion.tags["test_accuracy"]) == pytest.approx(
            run.data.metrics["test/accuracy"], abs=1e-6
        )


def test_champions_load_without_this_package(registry):
    """A fresh process where `import mnist_pipeline` fails: each champion loads from the store
    and returns probabilities for float32 (N, 1, 28, 28) in [0, 1]."""
    code = f"""
import sys
sys.modules["mnist_pipeline"] = None  # importing it now raises ImportError
import mlflow, numpy as np
mlflow.set_tracking_uri("sqlite:///{registry / "mlflow.db"}")
batch = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
for variant in {list(VARIANTS)!r}:
    model = mlflow.pyfunc.load_model(f"models:/mnist-{{variant}}@champion")
    out = np.asarray(model.predict(batch))
    assert out.shape == (5, 10), (variant, out.shape)
    assert np.allclose(out.sum(axis=1), 1, atol=1e-5), (variant, out.sum(axis=1))
    assert (out >= 0).all(), variant
    print(variant, "ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_", "MLFLOW_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok") == len(VARIANTS)


def test_a_worse_retrain_leaves_the_champion_alone(registry, capsys):
    client = mlflow.MlflowClient()
    name = "mnist-ffn1_relu"
    before = client.get_model_version_by_alias(name, "champion")
    # a recipe that learns next to nothing in one epoch: a worse model, registered, not champion
    assert main(["train", "--variant", "ffn1_relu", "--lr", "1e-6"]) == 0
    assert main(["evaluate", "--variant", "ffn1_relu", "--one-off"]) == 0
    assert f"champion stays version {before.version}" in capsys.readouterr().out
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    worse = max(versions, key=lambda v: int(v.version))
    assert worse.tags["run.kind"] == "one-off"
    assert float(worse.tags["test_accuracy"]) < float(before.tags["test_accuracy"])
    assert client.get_model_version_by_alias(name, "champion").version == before.version
    # evaluating the same run again registers nothing new
    assert main(["evaluate", "--variant", "ffn1_relu", "--one-off"]) == 0
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_mlflow_models_serve_returns_probabilities(registry, tiny_mirror: Mirror, tmp_path):
    """The README's serving example, for real: a champion served on 127.0.0.1, test images
    posted as JSON, probabilities back, the right class for an easy image."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # (an active venv)
    command = [
        *(str(Path(sys.executable).with_name("mlflow")), "models", "serve"),
        *("-m", "models:/mnist-mlp512_relu@champion", "--env-manager", "local"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with serving(command, url=f"{url}/ping", log=log, timeout_s=STARTUP_TIMEOUT_S, env=env):
        images = read_idx(tiny_mirror.raw / "t10k-images-idx3-ubyte")[:4]
        labels = read_idx(tiny_mirror.raw / "t10k-labels-idx1-ubyte")[:4]
        batch = (images.numpy().astype(np.float32) / 255)[:, None]  # (4, 1, 28, 28) in [0, 1]
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            probabilities = np.asarray(json.load(response)["predictions"])
    assert probabilities.shape == (4, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # the tiny set's classes are bright patches: easy, and learnt in one epoch
    assert probabilities.argmax(axis=1).tolist() == labels.tolist()
