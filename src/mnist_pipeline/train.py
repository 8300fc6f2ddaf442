"""Stage 2, `mnist-pipeline train --variant NAME`: train one variant, record one MLflow run.

    mnist-pipeline train --variant mlp_relu_dropout            # the params.yaml recipe
    mnist-pipeline train --variant ffn1_relu --epochs 1 --lr 0.05

The data sits in memory as float tensors on the training device; a batch is an index slice, so an
epoch costs about what a bare loop over those tensors costs. Per-epoch metrics come from a
validation split held out of the training set with a fixed seed; the test set is evaluate's alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_pipeline import checkpoint, paths
from mnist_pipeline.config import Params, Recipe
from mnist_pipeline.dataset import Dataset, file_md5, load_dataset
from mnist_pipeline.device import as_float, device_name, resolve_device, set_cpu_threads
from mnist_pipeline.errors import ConfigError, PipelineError, first_line
from mnist_pipeline.fileio import write_json_atomic, write_text_atomic
from mnist_pipeline.logged_model import log_model
from mnist_pipeline.models import build_model, count_parameters, logits_view, summary_text

log = logging.getLogger(__name__)

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


@torch.no_grad()
def evaluate_split(model: nn.Sequential, data: Split, chunk: int = 10_000) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on `data`, in eval mode."""
    model.eval()
    net = logits_view(model)
    loss_sum = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), device=data.x.device, dtype=torch.long)
    for start in range(0, len(data.y), chunk):
        logits = net(data.x[start : start + chunk])
        yb = data.y[start : start + chunk]
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = len(data.y)
    return loss_sum.item() / n, correct.item() / n


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
    checkpoint: Path
    num_params: int


