"""Stage 2, `mnist-pipeline train --variant NAME`: train one variant, record one MLflow run.

    mnist-pipeline train --variant mlp_relu_dropout            # the params.yaml recipe
    mnist-pipeline train --variant ffn1_relu --epochs 1 --lr 0.05

The data sits in memory as float tensors on the training device; a batch is an index slice, so an
epoch costs about what a bare loop over those tensors costs. Per-epoch metrics come from a
validation split held out of the training set with a fixed seed; the test set is evaluate's alone.
"""

from __future__ import annotations

import dataclasses
import io
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

from mnist_pipeline import paths
from mnist_pipeline.config import Params, Recipe
from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.errors import ConfigError, PipelineError, first_line
from mnist_pipeline.fileio import write_atomic, write_json_atomic, write_text_atomic
from mnist_pipeline.models import build_model, count_parameters, logits_view, summary_text

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mnist-pipeline/checkpoint/1"
HISTORY_COLUMNS = (
    "epoch",
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "time/epoch_seconds",
    "time/samples_per_second",
)


# --- device and data --------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU. An explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise ConfigError(
            f"train.device: 'cuda' requested but torch {torch.__version__} sees no CUDA device; "
            "use device 'auto' or 'cpu'"
        )
    if name == "mps" and not mps:
        raise ConfigError("train.device: 'mps' requested but Apple MPS is not available here")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    from mnist_pipeline.tracking import cpu_model

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "Apple MPS" if device.type == "mps" else cpu_model()


def as_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1] on `device` (no normalisation)."""
    return images.to(device).unsqueeze(1).float().div_(255)


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


def set_cpu_threads(device: torch.device, batch_size: int) -> None:
    """One intra-op thread for small CPU batches: at batch 32 the work per op is too small to
    split, and the hand-off costs more than it saves (measured on 2 cores: 1.49 against 1.74 ms
    per mlp_relu_dropout step); larger batches keep torch's default. OMP_NUM_THREADS wins."""
    if device.type == "cpu" and batch_size <= 32 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


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


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- checkpoint -------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, variant: str, recipe: Recipe, **extra) -> None:
    """Weights + what rebuilds the model; only tensors and plain values (weights_only loads it)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "variant": variant,
        "recipe": dataclasses.asdict(recipe),
        "state_dict": state,
        **extra,
    }

    def write(tmp: Path) -> None:
        # Serialised in memory (a few MB), written by Python: a full disk is then an OSError,
        # which write_atomic reports (torch's own writer says "unexpected pos"). fsync before
        # the rename: the new checkpoint is on disk before it replaces the old one.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with tmp.open("wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


# --- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    history: list[dict[str, float]]
    checkpoint: Path
    num_params: int


def train(params: Params, variant: str, root: Path) -> TrainResult:
    """Train `variant` with its recipe in `params`; checkpoint, metrics and one MLflow run."""
    from mnist_pipeline import tracking

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

    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.run_experiment_id(data.name, root)
    # Under `mlflow run`, MLflow has started a run and exported its id: ours becomes its child.
    parent_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    tags = tracking.run_tags(root, variant, device.type, device_name(device))
    tags |= {"data.dataset": data.name, "data.checksum": data.checksum}
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(2)  # MLflow's 10 s misses short runs
    mlflow.set_system_metrics_samples_before_logging(1)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=variant,
        tags=tags,
        parent_run_id=parent_run_id,
        log_system_metrics=True,
    )
    # From here on SIGTERM ends the run KILLED like Ctrl-C does, checkpoint writing included.
    with sigterm_as_exception():
        status = "FAILED"
        try:
            mlflow.log_params(
                {
                    "variant": variant,
                    **dataclasses.asdict(recipe),
                    **dataclasses.asdict(settings),
                    "device_resolved": device.type,
                    "dataset": data.name,
                    "train_size": len(train_data.y),
                    "num_params": num_params,
                }
            )
            mlflow.log_text(summary_text(model), "model_summary.txt")
            log_epoch = EpochLogger()
            history = _fit(
                model, optimizer, train_data, val_data, recipe, generator, variant, log_epoch
            )
            kept = _keep_epoch(model, history, settings.keep)
            summary = _write_local_results(
                root, variant, model, recipe, history, kept, num_params, data, run
            )
            # The checkpoint is now this run's: the file naming the previous run goes. (Until
            # here, a diverged, interrupted or failed run has left models/<variant>/ as it was.)
            paths.run_info_path(root, variant).unlink(missing_ok=True)
            if log_epoch.error is not None:
                raise PipelineError(
                    f"{variant}: the tracking store at {uri} failed during training "
                    f"({log_epoch.error}); training finished and its results are saved "
                    f"({paths.checkpoint_path(root, variant).relative_to(root)}, "
                    f"{paths.train_metrics_path(root, variant).relative_to(root)}). When the "
                    f"store answers again, `mnist-pipeline evaluate --variant {variant}` records "
                    "them as a new run (or re-run the training)"
                )
            mlflow.log_metrics(
                {"time/train_seconds": summary["time/train_seconds"], "kept_epoch": kept}
            )
            log_model(model)
            write_json_atomic(
                paths.run_info_path(root, variant),
                {
                    "run_id": run.info.run_id,
                    "experiment_id": experiment_id,
                    "tracking_uri": uri,
                },
            )
            status = "FINISHED"
        except (KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
        finally:
            try:
                mlflow.end_run(status)
            except Exception:  # the store is gone; what matters is saved locally
                log.warning("could not mark the MLflow run %s as %s", run.info.run_id, status)
    return TrainResult(run.info.run_id, history, paths.checkpoint_path(root, variant), num_params)


class EpochLogger:
    """Logs each epoch's metrics in one batched call. If the tracking store fails mid-run,
    training goes on (its results are saved locally) and the first error is kept."""

    def __init__(self) -> None:
        self.error: str | None = None

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        if self.error is not None:
            return
        import mlflow

        try:
            mlflow.log_metrics(row, step=epoch)
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


def _write_local_results(root, variant, model, recipe, history, kept, num_params, data, run):
    """Checkpoint, per-epoch history (a DVC plot) and the training summary (DVC metrics): the
    metrics are those of the kept epoch, the timings medians over all epochs."""
    save_checkpoint(
        paths.checkpoint_path(root, variant),
        model,
        variant,
        recipe,
        dataset=data.name,
        data_checksum=data.checksum,
        num_params=num_params,
        run_id=run.info.run_id,
        epoch=kept,
    )
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(f"{row[c]:.6g}" if c in row else "" for c in HISTORY_COLUMNS))
    write_text_atomic(paths.history_path(root, variant), "\n".join(lines) + "\n")
    seconds = [row["time/epoch_seconds"] for row in history]
    final = history[kept - 1]
    summary = {
        "params": num_params,
        "epochs": len(history),
        "kept_epoch": kept,
        **{
            k: final[k]
            for k in ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
            if k in final
        },
        "time/train_seconds": sum(seconds),
        "time/epoch_seconds": statistics.median(seconds),
        "time/samples_per_second": statistics.median(
            row["time/samples_per_second"] for row in history
        ),
    }
    write_json_atomic(paths.train_metrics_path(root, variant), summary)
    return summary


def log_model(model: nn.Sequential) -> None:
    """Log the model from CPU weights, with a signature and an input example."""
    import copy

    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    cpu_model = copy.deepcopy(model).cpu().eval()
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        output = cpu_model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        cpu_model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
