"""The CUDA path: data resident on the GPU, training and evaluation there, a model logged from
CPU weights. Skipped on hosts without a CUDA device (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_picks_cuda_and_the_data_lives_there(tiny_data):
    from mnist_pipeline.config import load_params
    from mnist_pipeline.dataset import load_dataset
    from mnist_pipeline.device import resolve_device
    from mnist_pipeline.train import train_val_split

    params = load_params(tiny_data / "params.yaml")
    device = resolve_device("auto")
    assert device.type == "cuda"
    train, val = train_val_split(load_dataset(tiny_data, "mnist"), 100, 0, device)
    assert train.x.is_cuda and train.y.is_cuda and val.x.is_cuda
    assert params.train.val_size == 100


def test_train_and_evaluate_on_cuda(tiny_data, monkeypatch):
    import mlflow
    import yaml

    from mnist_pipeline.cli import main

    monkeypatch.setenv("MNIST_PIPELINE_HOST", "gpu-test")
    params = yaml.safe_load((tiny_data / "params.yaml").read_text())
    params["train"]["device"] = "cuda"  # the pipeline's recipe (a --device flag is a one-off)
    (tiny_data / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "--variant", "mlp_relu_dropout"]) == 0
    assert main(["evaluate", "--variant", "mlp_relu_dropout"]) == 0
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["device"] == "cuda"
    assert run.data.tags["device.name"] == torch.cuda.get_device_name(0)
    assert run.data.tags["cuda.version"] == torch.version.cuda
    assert "test/accuracy" in run.data.metrics
    # logged from CPU weights: loads and predicts on the CPU
    model = mlflow.pyfunc.load_model("models:/mnist-mlp_relu_dropout@champion")
    out = np.asarray(model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32)))
    assert out.shape == (3, 10) and np.allclose(out.sum(axis=1), 1, atol=1e-5)
