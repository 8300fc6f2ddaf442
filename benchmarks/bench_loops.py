"""The two loops a researcher waits for, timed stage by stage on the full data.

    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_loops.py              # HEAD
    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_loops.py --rev 5c1e0f2 --keep /tmp/b

Clones the repository at --rev and runs, in that clone, with this environment's Python and the
clone's own code (PYTHONPATH=<clone>/src):

1. `fresh`: `dvc repro`, as a fresh clone's `make pipeline` does;
2. `exp`: the one-variant change, `dvc exp run -S variants.ffn1_relu.lr=0.05` (after committing
   what 1. wrote, as the README says to before comparing experiments);
3. `noop`: `dvc repro` again: nothing to do but `sync`.

Every `mnist-pipeline` process DVC starts runs through `stage_profile.py` (a shim named
`mnist-pipeline` first on PATH), which splits its wall time into python, imports, store,
recording and work. DVC's own time is the loop's wall time less its stages'. Training is what the
train stages' epochs took (`time/train_seconds` of the runs in the clone's store). Prints one
Markdown table per loop; `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("python", "imports", "store", "recording", "work")
LOOPS = {
    "fresh": ["dvc", "repro"],
    "exp": ["dvc", "exp", "run", "-S", "variants.ffn1_relu.lr=0.05"],
    "noop": ["dvc", "repro"],
}


def shim(folder: Path, log: Path, profile: bool) -> dict[str, str]:
    """A `mnist-pipeline` first on PATH that times (and with `profile`, profiles) each call into
    `log`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "mnist-pipeline"
    profiler = REPO / "benchmarks" / "stage_profile.py"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(sys.executable)} {shlex.quote(str(profiler))} --t0 $(date +%s.%N)"
        f' --log {shlex.quote(str(log))}{"" if profile else " --plain"} -- "$@"\n'
    )
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"}


def run_loop(name: str, work: Path, env: dict[str, str], log: Path) -> dict:
    """Run one loop; its wall time, and each stage's line from the profile log."""
    log.write_text("")
    start = time.perf_counter()
    proc = subprocess.run(LOOPS[name], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        sys.exit(f"{name}: {' '.join(LOOPS[name])} failed:\n{output}")
    stages = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {"loop": name, "wall": round(wall, 2), "stages": stages}


def training_seconds(store: Path, since_ms: int) -> dict[str, float]:
    """variant -> time/train_seconds of the runs started since `since_ms` (the loop's)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"attributes.start_time >= {since_ms}", order_by=["attributes.start_time"]
    )
    return {
        r.data.tags["variant"]: r.data.metrics["time/train_seconds"]
        for r in runs
        if "variant" in r.data.tags and "time/train_seconds" in r.data.metrics
    }


def table(result: dict) -> str:
    """One row per kind of stage (train@*, evaluate@*, ... summed), then DVC's own time."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for stage in result["stages"]:
        args = stage["args"]
        kind = args[0]
        rows[kind]["count"] += 1
        rows[kind]["wall"] += stage["wall"]
        for part in PARTS:
            rows[kind][part] += stage["parts"].get(part, 0.0)
    staged = sum(r["wall"] for r in rows.values())
    trained = sum(result["training"].values())
    head = "| stage | n | wall | python | imports | store | recording | work |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, r in rows.items():
        cells = " | ".join(f"{r[p]:.1f}" for p in ("wall", *PARTS))
        lines.append(f"| {kind} | {int(r['count'])} | {cells} |")
    lines.append(f"| DVC's own time | | {result['wall'] - staged:.1f} | | | | | |")
    lines.append(f"| **total** | | **{result['wall']:.1f}** | | | | | |")
    lines.append("")
    lines.append(
        f"training (time/train_seconds): {trained:.1f} s; beyond training: "
        f"{result['wall'] - trained:.1f} s; total / training: "
        f"{result['wall'] / trained:.2f}x"
        if trained
        else "no training in this loop"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the commit to measure (default: HEAD)")
    parser.add_argument("--keep", type=Path, help="clone into this folder and keep it")
    parser.add_argument("--loops", default="fresh,exp,noop", help="which loops, in order")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--profile", action="store_true", help="split each stage (slower: quote a plain run)"
    )
    args = parser.parse_args()
    if not os.environ.get("MNIST_MIRROR"):
        sys.exit("set MNIST_MIRROR to a folder holding the four MNIST .gz files")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
        subprocess.run(["git", "checkout", "-q", args.rev], cwd=work, check=True)
        log = Path(tmp) / "stages.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env["PATH"] = shim(Path(tmp) / "bin", log, args.profile)["PATH"] + env["PATH"]
        env["PYTHONPATH"] = str(work / "src")
        env["MNIST_MIRROR"] = str(Path(os.environ["MNIST_MIRROR"]).resolve())
        results = []
        for name in args.loops.split(","):
            if name == "exp":  # commit this host's results first, as the README says
                git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
                subprocess.run([*git, "add", "-A"], cwd=work, check=True)
                subprocess.run([*git, "commit", "-qm", "results", "--allow-empty"], cwd=work)
            since = int(time.time() * 1000)
            result = run_loop(name, work, env, log)
            result["training"] = training_seconds(work / "mlflow.db", since)
            results.append(result)
            print(f"\n### {name}: `{' '.join(LOOPS[name])}`\n\n{table(result)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rev": args.rev, "loops": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
