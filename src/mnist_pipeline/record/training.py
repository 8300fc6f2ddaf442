"""The training record: the live run around a training, and its record from the outputs."""

import contextlib
import csv
import functools
import importlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any
from unittest import mock

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from mnist_pipeline import checkpoint, host, paths, tracking
from mnist_pipeline.config import DataConfig
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.models import INPUT_SHAPE, NUM_CLASSES, inference_model, summary_text
from mnist_pipeline.record import store as runs

CHECKPOINT_TAG = "checkpoint.md5"  # set last: the training record is complete
FORM_TAG = "export.form"  # a logged model's form: torch, onnx or int8


def as_metrics(figures: dict[str, float], step: int = 0, **link: str | None) -> list[Metric]:
    """`figures` as MLflow metrics at `step` (`link`: model_id, dataset_name/_digest), rounded as
    the UI shows them: six decimals (the DVC metrics files'), whole numbers from 1,000 up."""
    now = int(time.time() * 1000)
    shown = {k: float(round(v)) if abs(v) >= 1000 else round(v, 6) for k, v in figures.items()}
    return [Metric(k, v, now, step, **link) for k, v in shown.items()]


@dataclass(frozen=True)
class Training:
    """A variant's outputs and the data they came from; the recipe is the checkpoint's own."""

    variant: str
    outputs: paths.Outputs
    data: DataConfig

    @functools.cached_property
    def checkpoint(self) -> tuple[Any, dict[str, Any]]:
        return checkpoint.load(self.outputs.checkpoint, self.variant)

    @functools.cached_property
    def md5(self) -> str:
        return file_md5(self.outputs.checkpoint)

    @property
    def checksum(self) -> str:  # of the data set the checkpoint was trained on
        return self.checkpoint[1].get("data_checksum", "unknown")

    @property
    def recipe(self) -> dict[str, Any]:
        meta = self.checkpoint[1]
        return {**meta["recipe"], **meta.get("train", {})}

    def datasets(self) -> dict:
        train = self.checkpoint[1].get("train", {})
        split = {"val_size": train.get("val_size", 0), "seed": train.get("seed", 0)}
        return runs.datasets(self.data, self.checksum, **split)


@dataclass
class EpochLogger:
    """Logs each epoch to run `run_id`; a store that fails is a warning, its first error kept."""

    run_id: str
    error: str | None = None

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        if self.error is not None:
            return
        try:
            tracking.client().log_batch(self.run_id, metrics=as_metrics(row, epoch))
        except Exception as err:
            self.error = first_line(err)
            warning = f"could not log epoch {epoch} to MLflow ({self.error}); training continues"
            print(f"warning: {warning}", file=sys.stderr)


def log_recipe(run_id: str, variant: str, data: DataConfig, recipe: dict, checksum: str, extra):
    values = {"variant": variant, **recipe, **extra}
    tracking.client().log_batch(run_id, params=[Param(k, str(v)) for k, v in values.items()])
    split = {"val_size": recipe.get("val_size", 0), "seed": recipe.get("seed", 0)}
    runs.log_datasets(run_id, runs.training_inputs(data, checksum, **split))


def new_run(store: runs.Store, training: Training, *, recipe: dict, checksum: str, device=None):
    """A new run for `training`: live on a `torch.device`, or rebuilt (device None: no timings)."""
    live = device is not None
    kind = "one-off" if training.outputs.one_off else "pipeline"
    tags = host.machine_tags(device) | runs.shared_tags(store, variant=training.variant, kind=kind)
    if not live:
        tags |= {"device": "unknown", "device.name": "unknown"}
    note = runs.describe_run(tags, recipe, checksum)
    if not live:
        note += "\n\nRebuilt from the pipeline's outputs by `mnist-pipeline sync`: no timings."
    tags |= {runs.SOURCE_TAG: "live" if live else "outputs", "data.checksum": checksum}
    tags[runs.NOTE_TAG] = note
    name = host.run_name(training.variant)
    return runs.started_run(store.experiment_id, name=name, tags=tags, system_metrics=live)


