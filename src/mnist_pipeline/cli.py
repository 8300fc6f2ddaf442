"""The `mnist-pipeline` command line: one subcommand per stage, parsed here, run by `commands`.

A user mistake ends with one line on stderr and exit code 2 (bad input) or 1, never a traceback.
"""

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from mnist_pipeline import commands, signals
from mnist_pipeline.config import load_params
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.paths import PARAMS_FILE, project_root


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


VARIANT = ("--variant", {"required": True})
SWITCH = {"action": argparse.BooleanOptionalAction, "default": None}
# command -> (help, [(flag, argparse keywords)]); each option names a keyword of commands.<command>
COMMANDS = {
    "download": ("fetch and verify the data set chosen in params.yaml", []),
    "train": (
        "train one variant and record an MLflow run (a flag that changes the recipe: a one-off)",
        [
            VARIANT,
            ("--optimizer", {"help": "the recipe's optimizer (sgd, adam)"}),
            ("--lr", {"type": float, "help": "the recipe's learning rate"}),
            ("--batch-size", {"type": int, "help": "the recipe's batch size"}),
            ("--epochs", {"type": int, "help": "the recipe's epoch count"}),
            ("--shuffle", {**SWITCH, "help": "the recipe's shuffle"}),
            ("--use-dropout", {**SWITCH, "help": "the variant's dropout switch"}),
            ("--seed", {"type": int, "help": "train.seed"}),
            ("--device", {"help": "train.device (auto, cpu, cuda, mps)"}),
            ("--val-size", {"type": int, "help": "train.val_size"}),
            ("--keep", {"help": "train.keep: best (validation) or last epoch"}),
        ],
    ),
    "evaluate": (
        "score one variant's checkpoint on the test set",
        [VARIANT, ("--one-off", {"action": "store_true", "help": "the one-off's checkpoint"})],
    ),
    "export": ("the ONNX and int8 ONNX forms of one variant", [VARIANT]),
    "report": ("table and chart of every variant under reports/", []),
    "sync": (
        "make MLflow agree with the pipeline's outputs, and measure this host's figures",
        [("--verify", {"action": "store_true", "help": "look at every run, not the receipt"})],
    ),
    "compare": (
        "variant x host/device table from the tracking store",
        [
            ("--experiment", {"help": "experiment name (default: the data set's)"}),
            ("--variants", {"type": _names, "help": "comma-separated variants to keep"}),
            ("--hosts", {"type": _names, "help": "comma-separated host labels to keep"}),
            ("--exp", {"help": "a DVC experiment: its runs beside its baseline commit's"}),
            ("--all-runs", {"action": "store_true", "help": "every run, not the latest"}),
            ("--one-off", {"action": "store_true", "help": "one-offs and search trials too"}),
            ("--csv", {"type": Path, "help": "also write the table as CSV"}),
            ("--markdown", {"type": Path, "help": "also write the table as Markdown"}),
            ("--chart", {"type": Path, "help": "also write a PNG chart"}),
        ],
    ),
    "tune": (
        "search a variant's recipe on Ray Tune (params.yaml's tune: space)",
        [
            VARIANT,
            ("--samples", {"type": int, "default": 8, "help": "recipes to try (default: 8)"}),
            ("--max-concurrent", {"type": int, "help": "trials at once (default: what fits)"}),
            ("--cpus-per-trial", {"type": float, "default": 1.0, "help": "default: 1"}),
            ("--gpus-per-trial", {"type": float, "default": 0.0, "help": "default: 0"}),
            ("--address", {"help": "a Ray cluster (default: RAY_ADDRESS, else this machine)"}),
            ("--max-failures", {"type": int, "default": 2, "help": "retries of a dead node's"}),
            ("--no-early-stopping", {"action": "store_true", "help": "every trial to the end"}),
            ("--storage", {"type": Path, "help": "Tune's checkpoints (default: one-off/tune/)"}),
            ("--seed", {"type": int, "help": "the search's seed (default: train.seed)"}),
            ("--apply", {"action": "store_true", "help": "write the best recipe into params"}),
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, help="params file (default: <project>/params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, options) in COMMANDS.items():
        command = sub.add_parser(name, help=text)
        for flag, keywords in options:
            command.add_argument(flag, **keywords)
    return parser


def _environment_error(err: BaseException) -> str | None:
    """One line for an OSError or an MLflow error; None for a bug, which keeps its traceback."""
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException):
        return f"MLflow: {first_line(err, limit=300)}"
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record: in-process callers (the tests) swap it."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def entry() -> None:
    """`main()`, then `os._exit`: the interpreter's shutdown frees a stage's half a million objects
    one by one, 1.3 s to 3.4 s on 2 cores (benchmarks/README.md)."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)  # let the interpreter wait for them
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`)
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    handler = _StderrHandler()  # basicConfig runs once per process
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=os.environ.get("MNIST_PIPELINE_LOG", "WARNING"), handlers=[handler])
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's INFO lines drown ours
    if "MNIST_PIPELINE_LOG" not in os.environ:
        # A server that goes away: the pipeline says so in one line, not MLflow's many warnings.
        for name in ("urllib3.connectionpool", "mlflow.system_metrics", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)

    def say(text: str) -> None:  # always one line
        print(f"mnist-pipeline {args.command}: " + " ".join(text.splitlines()), file=sys.stderr)

    try:
        root = project_root()
        params_file = args.params or root / PARAMS_FILE
        options = {k: v for k, v in vars(args).items() if k not in ("command", "params")}
        if args.command == "tune":
            options["params_file"] = params_file  # where --apply writes
        getattr(commands, args.command)(load_params(params_file), root, **options)
        return 0
    except PipelineError as err:
        say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted; nothing was saved")
        return 130
    except signals.Terminated:
        say("terminated; nothing was saved")
        return 143
    except BaseException as err:
        line = _environment_error(err)
        if line is None:
            raise
        logging.getLogger(__name__).debug("details", exc_info=True)  # MNIST_PIPELINE_LOG=DEBUG
        say(f"error: {line} (MNIST_PIPELINE_LOG=DEBUG shows the details)")
        return 1
