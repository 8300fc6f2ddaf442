"""The SPEC's floors: each variant's default recipe on the full data set reaches its test
accuracy floor. Slow (minutes), needs the real data:
`MNIST_MIRROR=../shared/data/mnist make test-slow`."""

from __future__ import annotations

import os

import pytest

from mnist_pipeline.models import VARIANTS
from tests.conftest import committed_params_text

# SPEC: published accuracy minus half a point, or just under what the recipe measures.
FLOORS = {
    "logistic_regression": 0.910,
    "ffn1_sigmoid": 0.905,
    "ffn1_tanh": 0.945,
    "ffn1_relu": 0.945,
    "ffn2_relu": 0.955,
    "ffn3_relu": 0.960,
    "mlp_tanh_sigmoid_softmax": 0.970,  # the buggy tutorial's figure: trained right, it beats it
    "mlp_relu_dropout": 0.960,
    "mlp512_relu": 0.975,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("MNIST_MIRROR"), reason="set MNIST_MIRROR to the data"),
]


@pytest.fixture(scope="module")
def full_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    (root / "params.yaml").write_text(committed_params_text())
    return root


def test_every_variant_has_a_floor():
    assert set(FLOORS) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_recipe_reaches_its_floor(full_project, variant, monkeypatch):
    from mnist_pipeline.config import load_params
    from mnist_pipeline.download import download
    from mnist_pipeline.evaluate import evaluate
    from mnist_pipeline.train import train

    monkeypatch.setenv("MNIST_PIPELINE_ROOT", str(full_project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{full_project / 'mlflow.db'}")
    monkeypatch.delenv("MNIST_CHECKSUMS_FILE", raising=False)
    params = load_params(full_project / "params.yaml")
    download(params.data, full_project)
    train(params, variant, full_project)
    metrics = evaluate(params, variant, full_project)
    accuracy = metrics["test/accuracy"]
    assert accuracy >= FLOORS[variant], f"{variant}: {accuracy:.4f} < floor {FLOORS[variant]}"
    if variant == "mlp_tanh_sigmoid_softmax":
        assert accuracy > 0.970
