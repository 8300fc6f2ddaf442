"""Where one `mnist-pipeline` process spends its time: start-up, work, recording.

    python benchmarks/stage_profile.py --log times.jsonl -- train --variant ffn1_relu

Runs `mnist_pipeline.cli.main(ARGS)` under pyinstrument's sampling profiler and appends one JSON
line to --log: the command, its wall time from the process's start to its end, and that time
split into

- `python`: the interpreter's own start-up (before the profiler starts) and what follows `main`;
- `imports`: every sample inside an import (torch, MLflow, ONNX, ... wherever it happens);
- `store`: opening the tracking store and checking it answers (`open_store`, `check_reachable`,
  `_open_sqlite_store`, outside imports);
- `recording`: the code of the recording package (`mnist_pipeline/record*`, `registry.py`,
  `logged_model.py`), outside imports and the store;
- `work`: the rest: what the stage is for (loading data, training, scoring, exporting, ...).

The profile runs the command in this process; `--plain` runs it as the `mnist-pipeline` script
does, in a fork of the warm process where one is ready (`mnist_pipeline.warm`), and logs its wall
time alone.

The split is by module and function names that both the code before and after issue 30 use, so
one script measures both. `bench_loops.py` puts this script on DVC's PATH as `mnist-pipeline`
(`--t0`, the time that shim read just before Python starts, is the process's start). The profiler
slows what it samples (imports most): quote the walls of a `--plain` run, and read the
split of a profiled one as proportions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# 10 ms: the profiler then adds about a fifth to an import-heavy process (1 ms: two fifths);
# the split is a sample, the walls of a --plain run are the figures to quote.
INTERVAL_S = 0.01
STORE_FUNCTIONS = {"open_store", "check_reachable", "_open_sqlite_store", "open"}
STORE_FILES = ("mnist_pipeline/tracking.py", "mnist_pipeline/record/store.py")
RECORDING_FILES = ("mnist_pipeline/record", "mnist_pipeline/registry.py", "logged_model.py")


def category(frame, inherited: str) -> str:
    """The category of `frame`'s own time, given its caller's: an import wins over anything
    around it, the store over recording, recording over work."""
    name, path = frame.function or "", (frame.file_path or "").replace(os.sep, "/")
    if inherited == "imports" or name in ("_find_and_load", "_handle_fromlist"):
        return "imports"
    if inherited == "store" or (
        name in STORE_FUNCTIONS and (name != "open" or path.endswith(STORE_FILES))
    ):
        return "store"
    if inherited == "recording" or any(part in path for part in RECORDING_FILES):
        return "recording"
    return "work"


def split(root) -> dict[str, float]:
    """Seconds per category over the whole call tree."""
    totals = {"imports": 0.0, "store": 0.0, "recording": 0.0, "work": 0.0}
    todo = [(root, "work")]
    while todo:
        frame, inherited = todo.pop()
        kind = category(frame, inherited)
        own = frame.time - sum(child.time for child in frame.children)
        totals[kind] += max(own, 0.0)
        todo.extend((child, kind) for child in frame.children)
    return totals


def plain(args: list[str]) -> int:
    """The command's exit code, run as the `mnist-pipeline` script runs it (a commit without the
    warm process: in this process)."""
    try:
        from mnist_pipeline.warm import delegate
    except ImportError:
        delegate = None
    code = delegate(args) if delegate else None
    if code is None:
        from mnist_pipeline.cli import main as pipeline_main

        code = pipeline_main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def log_line(log: Path, args: list[str], code: int, wall: float, parts: dict) -> None:
    line = {"args": args, "exit": code, "wall": round(wall, 3), "parts": parts}
    with log.open("a") as out:
        out.write(json.dumps(line) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument(
        "--plain", action="store_true", help="no profiler: the wall time alone, undisturbed"
    )
    parser.add_argument("--t0", type=float, help="the process's start (default: now)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then mnist-pipeline's args")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    t0 = options.t0 or time.time()
    if options.plain:  # as `mnist-pipeline` runs it: in a fork of the warm process where it can
        code = plain(args)
        log_line(options.log, args, code, time.time() - t0, {})
        os._exit(code)
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.01)
    profiler.start()
    from mnist_pipeline.cli import main as pipeline_main

    code = pipeline_main(args)
    session = profiler.stop()
    wall = time.time() - t0
    parts = split(session.root_frame()) if session.root_frame() else {}
    parts = {k: round(v, 3) for k, v in parts.items()}
    parts["python"] = round(max(wall - sum(parts.values()), 0.0), 3)
    log_line(options.log, args, code, wall, parts)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `mnist-pipeline` does: no interpreter teardown


if __name__ == "__main__":
    sys.exit(main())