def train(
    params: Params, variant: str, root: Path, outputs: paths.Outputs | None = None
) -> TrainResult:
    """Train `variant` with its recipe in `params`: checkpoint, metrics and one MLflow run.

    `outputs` defaults to the pipeline's (DVC's) files; a one-off run (a recipe other than
    params.yaml's) writes under one-off/<variant>/ instead and is tagged `run.kind=one-off`.
    """
    from mnist_pipeline import tracking

    outputs = outputs or paths.pipeline_outputs(root, variant)
    recipe = params.recipe(variant)
    settings = params.train
    device = resolve_device(settings.device)
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri)
    data = load_dataset(root, params.data.dataset)
    train_data, val_data = train_val_split(data, settings.val_size, settings.seed, device)

    set_cpu_threads(device, recipe.batch_size)
    torch.manual_seed(settings.seed)
    model = build_model(variant, use_dropout=recipe.use_dropout).to(device)
    optimizer = make_optimizer(recipe, model)
    generator = torch.Generator().manual_seed(settings.seed) if recipe.shuffle else None
    num_params = count_parameters(model)
    recipe_params = {**dataclasses.asdict(recipe), **dataclasses.asdict(settings)}

    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.run_experiment_id(data.name, root)
    tracking.describe_experiment(experiment_id, data.name)
    # Under `mlflow run`, MLflow has started a run and exported its id: ours becomes its child.
    parent_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    tags = tracking.run_tags(root, variant, device.type, device_name(device))
    tags |= {
        "data.dataset": data.name,
        "data.checksum": data.checksum,
        tracking.RUN_KIND_TAG: "one-off" if outputs.one_off else "pipeline",
        tracking.NOTE_TAG: tracking.run_description(
            variant, recipe_params, data.name, data.checksum, root
        ),
    }
    inputs = tracking.datasets(params, data.checksum)
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        # MLflow's 10 s default leaves a short run without a curve; 1 s costs nothing visible.
        mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=tracking.run_name(variant),
        tags=tags,
        parent_run_id=parent_run_id,
        log_system_metrics=True,
    )
    run_id = run.info.run_id
    # From here on Ctrl-C and SIGTERM end the run KILLED, between two training steps, and nothing
    # is saved; once saving has begun, a signal waits for the run to be complete.
    with signals_between_steps():
        status = "FAILED"
        try:
            mlflow.log_params(
                {
                    "variant": variant,
                    **recipe_params,
                    "device_resolved": device.type,
                    "dataset": data.name,
                    "train_size": len(train_data.y),
                    "num_params": num_params,
                }
            )
            used = ("training", "validation") if val_data is not None else ("training",)
            tracking.log_datasets(mlflow.MlflowClient(), run_id, {c: inputs[c] for c in used})
            mlflow.log_text(summary_text(model), "model_summary.txt")
            log_epoch = EpochLogger()
            history = _fit(
                model, optimizer, train_data, val_data, recipe, generator, variant, log_epoch
            )
            kept = _keep_epoch(model, history, settings.keep)
            check_signals()  # the last point at which nothing has been saved
            _write_local_results(outputs, variant, model, recipe, history, kept, num_params, data)
            saved = ", ".join(
                str(p.relative_to(root)) for p in (outputs.checkpoint, outputs.train_metrics)
            )
            if log_epoch.error is not None:
                raise PipelineError(
                    f"{variant}: the tracking store at {uri} failed during training "
                    f"({log_epoch.error}); training finished and its results are saved "
                    f"({saved}). When the store answers again, `mnist-pipeline evaluate "
                    f"--variant {variant}{' --one-off' if outputs.one_off else ''}` records "
                    "them as a new run (or re-run the training)"
                )
            seconds = [row["time/epoch_seconds"] for row in history]
            mlflow.log_metrics(
                {
                    "time/train_seconds": round(sum(seconds), 4),
                    # Medians over the epochs (the first pays for warm-up): what `compare` shows.
                    "time/median_epoch_seconds": round(statistics.median(seconds), 4),
                    "time/median_samples_per_second": round(
                        statistics.median(row["time/samples_per_second"] for row in history)
                    ),
                    "kept_epoch": kept,
                }
            )
            model_id = log_model(model, variant, params={"variant": variant, **recipe_params})
            if val_data is not None:
                # The kept epoch's validation figures, linked to the model (the Models tab).
                # Same step, time and value as the epoch's own point: MLflow keeps one.
                row = history[kept - 1]
                mlflow.log_metrics(
                    {k: row[k] for k in ("val/accuracy", "val/loss")},
                    step=kept,
                    timestamp=log_epoch.timestamps.get(kept),
                    model_id=model_id,
                    dataset=inputs["validation"],
                )
            # Last: the run is complete, and evaluate finds it by the checkpoint's bytes.
            mlflow.set_tag(tracking.CHECKPOINT_TAG, file_md5(outputs.checkpoint))
            status = "FINISHED"
            if _Signals.received is not None:
                print(f"{variant}: a signal came while saving; the run is done", file=sys.stderr)
        except (KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
        finally:
            try:
                mlflow.end_run(status)
            except Exception:  # the store is gone; what matters is saved locally
                log.warning("could not mark the MLflow run %s as %s", run_id, status)
    where = outputs.checkpoint.relative_to(root)
    print(f"{variant}: MLflow run {run_id} ({tracking.run_name(variant)}), checkpoint {where}")
    if outputs.one_off:
        print(
            f"{variant}: a one-off recipe: the pipeline's outputs are unchanged; score it with "
            f"`mnist-pipeline evaluate --variant {variant} --one-off`"
        )
    return TrainResult(run_id, model_id, history, outputs.checkpoint, num_params)


class EpochLogger:
    """Logs each epoch's metrics in one batched call. If the tracking store fails mid-run,
    training goes on (its results are saved locally) and the first error is kept."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.timestamps: dict[int, int] = {}  # epoch -> the time its metrics were logged at

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        if self.error is not None:
            return
        import mlflow

        try:
            self.timestamps[epoch] = int(time.time() * 1000)
            mlflow.log_metrics(row, step=epoch, timestamp=self.timestamps[epoch])
        except Exception as err:
            self.error = first_line(err)
            print(
                f"warning: could not log epoch {epoch} to MLflow ({self.error}); "
                "training continues",
                file=sys.stderr,
            )


def _keep_epoch(model: nn.Module, history: list[dict], keep: str) -> int:
    """Load the weights to keep into `model`; return their epoch. "best": the epoch with the
    highest validation accuracy (the split exists for this; the test set is never consulted);
    "last", or no validation split: the final epoch."""
    states = {row["epoch"]: row.pop("_state") for row in history if "_state" in row}
    final = history[-1]["epoch"]
    if keep != "best" or "val/accuracy" not in history[-1]:
        return final
    # The first epoch to reach the best accuracy: the one whose weights _fit kept.
    best = max(history, key=lambda row: (row["val/accuracy"], -row["epoch"]))["epoch"]
    if best != final:
        model.load_state_dict(states[best])
    return best


def _fit(model, optimizer, train_data, val_data, recipe, generator, variant, log_epoch):
    """The epochs, each: train, validate, log. Rows of the history carry a copy of the weights
    while they are the best so far (`_state`), for `_keep_epoch`."""
    history = []
    best_acc = -1.0
    use_bar = sys.stderr.isatty()
    for epoch in range(1, recipe.epochs + 1):
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=len(train_data.y),
                desc=f"{variant} {epoch}/{recipe.epochs}",
                unit="img",
                leave=False,
                mininterval=0.5,
            )
        start = time.perf_counter()
        loss, acc = train_epoch(model, optimizer, train_data, recipe.batch_size, generator, bar)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if not math.isfinite(loss):
            raise Diverged(
                f"{variant}: training loss became {loss} in epoch {epoch}; the recipe diverged. "
                f"Try a lower learning rate than {recipe.lr} (variants.{variant}.lr)"
            )
        row = {
            "train/loss": loss,
            "train/accuracy": acc,
            "time/epoch_seconds": seconds,
            "time/samples_per_second": len(train_data.y) / seconds,
        }
        if val_data is not None:
            row["val/loss"], row["val/accuracy"] = evaluate_split(model, val_data)
        log_epoch(row, epoch)
        history.append({"epoch": epoch, **row})
        if val_data is not None and row["val/accuracy"] > best_acc:
            best_acc = row["val/accuracy"]
            for earlier in history[:-1]:
                earlier.pop("_state", None)
            history[-1]["_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        val = (
            f"val/loss {row['val/loss']:.4f} val/accuracy {row['val/accuracy']:.4f} "
            if val_data is not None
            else ""
        )
        print(
            f"{variant} epoch {epoch}/{recipe.epochs}: train/loss {loss:.4f} "
            f"train/accuracy {acc:.4f} {val}"
            f"({seconds:.2f}s, {row['time/samples_per_second']:.0f} img/s)",
            flush=True,
        )
    return history


def _write_local_results(outputs, variant, model, recipe, history, kept, num_params, data):
    """Checkpoint, per-epoch history (a DVC plot) and the training summary (DVC metrics) of the
    kept epoch. Only what the recipe and seed determine: the same run twice, the same bytes."""
    checkpoint.save(
        outputs.checkpoint,
        model,
        variant,
        recipe,
        dataset=data.name,
        data_checksum=data.checksum,
        num_params=num_params,
        epoch=kept,
    )
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(f"{row[c]:.6g}" if c in row else "" for c in HISTORY_COLUMNS))
    write_text_atomic(outputs.history, "\n".join(lines) + "\n")
    final = history[kept - 1]
    summary = {
        "params": num_params,
        "kept_epoch": kept,
        **{
            k: round(final[k], 6)
            for k in ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
            if k in final
        },
    }
    write_json_atomic(outputs.train_metrics, summary)
    return summary
