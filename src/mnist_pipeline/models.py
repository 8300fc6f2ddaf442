"""The model variants: a plain mapping from name to architecture, and one builder.

Stock layers in an `nn.Sequential`: a logged model unpickles without this package. torch is
imported inside the functions: `download` and `report` read VARIANTS without it."""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnist_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

HEADS = ("logits", "softmax")
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class Architecture:
    """Hidden layers as (width, activation), then a 10-way linear layer; dropout after each hidden
    activation (0: none); head "logits", or "softmax" (the network outputs probabilities)."""

    hidden: tuple[tuple[int, str], ...] = ()
    dropout: float = 0.0
    head: str = "logits"


VARIANTS: dict[str, Architecture] = {
    "logistic_regression": Architecture(),
    "ffn1_sigmoid": Architecture(hidden=((100, "sigmoid"),)),
    "ffn1_tanh": Architecture(hidden=((100, "tanh"),)),
    "ffn1_relu": Architecture(hidden=((100, "relu"),)),
    "ffn2_relu": Architecture(hidden=((100, "relu"),) * 2),
    "ffn3_relu": Architecture(hidden=((100, "relu"),) * 3),
    "mlp_tanh_sigmoid_softmax": Architecture(
        hidden=((96, "tanh"), (256, "sigmoid")), dropout=0.2, head="softmax"
    ),
    "mlp_relu_dropout": Architecture(hidden=((96, "relu"), (256, "relu")), dropout=0.2),
    "mlp512_relu": Architecture(hidden=((512, "relu"), (512, "relu"))),
}


def build_model(variant: str, use_dropout: bool = True) -> nn.Sequential:
    """Build `variant`. With use_dropout=False, dropout layers become identities (same params)."""
    from torch import nn

    activations = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    arch = VARIANTS[variant]
    for _, activation in arch.hidden:
        if activation not in activations:
            raise ConfigError(
                f"models.py: variant {variant!r} uses activation {activation!r}; "
                f"known activations: {', '.join(activations)}"
            )
    if arch.head not in HEADS:
        raise ConfigError(
            f"models.py: variant {variant!r} has head {arch.head!r}; "
            f"known heads: {', '.join(HEADS)}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    width = INPUT_SHAPE[1] * INPUT_SHAPE[2]
    for out_features, activation in arch.hidden:
        layers += [nn.Linear(width, out_features), activations[activation]()]
        if arch.dropout:
            layers.append(nn.Dropout(arch.dropout) if use_dropout else nn.Identity())
        width = out_features
    layers.append(nn.Linear(width, NUM_CLASSES))
    if arch.head == "softmax":
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def logits_view(model: nn.Sequential) -> nn.Sequential:
    """All of `model` but a final Softmax: cross-entropy on probabilities is a second softmax."""
    from torch import nn

    return model[:-1] if isinstance(model[-1], nn.Softmax) else model


def predict(model: nn.Sequential, x, y, chunk: int = 10_000):
    """Predicted classes of `x` and the mean loss against `y` (on logits), in eval mode, chunked."""
    import torch
    import torch.nn.functional as F

    net = logits_view(model.eval())
    preds, loss_sum = [], 0.0
    with torch.no_grad():
        for start in range(0, len(y), chunk):
            logits = net(x[start : start + chunk])
            loss_sum += F.cross_entropy(logits, y[start : start + chunk], reduction="sum").item()
            preds.append(logits.argmax(1))
    return torch.cat(preds), loss_sum / max(len(y), 1)


def inference_model(model: nn.Sequential) -> nn.Sequential:
    """The served form: a CPU copy in eval mode, dropout as identities, class probabilities out."""
    from torch import nn

    layers = [
        nn.Identity() if isinstance(layer, nn.Dropout) else layer
        for layer in copy.deepcopy(model).cpu()
    ]
    if not isinstance(layers[-1], nn.Softmax):
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary_text(model: nn.Module) -> str:
    from torchsummary import summary

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        summary(copy.deepcopy(model).cpu(), INPUT_SHAPE, device="cpu")
    return buffer.getvalue()
