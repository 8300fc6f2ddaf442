"""The pipeline's 27 model steps and its report in ONE Python process: the other division of work.

    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_pipeline.py --keep /tmp/bench
    python benchmarks/bench_one_process.py /tmp/bench

Runs, in a folder where `bench_pipeline.py --keep` has just run the pipeline, `train`, then
`evaluate`, then `export` for every variant in params.yaml and then `report`, all through
`mnist_pipeline.cli.main` in this one process. It prints the wall time of each step, the total,
and the training time of the runs it made (their `time/train_seconds`). Compare the total with
`bench_pipeline.py`'s `dvc repro --force`: the difference is what one process per stage costs.
This is a measurement, not a way to run the pipeline: DVC records nothing here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml
from bench_pipeline import training_seconds  # this folder: the script's own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a clone where the pipeline has run")
    args = parser.parse_args()
    os.chdir(args.folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the folder's own store
    start, started_ms = time.perf_counter(), int(time.time() * 1000)
    from mnist_pipeline.cli import main as cli

    variants = list(yaml.safe_load(Path("params.yaml").read_text())["variants"])
    for step in ("train", "evaluate", "export"):
        for variant in variants:
            since = time.perf_counter()
            if cli([step, "--variant", variant]) != 0:
                return 1
            now = time.perf_counter()
            print(f"{now - start:7.1f}s  {step}@{variant}: {now - since:.1f} s", file=sys.stderr)
    if cli(["report"]) != 0:
        return 1
    total = time.perf_counter() - start

    training = training_seconds(Path.cwd() / "mlflow.db", since_ms=started_ms)
    trained = sum(training.values())
    print(
        f"\none process: {total:.1f} s in all, {trained:.1f} s of training ({len(training)} runs)"
    )
    print(f"total / training: {total / trained:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