def log_timings(run_id: str, history: list[dict[str, float]]) -> None:
    """What only a live run knows: how long training took (medians: the first epoch warms up)."""
    seconds = [row["time/epoch_seconds"] for row in history]
    speeds = [row["time/samples_per_second"] for row in history]
    figures = {
        "time/train_seconds": sum(seconds),
        "time/median_epoch_seconds": statistics.median(seconds),
        "time/median_samples_per_second": statistics.median(speeds),
    }
    tracking.client().log_batch(run_id, metrics=as_metrics(figures))


def record_training(run_id: str, training: Training, *, live: bool = False) -> str:
    """From the outputs into run `run_id`: summary, history, logged model (its id), last the MD5."""
    model, meta = training.checkpoint
    kept_epoch = meta.get("epoch")
    client = tracking.client()
    client.log_text(run_id, summary_text(model), "model_summary.txt")
    if not live and training.outputs.history.is_file():
        history = EpochLogger(run_id)
        with training.outputs.history.open(newline="") as f:
            for row in csv.DictReader(f):  # plots/train/<variant>.csv
                epoch = int(row.pop("epoch"))
                history({k: float(v) for k, v in row.items() if v}, epoch)
        if history.error is not None:
            raise PipelineError(
                f"{training.variant}: could not record the history ({history.error})"
            )
    if kept_epoch is not None:
        client.log_metric(run_id, "kept_epoch", kept_epoch)
    params = {"variant": training.variant, **meta["recipe"]}
    model_id = log_model(client.get_run(run_id), model, "torch", params=params)
    client.set_tag(run_id, CHECKPOINT_TAG, training.md5)
    return model_id


def model_name(run, form: str) -> str:
    """`ffn1_relu-int8@gpu-box-1a2b3c4d`: no two logged models share a name in the Models tab."""
    tags = run.data.tags
    variant = tags.get("variant") or tags.get("search.variant")
    return f"{variant}-{form}@{tags.get('host', 'unknown')}-{run.info.run_id[:8]}"


def log_model(run, model, form: str, params: dict, named_after=None) -> str:
    """Log `model` (torch: its served form; onnx, int8: ONNX) as `run`'s logged model; its id.
    Best with no run active: MLflow links every unlinked metric of the active run to the model."""
    name = model_name(named_after or run, form)
    source = {"source_run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    logged = mlflow.initialize_logged_model(
        name=name,
        params={k: str(v) for k, v in params.items()},
        tags={FORM_TAG: form},
        model_type="pytorch" if form == "torch" else "onnx",
        **source,
    )
    # float32 images in, probabilities out; unnamed tensors: the flavour serves a plain array
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *INPUT_SHAPE))])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))])
    signature = ModelSignature(inputs, outputs)
    common = {"name": name, "model_id": logged.model_id, "signature": signature}
    common["input_example"] = np.zeros((2, *INPUT_SHAPE), dtype=np.float32)
    with _requirements_known():
        _log_form(model, form, common)
    active = mlflow.active_run()
    if active is None or active.info.run_id != run.info.run_id:  # else MLflow linked it itself
        tracking.client().log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


@contextlib.contextmanager
def _requirements_known():
    """Skip MLflow's check of the pip requirements against this environment (1 s a process):
    they are this environment's versions. Where a newer MLflow moved the check, it runs."""
    name = "warn_dependency_requirement_mismatches"
    with contextlib.ExitStack() as stack:
        for module in map(importlib.import_module, ("mlflow.utils.environment", "mlflow.pyfunc")):
            if hasattr(module, name):
                stack.enter_context(mock.patch.object(module, name, lambda _: None))
        yield


def _log_form(model, form: str, common: dict) -> None:
    # The flavours (and ONNX) are imported here: an evaluation-only sync never needs them.
    if form == "torch":
        from mlflow import pytorch as flavour

        needs = [f"torch=={torch.__version__.split('+')[0]}"]  # inferring them takes seconds
        flavour.log_model(inference_model(model), pip_requirements=needs, **common)
    else:
        import onnx
        import onnxruntime as ort
        from mlflow import onnx as flavour

        needs = [f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"]
        flavour.log_model(
            model,
            pip_requirements=needs,
            save_as_external_data=False,  # one file, as in exports/
            onnx_execution_providers=["CPUExecutionProvider"],
            **common,
        )
