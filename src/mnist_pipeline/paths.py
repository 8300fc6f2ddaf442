"""Every path the pipeline reads or writes and every output's file name, in one place."""

import os
from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = "params.yaml"
ONE_OFF_DIR = "one-off"  # git-ignored; DVC knows nothing of it
CHECKPOINT_FILE = "model.pt"  # models/<variant>/
ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"  # exports/<variant>/
# data/<dataset>/: the four IDX files, uncompressed (the mirrors serve them as <name>.gz)
DATA_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def project_root() -> Path:
    """`MNIST_PIPELINE_ROOT`, else the nearest folder up from here with params.yaml, else here."""
    if env := os.environ.get("MNIST_PIPELINE_ROOT"):
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    return next((f for f in (cwd, *cwd.parents) if (f / PARAMS_FILE).is_file()), cwd)


def data_dir(root: Path, dataset: str) -> Path:
    return root / "data" / dataset


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(root: Path) -> str:
    return (root / "mlartifacts").as_uri()


def report_outputs(root: Path) -> tuple[Path, Path, Path]:
    folder = root / "reports"
    return folder / "results.md", folder / "results.csv", folder / "results.png"


@dataclass(frozen=True)
class Outputs:
    """Where a variant's stages write: the pipeline's DVC outputs, or one-off/<variant>/."""

    checkpoint: Path
    train_metrics: Path
    history: Path
    test_metrics: Path
    predictions: Path
    export_dir: Path | None = None  # the pipeline's only: a one-off is not exported
    export_metrics: Path | None = None
    one_off: bool = False

    @property
    def onnx(self) -> Path | None:
        return self.export_dir / ONNX_FILE if self.export_dir else None

    @property
    def int8(self) -> Path | None:
        return self.export_dir / INT8_FILE if self.export_dir else None


def pipeline_outputs(root: Path, variant: str) -> Outputs:
    return Outputs(
        checkpoint=root / "models" / variant / CHECKPOINT_FILE,
        train_metrics=root / "metrics" / "train" / f"{variant}.json",
        history=root / "plots" / "train" / f"{variant}.csv",
        test_metrics=root / "metrics" / "test" / f"{variant}.json",
        predictions=root / "plots" / "predictions" / f"{variant}.csv",
        export_dir=root / "exports" / variant,
        export_metrics=root / "metrics" / "export" / f"{variant}.json",
    )


def one_off_outputs(root: Path, variant: str) -> Outputs:
    folder = root / ONE_OFF_DIR / variant
    return Outputs(
        checkpoint=folder / CHECKPOINT_FILE,
        train_metrics=folder / "train.json",
        history=folder / "history.csv",
        test_metrics=folder / "test.json",
        predictions=folder / "predictions.csv",
        one_off=True,
    )


def outputs_for(root: Path, variant: str, *, one_off: bool) -> Outputs:
    return one_off_outputs(root, variant) if one_off else pipeline_outputs(root, variant)
