"""Stage 2, `mnist-pipeline train --variant NAME`: train one variant, record one MLflow run.

    mnist-pipeline train --variant mlp_relu_dropout            # the params.yaml recipe
    mnist-pipeline train --variant ffn1_relu --epochs 1 --lr 0.05

The data sits in memory as float tensors on the training device; a batch is an index slice, so an
epoch costs about what a bare loop over those tensors costs. Per-epoch metrics come from a
validation split held out of the training set with a fixed seed; the test set is evaluate's alone.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.config import Params, Recipe, TrainConfig
from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.device import as_float, resolve_device, set_cpu_threads
from mnist_pipeline.errors import ConfigError, PipelineError
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.models import build_model, count_parameters, logits_view, predict

# The per-epoch history (a DVC plot): what the recipe determines, so the same recipe and seed
# write the same bytes. Timings differ every run: they go to MLflow only.
HISTORY_COLUMNS = ("epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


def train_val_split(data: Dataset, val_size: int, seed: int, device: torch.device):
    """Hold out `val_size` training images, chosen by `seed`; training keeps the file order."""
    n = len(data.train_labels)
    if val_size >= n:
        raise ConfigError(
            f"train.val_size: {val_size} leaves nothing to train on ({n} training images); "
            f"use a value below {n}, or 0 for no validation split"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:].sort().values
    x, y = as_float(data.train_images, device), data.train_labels.to(device)
    train = Split(x[train_idx.to(device)], y[train_idx.to(device)])
    val = Split(x[val_idx.to(device)], y[val_idx.to(device)]) if val_size else None
    return train, val


# --- the loop ---------------------------------------------------------------------------------


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer, fused where torch has a fused kernel for the device: the same
    update in one kernel per step instead of a few per parameter tensor (about 20% of a
    batch-32 step on CPU)."""
    device = next(model.parameters()).device.type
    fused = {"fused": True} if device in ("cpu", "cuda") else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, **fused)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, **fused)


