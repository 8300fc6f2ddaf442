"""Does a stage cost more as the store grows? The same commands on a store as left by a pipeline
run, then with N more runs in it.

    python benchmarks/bench_store_scale.py /tmp/bench --runs 10000

FOLDER is a project a full pipeline ran in (`bench_loops.py --keep FOLDER`). The script copies it
twice, adds to one copy's `mlflow.db` N finished runs, copies of the pipeline's runs with their
tags, params, metrics and dataset inputs but another checkpoint MD5 each (a team's store after
some months: mostly runs of checkpoints that are no longer the outputs), and times, in each copy,
side by side, `--rounds` times (medians):

- `dvc repro` with nothing to do (DVC, then `sync` finding its receipt);
- `mnist-pipeline sync --verify` (every current run looked at again);
- `mnist-pipeline train --variant logistic_regression --epochs 1` (a one-off: the store opened,
  a run made and recorded);
- `mnist-pipeline compare` (reads every finished run of the experiment).

The rows are added with SQL, in one transaction (through MLflow they would take an hour).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

COMMANDS = {
    "no-op `dvc repro`": ["dvc", "repro"],
    "`sync --verify`": ["mnist-pipeline", "sync", "--verify"],
    "one-off `train` (1 epoch)": [
        "mnist-pipeline",
        "train",
        "--variant",
        "logistic_regression",
        "--epochs",
        "1",
    ],
    "`compare`": ["mnist-pipeline", "compare"],
}
COPIED = {  # table -> its run id column
    "tags": "run_uuid",
    "params": "run_uuid",
    "metrics": "run_uuid",
    "latest_metrics": "run_uuid",
}


def add_runs(db: Path, count: int) -> None:
    """Add `count` copies of the store's finished runs (round robin), each its own run id, name
    and checkpoint MD5."""
    con = sqlite3.connect(db)
    cols = {t: [r[1] for r in con.execute(f"pragma table_info({t})")] for t in ("runs", *COPIED)}
    inputs_cols = [r[1] for r in con.execute("pragma table_info(inputs)")]
    sources = [r[0] for r in con.execute("select run_uuid from runs where status = 'FINISHED'")]
    with con:
        for i in range(count):
            source, new = sources[i % len(sources)], uuid.uuid4().hex
            found = con.execute("select * from runs where run_uuid = ?", (source,)).fetchone()
            row = dict(zip(cols["runs"], found, strict=True))
            row |= {"run_uuid": new, "name": f"{row['name']} · copy {i}"}
            row["artifact_uri"] = row["artifact_uri"].replace(source, new)
            _insert(con, "runs", row)
            for table, key in COPIED.items():
                for values in con.execute(f"select * from {table} where {key} = ?", (source,)):
                    item = dict(zip(cols[table], values, strict=True)) | {key: new}
                    if table == "tags" and item["key"] == "checkpoint.md5":
                        item["value"] = uuid.uuid4().hex  # an older checkpoint
                    _insert(con, table, item)
            for values in con.execute(
                "select * from inputs where destination_id = ?", (source,)
            ).fetchall():
                item = dict(zip(inputs_cols, values, strict=True)) | {
                    "input_uuid": uuid.uuid4().hex,
                    "destination_id": new,
                }
                _insert(con, "inputs", item)
    con.close()


def _insert(con: sqlite3.Connection, table: str, row: dict) -> None:
    names = ", ".join(row)
    con.execute(
        f"insert into {table} ({names}) values ({', '.join('?' * len(row))})", list(row.values())
    )


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a project a full pipeline ran in")
    parser.add_argument("--runs", type=int, default=10_000, help="runs to add (default 10,000)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per command (median)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store-scale-"))
    copies = {"as left": work / "plain", f"+{args.runs:,} runs": work / "grown"}
    for folder in copies.values():
        shutil.copytree(args.folder, folder, symlinks=True)
    start = time.perf_counter()
    add_runs(copies[f"+{args.runs:,} runs"] / "mlflow.db", args.runs)
    print(f"added {args.runs:,} runs in {time.perf_counter() - start:.0f} s ({work})")
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            for label, folder in copies.items():  # side by side
                figures[name].setdefault(label, []).append(timed(command, folder))
    labels = list(copies)
    print(f"| command | {' | '.join(labels)} | ratio |\n|---|" + "---:|" * (len(labels) + 1))
    for name, by_label in figures.items():
        medians = [statistics.median(by_label[label]) for label in labels]
        cells = " | ".join(f"{m:.2f} s" for m in medians)
        print(f"| {name} | {cells} | {medians[1] / medians[0]:.2f}× |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
