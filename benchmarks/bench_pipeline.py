"""Time a whole `dvc repro` on a fresh clone, and split it into training and everything else.

    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_pipeline.py

Clones this repository (HEAD) into a temporary folder and runs `dvc repro --force` there with
the current environment. Forced, because the committed dvc.lock matches what a retrain writes byte
for byte: a plain `dvc repro` on a fresh clone retrains and exports, then finds evaluate and
report up to date. Timestamps each stage from DVC's output, and reads the training time each train
stage measured from the clone's MLflow store (`time/train_seconds`: the sum of its epochs'
training passes; timings are not DVC outputs, so that the outputs are byte-reproducible).
Prints the stages' wall times and how much of the total is training and how much overhead
(process start-up, imports, data loading, validation, logging, evaluation, DVC's bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own store
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        stage_seconds: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        current, since = "(dvc start-up)", start
        proc = subprocess.Popen(
            ["dvc", "repro", "--force"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Running stage '"):
                now = time.perf_counter()
                stage_seconds[current] += now - since
                current, since = line.split("'")[1], now
                print(f"{now - start:7.1f}s  {current}", flush=True)
        total = time.perf_counter() - start
        stage_seconds[current] += time.perf_counter() - since
        if proc.wait() != 0:
            print(f"dvc repro --force failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        training = training_seconds(work / "mlflow.db")

    kinds: dict[str, float] = defaultdict(float)
    for stage, seconds in stage_seconds.items():
        kinds[stage.split("@")[0]] += seconds
    trained = sum(training.values())
    print(f"\n{'stage':40} {'wall s':>8} {'training s':>11}")
    for stage, seconds in stage_seconds.items():
        variant = stage.split("@")[1] if stage.startswith("train@") else None
        train_s = f"{training[variant]:11.1f}" if variant in training else ""
        print(f"{stage:40} {seconds:8.1f} {train_s}")
    print(f"\ntotal wall time of dvc repro:   {total:8.1f} s ({len(stage_seconds) - 1} stages)")
    print(f"sum of training times:          {trained:8.1f} s")
    print(f"overhead:                       {total - trained:8.1f} s")
    for kind in ("(dvc start-up)", "download", "train", "evaluate", "export", "report"):
        extra = kinds[kind] - (trained if kind == "train" else 0)
        label = f"  {kind}{' (outside training)' if kind == 'train' else ''}:"
        print(f"{label:32} {extra:8.1f} s")
    print(f"\ntotal / training: {total / trained:.2f}x")
    return 0


def training_seconds(store: Path, since_ms: int = 0) -> dict[str, float]:
    """variant -> time/train_seconds of its latest finished run in the store (started at or
    after `since_ms`, milliseconds since the epoch)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"attributes.status = 'FINISHED' and attributes.start_time >= {since_ms}",
        order_by=["attributes.start_time ASC"],
    )
    return {
        r.data.tags["variant"]: r.data.metrics["time/train_seconds"]
        for r in runs
        if "variant" in r.data.tags and "time/train_seconds" in r.data.metrics
    }


if __name__ == "__main__":
    sys.exit(main())
