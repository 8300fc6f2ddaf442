"""The evaluate stage: score a checkpoint on the 10,000 test images."""

from pathlib import Path

from mnist_pipeline import checkpoint, metrics, paths
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import load_dataset
from mnist_pipeline.device import as_float, resolve_device
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import predict


def evaluate(params: Params, variant: str, root: Path, outputs: paths.Outputs) -> dict:
    """Score the checkpoint in `outputs`, write the metrics and predictions; return the figures."""
    model, _ = checkpoint.load(outputs.checkpoint, variant)
    data = load_dataset(root, params.data.dataset)
    device = resolve_device(params.train.device)
    x, y = as_float(data.test_images, device), data.test_labels.to(device)
    pred, loss = predict(model.to(device), x, y)
    figures = metrics.classification_metrics(metrics.confusion(y, pred), loss)
    write_json_atomic(outputs.test_metrics, metrics.dvc_metrics(figures))
    write_text_atomic(outputs.predictions, metrics.predictions_csv(y, pred))
    print(f"{variant}: test/accuracy {figures['test/accuracy']:.4f} test/loss {loss:.4f}")
    return figures
