"""Per-epoch training time, three ways, side by side in one process:

  1. tutorial: torchvision `datasets.MNIST` + `transforms.ToTensor()` + a `DataLoader` (recipe's
     batch size and shuffle, default workers), the same model and optimizer;
  2. bare:     the same model and optimizer stepping over in-memory tensors, nothing else;
  3. project:  `mnist_pipeline.train.train` (validation, metrics, MLflow logging to a scratch
     store).

    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_epoch.py --variant mlp_relu_dropout

Prints per-epoch medians and the ratios tutorial/project and project/bare. Throughput
(samples per second) is compared, since the project trains on 60,000 - val_size images.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_pipeline.config import load_params, with_overrides
from mnist_pipeline.dataset import FILES, load_dataset
from mnist_pipeline.download import download
from mnist_pipeline.models import VARIANTS, build_model, logits_view
from mnist_pipeline.paths import PARAMS_FILE, data_dir, project_root


def plain_optimizer(recipe, model) -> torch.optim.Optimizer:
    """The optimizer as the tutorials (and a bare loop) write it: torch's defaults."""
    cls = torch.optim.SGD if recipe.optimizer == "sgd" else torch.optim.Adam
    return cls(model.parameters(), lr=recipe.lr)


def tutorial_epochs(variant, recipe, root: Path, dataset: str, epochs: int) -> list[float]:
    """The tutorials' loop: a torchvision dataset, ToTensor per sample, a DataLoader."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"  # torchvision's layout, linked to our verified files
        raw.mkdir(parents=True)
        for name in FILES:
            (raw / name).symlink_to(data_dir(root, dataset).resolve() / name)
        train_set = datasets.MNIST(tmp, train=True, download=False, transform=transforms.ToTensor())
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=recipe.batch_size, shuffle=recipe.shuffle
        )
        torch.manual_seed(0)
        model = build_model(variant, use_dropout=recipe.use_dropout)
        net, optimizer = logits_view(model), plain_optimizer(recipe, model)
        times = []
        for _ in range(epochs):
            model.train()
            start = time.perf_counter()
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - start)
    return [len(train_set) / t for t in times]


def bare_epochs(variant, recipe, x, y, epochs: int) -> list[float]:
    """The floor: in-memory tensors, index slicing, the model and optimizer, nothing else."""
    torch.manual_seed(0)
    model = build_model(variant, use_dropout=recipe.use_dropout)
    net, optimizer = logits_view(model), plain_optimizer(recipe, model)
    n, bs = len(y), recipe.batch_size
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n) if recipe.shuffle else None
        for i in range(0, n, bs):
            if order is None:
                xb, yb = x[i : i + bs], y[i : i + bs]
            else:
                idx = order[i : i + bs]
                xb, yb = x[idx], y[idx]
            optimizer.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return [n / t for t in times]


def project_epochs(params, variant, root: Path) -> tuple[list[float], list[float]]:
    """The project's code path with MLflow on. Returns samples/s of the training pass, and of the
    whole epoch including validation and logging (from the metric timestamps)."""
    import mlflow

    from mnist_pipeline.train import train

    with tempfile.TemporaryDirectory() as tmp:
        # A scratch project: the real data linked in, checkpoints and runs kept out of the repo.
        scratch = Path(tmp)
        (scratch / "data").mkdir()
        dataset = params.data.dataset
        (scratch / "data" / dataset).symlink_to(data_dir(root, dataset).resolve())
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'bench.db'}"
        result = train(params, variant, scratch)
        client = mlflow.MlflowClient()
        stamps = [m.timestamp for m in client.get_metric_history(result.run_id, "train/loss")]
        n = result.history[0]["time/samples_per_second"] * result.history[0]["time/epoch_seconds"]
    train_pass = [row["time/samples_per_second"] for row in result.history]
    whole = [n * 1000 / (b - a) for a, b in itertools.pairwise(stamps)]
    return train_pass, whole


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="mlp_relu_dropout", choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per method")
    parser.add_argument(
        "--rounds", type=int, default=3, help="bare and project alternate this many times"
    )
    parser.add_argument("--skip-tutorial", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    root = project_root()
    params = load_params(root / PARAMS_FILE)
    download(params.data, root, log=lambda s: None)
    params = with_overrides(params, args.variant, epochs=args.epochs, device="cpu")
    recipe = params.recipe(args.variant)
    data = load_dataset(root, params.data.dataset)
    x = data.train_images.unsqueeze(1).float().div_(255)
    y = data.train_labels
    print(
        f"{args.variant}: {recipe.optimizer} lr={recipe.lr} batch={recipe.batch_size} "
        f"shuffle={recipe.shuffle}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds of {args.epochs} epochs each",
        flush=True,
    )
    # Timings on a shared 2-core machine drift by 20% from minute to minute: the methods
    # alternate, and every epoch of every round goes into the medians.
    results: dict[str, list[float]] = {
        "bare": [],
        "tutorial": [],
        "project (train pass)": [],
        "project (whole epoch)": [],
    }
    for round_ in range(args.rounds):
        results["bare"] += bare_epochs(args.variant, recipe, x, y, args.epochs)
        if round_ == 0 and not args.skip_tutorial:  # slow, and far off: one round tells
            results["tutorial"] += tutorial_epochs(
                args.variant, recipe, root, params.data.dataset, args.epochs
            )
        train_pass, whole = project_epochs(params, args.variant, root)
        results["project (train pass)"] += train_pass
        results["project (whole epoch)"] += whole
    print(f"\n{'method':24} {'samples/s (median)':>20} {'s per 60k-image epoch':>24}")
    med = {k: statistics.median(v) for k, v in results.items() if v}
    for name, value in med.items():
        print(f"{name:24} {value:20,.0f} {60_000 / value:24.2f}")
    project = med["project (train pass)"]
    print()
    if "tutorial" in med:
        print(f"tutorial / project: {project / med['tutorial']:.2f}x faster")
    print(f"project / bare:     {med['bare'] / project:.2f}x the bare loop's time per sample")
    print(f"project whole epoch / bare: {med['bare'] / med['project (whole epoch)']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
