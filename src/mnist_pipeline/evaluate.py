"""Stage 3, `mnist-pipeline evaluate --variant NAME`: score a checkpoint on the 10,000 test images.

    mnist-pipeline evaluate --variant mlp_relu_dropout

Writes metrics/test/<variant>.json (DVC metrics) and plots/predictions/<variant>.csv (a DVC
confusion-matrix plot); then `record` turns those two files into the MLflow record of the run that
trained the checkpoint (found by the checkpoint's MD5; rebuilt from the outputs when this store
has none): test metrics, confusion matrix, misclassified examples and a registered version.
"""

from __future__ import annotations

from pathlib import Path

from mnist_pipeline import checkpoint, metrics, paths
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import load_dataset
from mnist_pipeline.device import as_float, resolve_device
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import predict


def evaluate(
    params: Params, variant: str, root: Path, outputs: paths.Outputs | None = None
) -> dict[str, float]:
    """Score the checkpoint in `outputs` (default: the pipeline's) on the test set; write the
    metrics and predictions beside the other outputs; record them in the run that trained it."""
    from mnist_pipeline import record

    outputs = outputs or paths.pipeline_outputs(root, variant)
    store = record.open_store(root, params.data.dataset)  # fails fast: before any work
    model, _ = checkpoint.load(outputs.checkpoint, variant)
    data = load_dataset(root, params.data.dataset)
    device = resolve_device(params.train.device)
    x, y = as_float(data.test_images, device), data.test_labels.to(device)
    pred, loss = predict(model.to(device), x, y)
    figures = metrics.classification_metrics(metrics.confusion(y, pred), loss)

    write_json_atomic(outputs.test_metrics, metrics.dvc_metrics(figures))
    write_text_atomic(outputs.predictions, metrics.predictions_csv(y, pred))
    training = record.Training(variant, outputs, params.data)
    done = record.agree(store, training, parts=("evaluation",)) or ["already recorded"]
    print(
        f"{variant}: test/accuracy {figures['test/accuracy']:.4f} test/loss {loss:.4f}; "
        + "; ".join(done)
    )
    return figures
