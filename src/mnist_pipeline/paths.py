"""Every path the pipeline reads or writes, named in one place (dvc.yaml mirrors these)."""

from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = "params.yaml"


def project_root() -> Path:
    """The project checkout: `MNIST_PIPELINE_ROOT`, else the nearest folder up from the working
    directory that holds params.yaml, else the working directory itself."""
    if env := os.environ.get("MNIST_PIPELINE_ROOT"):
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    return cwd


def data_dir(root: Path, dataset: str) -> Path:
    return root / "data" / dataset


def model_dir(root: Path, variant: str) -> Path:
    return root / "models" / variant


def checkpoint_path(root: Path, variant: str) -> Path:
    return model_dir(root, variant) / "model.pt"


def run_info_path(root: Path, variant: str) -> Path:
    return model_dir(root, variant) / "mlflow_run.json"


def train_metrics_path(root: Path, variant: str) -> Path:
    return root / "metrics" / "train" / f"{variant}.json"


def test_metrics_path(root: Path, variant: str) -> Path:
    return root / "metrics" / "test" / f"{variant}.json"


def history_path(root: Path, variant: str) -> Path:
    return root / "plots" / "train" / f"{variant}.csv"


def predictions_path(root: Path, variant: str) -> Path:
    return root / "plots" / "predictions" / f"{variant}.csv"


def reports_dir(root: Path) -> Path:
    return root / "reports"


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(root: Path) -> str:
    return (root / "mlartifacts").as_uri()
