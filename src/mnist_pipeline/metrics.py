"""Classification metrics from predictions, for `evaluate`'s DVC files and the MLflow record."""

from pathlib import Path

import numpy as np
import torch

from mnist_pipeline.models import NUM_CLASSES

# DVC's metrics file: what a person compares; the rest goes to MLflow, not crowding `dvc exp show`.
DVC_METRICS = ("test/accuracy", "test/loss", "test/f1_macro")


def confusion(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Counts, rows: true class, columns: predicted class."""
    flat = y.cpu().long() * NUM_CLASSES + pred.cpu().long()
    return torch.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class(cm: torch.Tensor):
    """Support, precision, recall (= the class's accuracy) and F1 per class, as tensors."""
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return support, precision, recall, f1


def classification_metrics(cm: torch.Tensor, loss: float) -> dict[str, float]:
    _, precision, recall, f1 = per_class(cm)
    metrics = {
        "test/loss": loss,
        "test/accuracy": cm.diag().sum().item() / max(cm.sum().item(), 1),
        "test/precision_macro": precision.mean().item(),
        "test/recall_macro": recall.mean().item(),
        "test/f1_macro": f1.mean().item(),
    }
    return metrics | {f"test/accuracy_class_{k}": recall[k].item() for k in range(NUM_CLASSES)}


def dvc_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The DVC metrics file's figures: six places, the same on every run."""
    return {k: round(metrics[k], 6) for k in DVC_METRICS}


def per_class_csv(cm: torch.Tensor) -> str:
    support, precision, recall, f1 = per_class(cm)
    lines = ["class,support,precision,recall,f1"]
    for k in range(NUM_CLASSES):
        lines.append(f"{k},{int(support[k])},{precision[k]:.4f},{recall[k]:.4f},{f1[k]:.4f}")
    return "\n".join(lines) + "\n"


def predictions_csv(y: torch.Tensor, pred: torch.Tensor) -> str:
    pairs = zip(y.tolist(), pred.tolist(), strict=True)
    return "\n".join(["actual,predicted"] + [f"{a},{p}" for a, p in pairs]) + "\n"


def read_predictions(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return torch.from_numpy(table[:, 0].copy()), torch.from_numpy(table[:, 1].copy())