def train_epoch(
    model: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    data: Split,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    progress=None,
) -> tuple[float, float]:
    """One pass over `data` (shuffled when a generator is given); the mean loss and accuracy.

    Per step, the metrics cost one kernel (the argmax) and no host synchronisation; losses and
    predictions are reduced once, after the epoch.
    """
    model.train()
    net = logits_view(model)
    n = len(data.y)
    order = torch.randperm(n, generator=generator).to(data.x.device) if generator else None
    losses, preds = [], []
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = data.x[start : start + batch_size], data.y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = data.x[idx], data.y[idx]
        logits = net(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        preds.append(logits.detach().argmax(1))
        if progress is not None:
            progress.update(len(yb))
        check_signals()
    sizes = torch.tensor([min(batch_size, n - s) for s in range(0, n, batch_size)])
    mean_loss = (torch.stack(losses).cpu() * sizes).sum() / n
    targets = data.y if order is None else data.y[order]
    return mean_loss.item(), (torch.cat(preds) == targets).sum().item() / n


def evaluate_split(model: nn.Sequential, data: Split) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on `data`, in eval mode."""
    pred, loss = predict(model, data.x, data.y)
    return loss, (pred == data.y).sum().item() / len(data.y)


class Diverged(PipelineError):
    pass


class Terminated(BaseException):
    """SIGTERM, turned into an exception so the run ends KILLED and no checkpoint is written."""


class _Signals:
    """Ctrl-C and SIGTERM while training: the handler only notes the signal, and training acts on
    it between two steps (`check_signals`). Raised wherever the signal landed, the exception could
    start inside MLflow's or SQLAlchemy's code with a lock held, and the run's clean-up then hung.
    A second signal acts at once."""

    received: int | None = None


def _interruption(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check_signals() -> None:
    if _Signals.received is not None:
        raise _interruption(_Signals.received)


@contextmanager
def signals_between_steps() -> Iterator[None]:
    def handler(signum, frame):
        if _Signals.received is not None:
            raise _interruption(signum)
        _Signals.received = signum

    _Signals.received = None
    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _Signals.received = None


# --- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_id: str
    history: list[dict[str, float]]


def train(
    params: Params, variant: str, root: Path, outputs: paths.Outputs | None = None
) -> TrainResult:
    """Train `variant` with its recipe in `params`: write the checkpoint, history and metrics,
    then record the run from them (`record`), with what only this run knows: its timings.

    `outputs` defaults to the pipeline's (DVC's) files; a one-off run (a recipe other than
    params.yaml's) writes under one-off/<variant>/ instead and is tagged `run.kind=one-off`."""
    from mnist_pipeline import record

    outputs = outputs or paths.pipeline_outputs(root, variant)
    recipe, settings = params.recipe(variant), params.train
    device = resolve_device(settings.device)
    store = record.open_store(root, params.data.dataset)  # fails fast: before any work
    data = load_dataset(root, params.data.dataset)
    setup = set_up(variant, recipe, settings, data, device)
    training = record.Training(variant, outputs, params.data)
    values = {**dataclasses.asdict(recipe), **dataclasses.asdict(settings)}
    live = {"device_resolved": device.type, "dataset": data.name, "train_size": len(setup.train.y)}
    live["num_params"] = count_parameters(setup.model)
    log_epoch = record.EpochLogger()
    # Ctrl-C and SIGTERM end the run KILLED, between two training steps, and nothing is saved;
    # once saving has begun, a signal waits for the run to be complete.
    with (
        signals_between_steps(),
        record.new_run(
            store, training, recipe=values, checksum=data.checksum, device=device
        ) as run,
    ):
        record.log_recipe(
            run.info.run_id, variant, values, data=params.data, checksum=data.checksum, extra=live
        )
        fitted = fit(setup, recipe=recipe, keep=settings.keep, on_epoch=log_epoch, label=variant)
        check_signals()  # the last point at which nothing has been saved
        setup.model.load_state_dict(fitted.kept_state)
        write_outputs(
            outputs, setup.model, variant=variant, params=params, fitted=fitted, data=data
        )
        _check_logged(log_epoch, variant, outputs, root, store.uri)
        record.log_timings(fitted.history)
        model_id = record.record_training(run.info.run_id, training, live=log_epoch)
        if _Signals.received is not None:
            print(f"{variant}: a signal came while saving; the run is done", file=sys.stderr)
    _say_where(run, variant, outputs, root)
    return TrainResult(run.info.run_id, model_id, fitted.history)


@dataclass(frozen=True)
class SetUp:
    """What `fit` trains: the model (seeded), its optimizer, the shuffling generator (None: no
    shuffling) and the data, split."""

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None
    train: Split
    val: Split | None


def set_up(variant: str, recipe: Recipe, settings: TrainConfig, data: Dataset, device) -> SetUp:
    """Everything a training of `variant` starts from (`train` and each `tune` trial)."""
    train_data, val_data = train_val_split(data, settings.val_size, settings.seed, device)
    set_cpu_threads(device, recipe.batch_size)
    torch.manual_seed(settings.seed)
    model = build_model(variant, use_dropout=recipe.use_dropout).to(device)
    generator = torch.Generator().manual_seed(settings.seed) if recipe.shuffle else None
    return SetUp(model, make_optimizer(recipe, model), generator, train_data, val_data)


def _say_where(run, variant: str, outputs: paths.Outputs, root: Path) -> None:
    where = outputs.checkpoint.relative_to(root)
    print(f"{variant}: MLflow run {run.info.run_id} ({run.info.run_name}), checkpoint {where}")
    if outputs.one_off:
        print(
            f"{variant}: a one-off recipe: the pipeline's outputs are unchanged; score it with "
            f"`mnist-pipeline evaluate --variant {variant} --one-off`"
        )


def _check_logged(log_epoch, variant: str, outputs: paths.Outputs, root: Path, uri: str) -> None:
    """A store that failed mid-run: the results are saved; say how to record them."""
    if log_epoch.error is None:
        return
    saved = ", ".join(str(p.relative_to(root)) for p in (outputs.checkpoint, outputs.train_metrics))
    again = (
        f"mnist-pipeline evaluate --variant {variant} --one-off"
        if outputs.one_off
        else "mnist-pipeline sync"
    )
    raise PipelineError(
        f"{variant}: the tracking store at {uri} failed during training ({log_epoch.error}); "
        f"training finished and its results are saved ({saved}). When the store takes them "
        f"again (it answers, or accepts this account), `{again}` records them (or re-run the "
        "training)"
    )


@dataclass(frozen=True)
class Fit:
    """What training returns: the per-epoch history, and the epoch kept with its weights."""

    history: list[dict[str, float]]
    kept_epoch: int
    kept_state: dict[str, torch.Tensor]


def fit(
    setup: SetUp,
    *,
    recipe: Recipe,
    keep: str,
    on_epoch: Callable[[dict[str, float], int], None],
    label: str,
) -> Fit:
    """The epochs, each: train, validate, report (`on_epoch(row, epoch)`). Kept: with keep="best"
    and a validation split, the first epoch to reach the best validation accuracy (the split
    exists for this; the test set is never consulted); otherwise the last."""
    model, train_data, val_data = setup.model, setup.train, setup.val
    history: list[dict[str, float]] = []
    best = BestEpoch()
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        with _progress(len(train_data.y), f"{label} {epoch}/{recipe.epochs}") as bar:
            loss, acc = train_epoch(
                model,
                setup.optimizer,
                train_data,
                recipe.batch_size,
                generator=setup.generator,
                progress=bar,
            )
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise Diverged(
                f"{label}: training loss became {loss} in epoch {epoch}; the recipe diverged. "
                f"Try a lower learning rate than {recipe.lr} (variants.{label}.lr)"
            )
        row = {
            "train/loss": loss,
            "train/accuracy": acc,
            "time/epoch_seconds": seconds,
            "time/samples_per_second": len(train_data.y) / seconds,
        }
        if val_data is not None:
            row["val/loss"], row["val/accuracy"] = evaluate_split(model, val_data)
            best.offer(epoch, row["val/accuracy"], model)
        on_epoch(row, epoch)
        history.append({"epoch": epoch, **row})
        print(f"{label} epoch {epoch}/{recipe.epochs}: {_shown(row)}", flush=True)
    if keep == "best" and best.state is not None:
        return Fit(history, best.epoch, best.state)
    return Fit(history, recipe.epochs, _copy(model))


@dataclass
class BestEpoch:
    """The first epoch to reach the best validation accuracy so far, and a copy of its weights."""

    epoch: int = 0
    accuracy: float = -1.0
    state: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, accuracy: float, model: nn.Module) -> None:
        if accuracy > self.accuracy:  # a tie keeps the earlier epoch
            self.epoch, self.accuracy, self.state = epoch, accuracy, _copy(model)


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shown(row: dict[str, float]) -> str:
    figures = " ".join(f"{k} {row[k]:.4f}" for k in HISTORY_COLUMNS[1:] if k in row)
    return (
        f"{figures} ({row['time/epoch_seconds']:.2f}s, {row['time/samples_per_second']:.0f} img/s)"
    )


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    """A progress bar on a terminal; nothing in a log."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", leave=False, mininterval=0.5) as bar:
        yield bar


def write_outputs(
    outputs: paths.Outputs, model, *, variant: str, params: Params, fitted: Fit, data: Dataset
) -> None:
    """Checkpoint, per-epoch history (a DVC plot) and the training summary (DVC metrics) of the
    kept epoch. Only what the recipe and seed determine: the same run twice, the same bytes."""
    num_params = count_parameters(model)
    checkpoint.save(
        outputs.checkpoint,
        model,
        variant,
        params.recipe(variant),
        train=dataclasses.asdict(params.train),
        dataset=data.name,
        data_checksum=data.checksum,
        num_params=num_params,
        epoch=fitted.kept_epoch,
    )
    lines = [",".join(HISTORY_COLUMNS)]
    for row in fitted.history:
        lines.append(",".join(f"{row[c]:.6g}" if c in row else "" for c in HISTORY_COLUMNS))
    write_text_atomic(outputs.history, "\n".join(lines) + "\n")
    final = fitted.history[fitted.kept_epoch - 1]
    summary = {
        "params": num_params,
        "kept_epoch": fitted.kept_epoch,
        **{
            k: round(final[k], 6)
            for k in ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
            if k in final
        },
    }
    write_json_atomic(outputs.train_metrics, summary)
