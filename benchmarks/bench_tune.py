"""Early stopping's worth on the full data: `mnist-pipeline tune` with ASHA against the same search
without early stopping (`--no-early-stopping`), same variant, samples, seed and machine.

    python benchmarks/bench_tune.py [--variant ffn1_relu] [--samples 16]

Runs both searches one after the other (Ray on this machine, each trial one CPU) and prints wall
time and best validation accuracy of each. Optuna's TPE starts with 10 seeded random recipes, the
same in both searches; its later proposals depend on what it observed, which early stopping
changes. Needs the data (`mnist-pipeline download`) and writes only to the tracking store and
one-off/tune/.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BEST = re.compile(r"best validation accuracy ([0-9.]+) with (.*?) \((.*?); MLflow run (\w+)\)")


def search(variant: str, samples: int, *flags: str) -> dict:
    program = str(Path(sys.executable).with_name("mnist-pipeline"))  # this environment's
    command = [program, "tune", "--variant", variant, "--samples", str(samples), *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    found = BEST.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return {
        "command": " ".join(["mnist-pipeline", *command[1:]]),
        "seconds": seconds,
        "accuracy": float(found[1]),
        "recipe": found[2],
        "trials": found[3],
        "run": found[4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="ffn1_relu")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    runs = {
        "ASHA": search(args.variant, args.samples),
        "no early stopping": search(args.variant, args.samples, "--no-early-stopping"),
    }
    print("| search | wall time (s) | best val accuracy | best recipe | trials | MLflow run |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(
            f"| {name} | {r['seconds']:.0f} | {r['accuracy']:.4f} | {r['recipe']} | "
            f"{r['trials']} | {r['run'][:8]} |"
        )
    saved = 1 - runs["ASHA"]["seconds"] / runs["no early stopping"]["seconds"]
    print(f"\nASHA saved {saved:.0%} of the wall time")


if __name__ == "__main__":
    main()
