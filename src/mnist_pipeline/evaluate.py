"""Stage 3, `mnist-pipeline evaluate --variant NAME`: score a checkpoint on the 10,000 test images.

    mnist-pipeline evaluate --variant mlp_relu_dropout

Writes metrics/test/<variant>.json (DVC metrics) and plots/predictions/<variant>.csv (a DVC
confusion-matrix plot), and logs the same numbers, a confusion-matrix image and a grid of
misclassified examples to the variant's training run. If that run is not in this tracking store
(the checkpoint came from DVC's cache on another machine, say), a new evaluation run is recorded,
linked to the checkpoint by its MD5 and the original run id.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import file_md5, load_dataset
from mnist_pipeline.device import as_float, resolve_device
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import NUM_CLASSES, logits_view

# What a person compares goes to DVC's metrics file; per-class figures and macro precision and
# recall go to the MLflow run (a table), where they do not crowd `dvc exp show`.
DVC_METRICS = ("test/accuracy", "test/loss", "test/f1_macro")


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


def evaluate(
    params: Params, variant: str, root: Path, outputs: paths.Outputs | None = None
) -> dict[str, float]:
    """Score the checkpoint in `outputs` (default: the pipeline's) on the test set; write the
    metrics and predictions beside the other outputs; log them into the run that trained it."""
    from mnist_pipeline import tracking

    outputs = outputs or paths.pipeline_outputs(root, variant)
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri)
    model, meta = checkpoint.load(outputs.checkpoint, variant)
    data = load_dataset(root, params.data.dataset)
    device = resolve_device(params.train.device)
    model.to(device)
    x, y = as_float(data.test_images, device), data.test_labels.to(device)
    pred, loss = predict(model, x, y)
    metrics, cm = classification_metrics(y, pred, loss)

    write_json_atomic(outputs.test_metrics, {k: round(metrics[k], 6) for k in DVC_METRICS})
    pairs = zip(y.tolist(), pred.tolist(), strict=True)
    rows = ["actual,predicted"] + [f"{a},{p}" for a, p in pairs]
    write_text_atomic(outputs.predictions, "\n".join(rows) + "\n")
    run_id = _log_to_mlflow(
        root, uri, params, variant, model.cpu(), metrics, cm, data, pred.cpu(), meta, outputs
    )
    print(
        f"{variant}: test/accuracy {metrics['test/accuracy']:.4f} test/loss {loss:.4f} "
        f"(MLflow run {run_id})"
    )
    return metrics


def _new_run_from_checkpoint(root, params, variant, model, data, meta, outputs, md5) -> str:
    """Record a run for a checkpoint whose training run this store lacks (DVC's cache, a
    colleague's machine, a store that failed mid-run): the recipe, the per-epoch history saved
    beside it, the summary and the model, tagged `run.source=checkpoint`."""
    import os

    import mlflow

    from mnist_pipeline import tracking
    from mnist_pipeline.device import device_name
    from mnist_pipeline.logged_model import log_model
    from mnist_pipeline.models import count_parameters, summary_text

    experiment_id = tracking.run_experiment_id(data.name, root)
    tracking.describe_experiment(experiment_id, data.name)
    recipe = meta.get("recipe", {})
    tags = tracking.run_tags(root, variant, "cpu", device_name(torch.device("cpu")))
    tags |= {
        "data.dataset": data.name,
        "data.checksum": data.checksum,
        tracking.RUN_KIND_TAG: "one-off" if outputs.one_off else "pipeline",
        tracking.NOTE_TAG: tracking.run_description(variant, recipe, data.name, data.checksum, root)
        + "\n\nRecorded from the checkpoint by `evaluate`: its training run is not in this store.",
        "run.source": "checkpoint",
    }
    parent = os.environ.get("MLFLOW_RUN_ID")  # under `mlflow run`: become its child
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=tracking.run_name(variant),
        tags=tags,
        parent_run_id=parent,
    ) as run:
        mlflow.log_params({"variant": variant, **recipe, "num_params": count_parameters(model)})
        for epoch, row in _history(outputs.history):
            mlflow.log_metrics(row, step=epoch)
        mlflow.log_text(summary_text(model), "model_summary.txt")
        log_model(model, variant, params={"variant": variant, **recipe})
        mlflow.set_tag(tracking.CHECKPOINT_TAG, md5)
    return run.info.run_id


def _history(path: Path) -> list[tuple[int, dict[str, float]]]:
    """The per-epoch rows of a history CSV (plots/train/<variant>.csv), if present."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    header, rows = lines[0].split(","), []
    for line in lines[1:]:
        values = dict(zip(header, line.split(","), strict=True))
        epoch = int(values.pop("epoch"))
        rows.append((epoch, {k: float(v) for k, v in values.items() if v}))
    return rows


def _log_to_mlflow(root, uri, params, variant, model, metrics, cm, data, pred, meta, outputs):
    """Test metrics (linked to the logged model and the test set), the evaluation dataset and
    artifacts into the checkpoint's training run; then the Model Registry."""
    import time

    import mlflow
    from mlflow.entities import Metric

    from mnist_pipeline import registry, tracking

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    md5 = file_md5(outputs.checkpoint)
    experiment_id = tracking.run_experiment_id(data.name, root)
    run = tracking.find_training_run(client, experiment_id, md5)
    if run is None:
        run_id = _new_run_from_checkpoint(root, params, variant, model, data, meta, outputs, md5)
        run = client.get_run(run_id)
    run_id = run.info.run_id
    model_id = tracking.logged_model_id(run, variant)

    test_set = tracking.datasets(params, data.checksum)["evaluation"]
    tracking.log_datasets(client, run_id, {"evaluation": test_set})
    now = int(time.time() * 1000)
    summary = {  # six places, as in the DVC metrics file: what the UI's tables show
        k: round(v, 6) for k, v in metrics.items() if not k.startswith("test/accuracy_class_")
    }
    client.log_batch(
        run_id,
        metrics=[
            Metric(
                k,
                v,
                now,
                0,
                model_id=model_id,
                dataset_name=test_set.name,
                dataset_digest=test_set.digest,
            )
            for k, v in summary.items()
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "evaluation"
        folder.mkdir()
        (folder / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        (folder / "per_class.csv").write_text(_per_class_csv(cm))
        (folder / "confusion_matrix.csv").write_text(
            "\n".join(",".join(str(v) for v in row) for row in cm.tolist()) + "\n"
        )
        _confusion_png(cm, folder / "confusion_matrix.png", variant)
        _misclassified_png(data.test_images, data.test_labels, pred, folder / "misclassified.png")
        client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    if model_id is not None:
        registry.register(client, run, model_id, data.name, variant, metrics["test/accuracy"])
    return run_id


def _per_class_csv(cm: torch.Tensor) -> str:
    """Per class: support, precision, recall (= the class's accuracy), F1."""
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    lines = ["class,support,precision,recall,f1"]
    for k in range(NUM_CLASSES):
        p = tp[k].item() / predicted[k].item() if predicted[k] else 0.0
        r = tp[k].item() / support[k].item() if support[k] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        lines.append(f"{k},{int(support[k].item())},{p:.4f},{r:.4f},{f1:.4f}")
    return "\n".join(lines) + "\n"


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
