"""A search's trial: one recipe trained with the project's loop in a Ray worker.

Ray is imported inside the functions (run in a worker): `tune` imports this before Ray starts."""

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnist_pipeline import host, paths
from mnist_pipeline.config import Params, Recipe
from mnist_pipeline.dataset import Dataset
from mnist_pipeline.device import resolve_device
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.loop import Diverged, fit, set_up
from mnist_pipeline.record import search as record
from mnist_pipeline.record import store as runs
from mnist_pipeline.record.training import EpochLogger, log_recipe, log_timings

METRIC, MODE = "val_accuracy", "max"
DIVERGED = "diverged"  # in a trial's last result: its loss became NaN or infinite
RUN_ID_KEY = "mlflow_run_id"  # each trial reports its child run's id with its results
NODE_TAG = "ray.node_id"


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs, shipped to the nodes with the trainable."""

    variant: str
    params: Params
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    data_digest: str


def recipe_for(params: Params, variant: str, config: dict[str, Any]) -> Recipe:
    chosen = {"lr": float(config["lr"]), "batch_size": int(config["batch_size"])}
    return dataclasses.replace(params.recipe(variant), **chosen, epochs=int(config["epochs"]))


def tensor_digest(data: Dataset) -> str:
    """The MD5 of the training tensors: what a trial checks on the copy it received."""
    digest = hashlib.md5()
    for tensor in (data.train_images, data.train_labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_trial(config: dict[str, Any], data: Dataset, job: TrialJob) -> None:
    import ray
    from ray import tune as ray_tune

    if tensor_digest(data) != job.data_digest:
        raise PipelineError(f"{job.variant}: the data reached this node altered; not training")
    params, settings = job.params, job.params.train
    recipe = recipe_for(params, job.variant, config)
    device = resolve_device(settings.device)
    setup = set_up(job.variant, recipe, settings, data, device)
    trial_id = ray_tune.get_context().get_trial_id()
    tags = {
        **host.machine_tags(device),  # this node's host, CPU, device, torch
        **job.tags,  # the driver's: the variant searched, data set, code version, run kind
        NODE_TAG: ray.get_runtime_context().get_node_id(),
        record.TRIAL_TAG: trial_id,
    }
    name, parent = f"trial {trial_id} · {job.variant}", job.parent_run_id
    started = runs.started_run(
        job.experiment_id, name=name, tags=tags, system_metrics=True, parent_run_id=parent
    )
    with started as run:
        values = {**dataclasses.asdict(recipe), **dataclasses.asdict(settings)}
        log_recipe(run.info.run_id, job.variant, params.data, values, data.checksum, {})
        report = _Reporter(run.info.run_id, setup.model, EpochLogger(run.info.run_id))
        try:
            fitted = fit(
                setup, recipe=recipe, keep=settings.keep, on_epoch=report, label=job.variant
            )
        except Diverged as err:  # a recipe's fault: reported, not retried
            report.diverged(err)
            raise runs.EndRun("FAILED") from None
        log_timings(run.info.run_id, fitted.history)  # what `compare` shows beside the accuracy
        record.set_outcome(run.info.run_id, "completed")


@dataclass
class _Reporter:
    """`fit`'s on_epoch: the epoch to MLflow, then to Tune, with the weights when they improved."""

    run_id: str
    model: Any
    log_epoch: EpochLogger
    best: float = -1.0
    epoch: int = 0  # the last one reported

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        from ray import tune as ray_tune

        self.log_epoch(row, epoch)
        self.epoch = epoch
        metrics = {
            "epoch": epoch,
            METRIC: row.get("val/accuracy", row["train/accuracy"]),
            "train_loss": row["train/loss"],
            RUN_ID_KEY: self.run_id,
        }
        if metrics[METRIC] <= self.best:
            ray_tune.report(metrics)
            return
        self.best = metrics[METRIC]
        with tempfile.TemporaryDirectory() as folder:
            torch.save(self.model.state_dict(), Path(folder) / paths.CHECKPOINT_FILE)
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(folder))

    def diverged(self, err: Exception) -> None:
        """The run says why; Tune gets a score of nothing, marked so the search never picks it."""
        from ray import tune as ray_tune

        record.set_outcome(self.run_id, "diverged", str(err))
        last = {METRIC: 0.0, "epoch": self.epoch + 1, DIVERGED: 1, RUN_ID_KEY: self.run_id}
        ray_tune.report(last)
