"""The served form of a model and how it is logged to MLflow: one contract for every variant.

A logged model takes float32 images (N, 1, 28, 28) scaled to [0, 1] and returns class
probabilities (N, 10), rows summing to 1, whatever head the variant was trained with: dropout
layers become identities and a logits head gets a Softmax. It is a plain `nn.Sequential` of stock
layers, so it loads (`mlflow.pyfunc.load_model`, `mlflow models serve`) on a CPU-only host that
has torch and not this package.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from mnist_pipeline.models import INPUT_SHAPE, NUM_CLASSES

if TYPE_CHECKING:
    from mlflow.models import ModelSignature


def inference_model(model: nn.Sequential) -> nn.Sequential:
    """A CPU copy of `model` in eval mode that outputs probabilities: dropout as identities,
    a Softmax appended to a logits head. The trained weights are shared by value, not changed."""
    layers = [
        nn.Identity() if isinstance(layer, nn.Dropout) else layer
        for layer in copy.deepcopy(model).cpu()
    ]
    if not isinstance(layers[-1], nn.Softmax):
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers).eval()


def signature() -> ModelSignature:
    """Input: float32 images (-1, 1, 28, 28) in [0, 1]; output: float32 probabilities (-1, 10).
    Unnamed tensors: MLflow's PyTorch flavour serves a plain array (`{"inputs": [...]}`)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *INPUT_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


# The step a model is logged at. Under a run, MLflow links the run's metrics of that step to the
# model by sending them to the store a second time, which PostgreSQL refuses as duplicates (and
# the team server logs a driver error for each). No metric is at step -1: nothing is sent again.
# A model's own figures are linked by `evaluate` (its test metrics).
MODEL_STEP = -1


def log_model(model: nn.Sequential, variant: str, params: dict | None = None) -> str:
    """Log the served form of `model` to the active run as the logged model `variant`; return
    its model id (metrics logged with it show on the Models tab)."""
    import mlflow.pytorch
    import numpy as np

    served = inference_model(model)
    info = mlflow.pytorch.log_model(
        served,
        name=variant,
        signature=signature(),
        input_example=np.zeros((2, *INPUT_SHAPE), dtype=np.float32),
        params=params,
        step=MODEL_STEP,
        # The one requirement: scanning installed distributions costs seconds per run.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_id
