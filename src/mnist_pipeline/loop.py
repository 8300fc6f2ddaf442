"""The training loop, shared by the train stage and the search's trials.

The data sits on the device and a batch is an index slice: no DataLoader collating every batch."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnist_pipeline import signals
from mnist_pipeline.config import Recipe, TrainConfig
from mnist_pipeline.dataset import Dataset
from mnist_pipeline.device import as_float, set_cpu_threads
from mnist_pipeline.errors import ConfigError, PipelineError
from mnist_pipeline.models import build_model, logits_view, predict

HISTORY_COLUMNS = ("epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy")  # DVC's
OnEpoch = Callable[[dict[str, float], int], None]


class Diverged(PipelineError):
    pass


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class SetUp:
    """What `fit` trains; `generator` None: no shuffling."""

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None
    train: Split
    val: Split | None


@dataclass(frozen=True)
class Fit:
    history: list[dict[str, float]]
    kept_epoch: int
    kept_state: dict[str, torch.Tensor]


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


def make_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer, fused on CPU and CUDA (about 20% of a batch-32 step on CPU)."""
    device = next(model.parameters()).device.type
    fused = {"fused": True} if device in ("cpu", "cuda") else {}
    optimizer = torch.optim.SGD if recipe.optimizer == "sgd" else torch.optim.Adam
    return optimizer(model.parameters(), lr=recipe.lr, **fused)


def set_up(variant: str, recipe: Recipe, settings: TrainConfig, data: Dataset, device) -> SetUp:
    train_data, val_data = train_val_split(data, settings.val_size, settings.seed, device)
    set_cpu_threads(device, recipe.batch_size)
    torch.manual_seed(settings.seed)
    model = build_model(variant, use_dropout=recipe.use_dropout).to(device)
    generator = torch.Generator().manual_seed(settings.seed) if recipe.shuffle else None
    return SetUp(model, make_optimizer(recipe, model), generator, train_data, val_data)


def train_epoch(model, optimizer, data: Split, batch_size: int, *, generator, progress=None):
    """One pass over `data`; the mean loss and accuracy, reduced after: no host sync per step."""
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
        signals.check()
    sizes = torch.tensor([min(batch_size, n - s) for s in range(0, n, batch_size)])
    mean_loss = (torch.stack(losses).cpu() * sizes).sum() / n
    targets = data.y if order is None else data.y[order]
    return mean_loss.item(), (torch.cat(preds) == targets).sum().item() / n


def evaluate_split(model: nn.Sequential, data: Split) -> tuple[float, float]:
    pred, loss = predict(model, data.x, data.y)
    return loss, (pred == data.y).sum().item() / len(data.y)


def fit(setup: SetUp, *, recipe: Recipe, keep: str, on_epoch: OnEpoch, label: str) -> Fit:
    """The epochs; kept: the first best on validation (keep="best"), else the last."""
    model, train_data, val_data = setup.model, setup.train, setup.val
    history: list[dict[str, float]] = []
    best = None  # (validation accuracy, epoch, weights) of the first epoch to reach the best
    for epoch in range(1, recipe.epochs + 1):
        start = time.perf_counter()
        desc = f"{label} {epoch}/{recipe.epochs}"
        bar_options = {"unit": "img", "leave": False, "mininterval": 0.5, "disable": None}
        with tqdm(total=len(train_data.y), desc=desc, **bar_options) as bar:  # None: not in a log
            step = {"generator": setup.generator, "progress": bar}
            loss, acc = train_epoch(model, setup.optimizer, train_data, recipe.batch_size, **step)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise Diverged(
                f"{label}: training loss became {loss} in epoch {epoch}; the recipe diverged. "
                f"Try a lower learning rate than {recipe.lr} (variants.{label}.lr)"
            )
        row = {"train/loss": loss, "train/accuracy": acc, "time/epoch_seconds": seconds}
        row["time/samples_per_second"] = len(train_data.y) / seconds
        if val_data is not None:
            row["val/loss"], row["val/accuracy"] = evaluate_split(model, val_data)
            if best is None or row["val/accuracy"] > best[0]:  # a tie keeps the earlier epoch
                best = (row["val/accuracy"], epoch, _copy(model))
        on_epoch(row, epoch)
        history.append({"epoch": epoch, **row})
        print(f"{label} epoch {epoch}/{recipe.epochs}: {_shown(row)}", flush=True)
    if keep == "best" and best is not None:
        return Fit(history, best[1], best[2])
    return Fit(history, recipe.epochs, _copy(model))


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shown(row: dict[str, float]) -> str:
    figures = " ".join(f"{k} {row[k]:.4f}" for k in HISTORY_COLUMNS[1:] if k in row)
    seconds, speed = row["time/epoch_seconds"], row["time/samples_per_second"]
    return f"{figures} ({seconds:.2f}s, {speed:.0f} img/s)"
