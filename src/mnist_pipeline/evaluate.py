"""Stage 3, `mnist-pipeline evaluate --variant NAME`: score a checkpoint on the 10,000 test images.

    mnist-pipeline evaluate --variant mlp_relu_dropout

Writes metrics/test/<variant>.json (DVC metrics) and plots/predictions/<variant>.csv (a DVC
confusion-matrix plot), and logs the same numbers, a confusion-matrix image and a grid of
misclassified examples to the variant's training run. If that run is not in this tracking store
(the checkpoint came from DVC's cache on another machine, say), a new evaluation run is recorded,
linked to the checkpoint by its MD5 and the original run id.
"""

from __future__ import annotations

import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import paths
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import file_md5, load_dataset
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import NUM_CLASSES, VARIANTS, build_model, logits_view
from mnist_pipeline.train import CHECKPOINT_FORMAT, as_float, resolve_device


def load_checkpoint(path: Path, variant: str | None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    """Rebuild the model from a checkpoint this pipeline wrote. Loaded with weights_only=True:
    a file that is not ours, or was tampered with to carry code, is refused, never executed."""
    if not path.is_file():
        name = variant or "<variant>"
        raise PipelineError(
            f"{path}: no checkpoint; train it first: `mnist-pipeline train --variant {name}` "
            f"(or `dvc repro train@{name}`)"
        )
    refuse = f"{path}: refused to load: not a checkpoint written by mnist-pipeline, or corrupt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a pickle it is about to refuse
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not torch's message: it suggests weights_only=False, i.e. running the file's code.
        raise PipelineError(f"{refuse} (it holds more than tensors and plain values)") from None
    except Exception as err:  # a foreign file fails torch.load in many ways (KeyError included)
        raise PipelineError(f"{refuse} ({first_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{refuse} (missing format marker {CHECKPOINT_FORMAT!r})")
    name = payload.get("variant")
    if name not in VARIANTS or (variant is not None and name != variant):
        raise PipelineError(f"{refuse} (it is for variant {name!r}, expected {variant!r})")
    recipe = payload.get("recipe") or {}
    model = build_model(name, use_dropout=bool(recipe.get("use_dropout", True)))
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise PipelineError(f"{refuse} (weights do not fit {name}: {str(err)[:200]})") from None
    return model.eval(), payload


@torch.no_grad()
def predict(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000):
    """Predicted classes and the mean loss (computed on logits, stably)."""
    net = logits_view(model.eval())
    preds, loss_sum = [], 0.0
    for start in range(0, len(y), chunk):
        logits = net(x[start : start + chunk])
        loss_sum += F.cross_entropy(logits, y[start : start + chunk], reduction="sum").item()
        preds.append(logits.argmax(1))
    return torch.cat(preds), loss_sum / max(len(y), 1)


def classification_metrics(y: torch.Tensor, pred: torch.Tensor, loss: float):
    """Accuracy, macro precision/recall/F1 and per-class accuracy; and the confusion matrix
    (rows: true class, columns: predicted class)."""
    y, pred = y.cpu(), pred.cpu()
    cm = torch.bincount(y * NUM_CLASSES + pred, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    metrics = {
        "test/loss": loss,
        "test/accuracy": tp.sum().item() / max(len(y), 1),
        "test/precision_macro": precision.mean().item(),
        "test/recall_macro": recall.mean().item(),
        "test/f1_macro": f1.mean().item(),
    }
    metrics |= {f"test/accuracy_class_{k}": recall[k].item() for k in range(NUM_CLASSES)}
    return metrics, cm


def evaluate(params: Params, variant: str, root: Path) -> dict[str, float]:
    from mnist_pipeline import tracking

    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri)
    checkpoint = paths.checkpoint_path(root, variant)
    model, meta = load_checkpoint(checkpoint, variant)
    data = load_dataset(root, params.data.dataset)
    device = resolve_device(params.train.device)
    model.to(device)
    x, y = as_float(data.test_images, device), data.test_labels.to(device)
    pred, loss = predict(model, x, y)
    metrics, cm = classification_metrics(y, pred, loss)

    write_json_atomic(paths.test_metrics_path(root, variant), metrics)
    pairs = zip(y.tolist(), pred.tolist(), strict=True)
    rows = ["actual,predicted"] + [f"{a},{p}" for a, p in pairs]
    write_text_atomic(paths.predictions_path(root, variant), "\n".join(rows) + "\n")
    run_id = _log_to_mlflow(
        root, uri, variant, model.cpu(), metrics, cm, data, pred.cpu(), meta, checkpoint
    )
    print(
        f"{variant}: test/accuracy {metrics['test/accuracy']:.4f} test/loss {loss:.4f} "
        f"(MLflow run {run_id})"
    )
    return metrics


def _training_run_id(client, root: Path, variant: str, meta: dict[str, Any]) -> str | None:
    """The checkpoint's training run, if this tracking store has it.

    The checkpoint names its run; mlflow_run.json beside it says the same once the run was
    completely logged. A run id from another store (DVC's cache, a colleague's machine) is None.
    """
    import json

    from mlflow.exceptions import MlflowException

    run_id = meta.get("run_id")
    info_path = paths.run_info_path(root, variant)
    try:
        if json.loads(info_path.read_text())["run_id"] != run_id:
            return None  # the checkpoint's run was never completely logged
        client.get_run(run_id)
    except (OSError, ValueError, KeyError, TypeError, MlflowException):
        return None
    return run_id


def _new_run_from_checkpoint(root, variant, model, data, meta, checkpoint) -> str:
    """Record a run for a checkpoint whose training run this store lacks: the recipe, the
    per-epoch history saved beside it, the summary and the model, linked by the checkpoint's MD5."""
    import os

    import mlflow

    from mnist_pipeline import tracking
    from mnist_pipeline.models import count_parameters, summary_text
    from mnist_pipeline.train import device_name, log_model

    experiment_id = tracking.run_experiment_id(data.name, root)
    tags = tracking.run_tags(root, variant, "cpu", device_name(torch.device("cpu")))
    tags |= {
        "data.dataset": data.name,
        "data.checksum": data.checksum,
        "run.source": "checkpoint",
        "checkpoint.md5": file_md5(checkpoint),
        "checkpoint.training_run_id": str(meta.get("run_id", "unknown")),
    }
    parent = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run`: become its child
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=variant, tags=tags, parent_run_id=parent
    ) as run:
        mlflow.log_params(
            {"variant": variant, **meta.get("recipe", {}), "num_params": count_parameters(model)}
        )
        for epoch, row in _history(root, variant):
            mlflow.log_metrics(row, step=epoch)
        mlflow.log_text(summary_text(model), "model_summary.txt")
        log_model(model)
    return run.info.run_id


def _history(root: Path, variant: str) -> list[tuple[int, dict[str, float]]]:
    """The per-epoch rows of plots/train/<variant>.csv, if present."""
    path = paths.history_path(root, variant)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    header, rows = lines[0].split(","), []
    for line in lines[1:]:
        values = dict(zip(header, line.split(","), strict=True))
        epoch = int(values.pop("epoch"))
        rows.append((epoch, {k: float(v) for k, v in values.items() if v}))
    return rows


def _log_to_mlflow(root, uri, variant, model, metrics, cm, data, pred, meta, checkpoint) -> str:
    import json
    import time

    import mlflow
    from mlflow.entities import Metric

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    run_id = _training_run_id(client, root, variant, meta)
    if run_id is None:
        run_id = _new_run_from_checkpoint(root, variant, model, data, meta, checkpoint)

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "evaluation"
        folder.mkdir()
        (folder / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        (folder / "confusion_matrix.csv").write_text(
            "\n".join(",".join(str(v) for v in row) for row in cm.tolist()) + "\n"
        )
        _confusion_png(cm, folder / "confusion_matrix.png", variant)
        _misclassified_png(data.test_images, data.test_labels, pred, folder / "misclassified.png")
        client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    return run_id


def _confusion_png(cm: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(cm.numpy(), cmap="Blues")
    for (i, j), v in ((ij, cm[ij].item()) for ij in [(i, j) for i in range(10) for j in range(10)]):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if v > cm.max().item() / 2 else "black",
        )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{title}: confusion matrix",
        xticks=range(10),
        yticks=range(10),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _misclassified_png(images, labels, pred, path: Path, count: int = 36) -> None:
    """The first `count` misclassified test images as one tiled image (one axes: fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    wrong = (pred != labels).nonzero().flatten()[:count].tolist()
    cols, cell = 6, 34  # 28 px image + room for its caption
    rows = max(1, -(-len(wrong) // cols))
    canvas = np.full((rows * cell, cols * cell), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.1 + 0.4))
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        canvas[r * cell + 6 : r * cell + 34, c * cell + 3 : c * cell + 31] = 255 - images[i].numpy()
        ax.text(
            c * cell + 17,
            r * cell + 3,
            f"{labels[i].item()}→{pred[i].item()}",
            ha="center",
            va="center",
            fontsize=7,
            color="crimson",
        )
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    ax.set_title("misclassified (true→predicted)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
