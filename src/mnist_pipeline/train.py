"""The train stage: train one variant, write its checkpoint, history and training metrics.

Only what the recipe and seed determine is written: the same recipe twice, the same bytes."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_pipeline import checkpoint, loop, paths, signals
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.device import resolve_device
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import count_parameters


@dataclass(frozen=True)
class Job:
    """One training, ready to start (`params`: a one-off's included)."""

    variant: str
    params: Params
    outputs: paths.Outputs
    device: torch.device
    data: Dataset
    setup: loop.SetUp

    @property
    def values(self) -> dict:
        recipe, settings = self.params.recipe(self.variant), self.params.train
        return {**dataclasses.asdict(recipe), **dataclasses.asdict(settings)}


def prepare(params: Params, variant: str, root: Path, outputs: paths.Outputs) -> Job:
    device = resolve_device(params.train.device)
    data = load_dataset(root, params.data.dataset)
    setup = loop.set_up(variant, params.recipe(variant), params.train, data, device)
    return Job(variant, params, outputs, device, data, setup)


def run(job: Job, on_epoch: loop.OnEpoch) -> loop.Fit:
    """Train, keep the chosen epoch's weights, write the outputs (a signal before saves nothing)."""
    recipe, settings, model = job.params.recipe(job.variant), job.params.train, job.setup.model
    fitted = loop.fit(
        job.setup, recipe=recipe, keep=settings.keep, on_epoch=on_epoch, label=job.variant
    )
    signals.check()  # the last point at which nothing has been saved
    model.load_state_dict(fitted.kept_state)
    outputs, num_params = job.outputs, count_parameters(model)
    extra = {"train": dataclasses.asdict(settings), "dataset": job.data.name}
    extra |= {"data_checksum": job.data.checksum, "num_params": num_params}
    checkpoint.save(
        outputs.checkpoint, model, job.variant, recipe, **extra, epoch=fitted.kept_epoch
    )
    columns = loop.HISTORY_COLUMNS
    lines = [",".join(columns)]
    for row in fitted.history:
        lines.append(",".join(f"{row[c]:.6g}" if c in row else "" for c in columns))
    write_text_atomic(outputs.history, "\n".join(lines) + "\n")
    final = fitted.history[fitted.kept_epoch - 1]
    summary = {"params": num_params, "kept_epoch": fitted.kept_epoch}
    summary |= {k: round(final[k], 6) for k in columns[1:] if k in final}
    write_json_atomic(outputs.train_metrics, summary)
    return fitted
