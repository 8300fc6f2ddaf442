"""The training record: a live run around the training (recipe, data, each epoch as it ends,
system metrics, timings), then, from the outputs, the summary, the logged model and the
checkpoint's MD5, the tag that says the record is complete. A run rebuilt from the outputs
gets the same record without the timings."""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import LoggedModelOutput, Metric, Param

from mnist_pipeline import checkpoint, host, paths, tracking
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.models import INPUT_SHAPE, NUM_CLASSES, inference_model, summary_text
from mnist_pipeline.record import store as runs

if TYPE_CHECKING:
    from mnist_pipeline.config import DataConfig

CHECKPOINT_TAG = "checkpoint.md5"  # set last: the training record is complete
FORM_TAG = "export.form"  # a logged model's form: torch, onnx or int8


def rounded(value: float) -> float:
    """Six decimals (the DVC metrics files' precision), whole numbers from 1,000 up (images per
    second): figures the UI's tables show as they are, not with seventeen digits."""
    return float(round(value)) if abs(value) >= 1000 else round(value, 6)


@dataclass(frozen=True)
class Training:
    """What a training record is made of: the variant's outputs and the data they came from. The
    recipe and settings are the checkpoint's own (a one-off's differ from params.yaml's)."""

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
    """Logs each epoch's metrics to run `run_id`, in one batched call. If the store fails
    mid-run, training goes on (its results are saved locally) and the first error is kept."""

    run_id: str
    error: str | None = None

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        if self.error is not None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, rounded(v), now, epoch) for k, v in row.items()]
        try:
            tracking.client().log_batch(self.run_id, metrics=metrics)
        except Exception as err:
            self.error = first_line(err)
            print(
                f"warning: could not log epoch {epoch} to MLflow ({self.error}); "
                "training continues",
                file=sys.stderr,
            )


def log_recipe(run_id: str, variant: str, data: DataConfig, recipe: dict, checksum: str, extra):
    """The recipe (with the training settings) as params, and the data it trained on, of
    content `checksum`, as dataset inputs: known before training. `extra`: what else the run
    knows."""
    values = {"variant": variant, **recipe, **extra}
    tracking.client().log_batch(run_id, params=[Param(k, str(v)) for k, v in values.items()])
    split = {"val_size": recipe.get("val_size", 0), "seed": recipe.get("seed", 0)}
    inputs = runs.datasets(data, checksum, **split)
    used = ("training", "validation") if split["val_size"] else ("training",)
    runs.log_datasets(run_id, {c: inputs[c] for c in used})


def new_run(store: runs.Store, training: Training, *, recipe: dict, checksum: str, device=None):
    """A new run for `training` with `recipe`, on data of content `checksum`: live (timed, with
    system metrics) on a `torch.device`, or rebuilt from the outputs (`device` None: no timings,
    none invented)."""
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
    """What only a live run knows: how long training took (medians over the epochs: the first
    pays for warm-up; what `compare` shows)."""
    seconds = [row["time/epoch_seconds"] for row in history]
    figures = {
        "time/train_seconds": sum(seconds),
        "time/median_epoch_seconds": statistics.median(seconds),
        "time/median_samples_per_second": statistics.median(
            row["time/samples_per_second"] for row in history
        ),
    }
    now = int(time.time() * 1000)
    metrics = [Metric(k, rounded(v), now, 0) for k, v in figures.items()]
    tracking.client().log_batch(run_id, metrics=metrics)


def record_training(run_id: str, training: Training, *, live: bool = False) -> str:
    """From the outputs, into run `run_id`: the summary, the per-epoch history (a live run
    logged it as it went), the logged model (its figures are linked by the evaluation and
    export records; linking the kept epoch's would send the store points it holds already), and
    last the checkpoint's MD5. Returns the logged model's id."""
    model, meta = training.checkpoint
    kept_epoch = meta.get("epoch")
    client = tracking.client()
    client.log_text(run_id, summary_text(model), "model_summary.txt")
    if not live:  # a live run logged each epoch as it went
        history = EpochLogger(run_id)
        for epoch, row in read_history(training.outputs.history).items():
            history(row, epoch)
        if history.error is not None:
            raise PipelineError(
                f"{training.variant}: could not record the history ({history.error})"
            )
    if kept_epoch is not None:
        client.log_metric(run_id, "kept_epoch", kept_epoch)
    run = client.get_run(run_id)
    model_id = log_model(
        run, model, "torch", params={"variant": training.variant, **meta["recipe"]}
    )
    client.set_tag(run_id, CHECKPOINT_TAG, training.md5)
    return model_id


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """The per-epoch rows of a history CSV (plots/train/<variant>.csv): epoch -> metrics."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    header, rows = lines[0].split(","), {}
    for line in lines[1:]:
        values = dict(zip(header, line.split(","), strict=True))
        epoch = int(values.pop("epoch"))
        rows[epoch] = {k: float(v) for k, v in values.items() if v}
    return rows


# --- the logged model ------------------------------------------------------------------------


def model_name(run, form: str) -> str:
    """`ffn1_relu-int8@gpu-box-1a2b3c4d`: variant, form, host and run, so that no two logged
    models share a name in the Models tab."""
    tags = run.data.tags
    variant = tags.get("variant") or tags.get("search.variant")
    return f"{variant}-{form}@{tags.get('host', 'unknown')}-{run.info.run_id[:8]}"


def signature():
    """Input: float32 images (-1, 1, 28, 28) in [0, 1]; output: float32 probabilities (-1, 10).
    Unnamed tensors: MLflow's PyTorch flavour serves a plain array (`{"inputs": [...]}`)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *INPUT_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def log_model(run, model, form: str, params: dict, named_after=None) -> str:
    """Log `model` (`form` torch: an nn.Sequential, logged in its served form; onnx or int8: an
    ONNX model) as a logged model of `run`, tagged with its form and named after `named_after`
    (a form's child run: its training run), else `run`; its id.

    Called with no run active (the live run has ended): MLflow links every unlinked step-0
    metric of the active run (system metrics, timings) to a model logged under it; the figures
    that belong to the model are linked by the caller. The flavours are imported here: each
    imports its framework (torch, onnx), which a sync with nothing to log never needs."""
    import numpy as np

    name = model_name(named_after or run, form)
    logged = mlflow.initialize_logged_model(
        name=name,
        source_run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        params={k: str(v) for k, v in params.items()},
        tags={FORM_TAG: form},
        model_type="pytorch" if form == "torch" else "onnx",
    )
    common = {
        "name": name,
        "model_id": logged.model_id,
        "signature": signature(),
        "input_example": np.zeros((2, *INPUT_SHAPE), dtype=np.float32),
    }
    if form == "torch":
        import torch
        from mlflow import pytorch as flavour

        # Stated: inferring requirements loads the model in a fresh environment (seconds).
        needs = [f"torch=={torch.__version__.split('+')[0]}"]
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
    tracking.client().log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


@dataclass
class Live:
    """The live run of a training, and where its epochs go."""

    run: Any
    log_epoch: EpochLogger


@contextlib.contextmanager
def live_run(store: runs.Store, training: Training, *, recipe: dict, checksum: str, device, extra):
    """The run around a training on `device`: tags and description, then the recipe and data;
    each epoch through `Live.log_epoch`; ended FINISHED, FAILED or KILLED (`store.started_run`)."""
    with new_run(store, training, recipe=recipe, checksum=checksum, device=device) as run:
        log_recipe(run.info.run_id, training.variant, training.data, recipe, checksum, extra)
        yield Live(run, EpochLogger(run.info.run_id))
