"""`mnist-pipeline`: the command line, one subcommand per pipeline stage (dvc.yaml and MLproject
call these), parsed here and run by `commands` (DVC's split: `dvc/commands/` over `dvc/repo/`).

    mnist-pipeline download
    mnist-pipeline train --variant ffn1_relu                  # the params.yaml recipe (DVC's)
    mnist-pipeline train --variant ffn1_relu --epochs 1 --lr 0.05   # a one-off: one-off/<variant>/
    mnist-pipeline evaluate --variant ffn1_relu [--one-off]
    mnist-pipeline export --variant ffn1_relu
    mnist-pipeline report
    mnist-pipeline sync                                       # MLflow agrees with the outputs
    mnist-pipeline compare [--variants a,b] [--hosts h1,h2] [--exp NAME] [--csv out.csv]
    mnist-pipeline tune --variant ffn1_relu --samples 16 [--address HOST:PORT] [--apply]

A user mistake ends with one line on stderr and a non-zero exit (2: bad input, 1: failure),
never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from mnist_pipeline import commands, signals
from mnist_pipeline.config import Recipe, TrainConfig, load_params
from mnist_pipeline.errors import ConfigError, PipelineError, first_line
from mnist_pipeline.paths import PARAMS_FILE, project_root

# `tune`'s options, as `commands.tune` passes them to `tune.TuneOptions` (the flags below).
TUNE_OPTIONS = (
    "samples",
    "max_concurrent",
    "cpus_per_trial",
    "gpus_per_trial",
    "address",
    "max_failures",
    "storage",
    "seed",
)


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--params", type=Path, default=None, help="params file (default: <project>/params.yaml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    download = sub.add_parser(
        "download", help="fetch and verify the data set chosen in params.yaml"
    )
    download.set_defaults(handler=_download)

    train = sub.add_parser("train", help="train one variant and record an MLflow run")
    train.add_argument("--variant", required=True)
    train.add_argument("--optimizer", help="override the recipe's optimizer (sgd, adam)")
    train.add_argument("--lr", type=float, help="override the recipe's learning rate")
    train.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    train.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    _bool_flag(train, "shuffle", "override the recipe's shuffle")
    _bool_flag(train, "use-dropout", "override the variant's dropout switch")
    train.add_argument("--seed", type=int, help="override train.seed")
    train.add_argument("--device", help="override train.device (auto, cpu, cuda, mps)")
    train.add_argument("--val-size", type=int, help="override train.val_size")
    train.add_argument("--keep", help="override train.keep: best (validation) or last epoch")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("evaluate", help="score one variant's checkpoint on the test set")
    evaluate.add_argument("--variant", required=True)
    evaluate.add_argument(
        "--one-off",
        action="store_true",
        help="score the one-off training's checkpoint (one-off/<variant>/), not the pipeline's",
    )
    evaluate.set_defaults(handler=_evaluate)

    export = sub.add_parser("export", help="ONNX and int8 ONNX forms of one variant, measured")
    export.add_argument("--variant", required=True)
    export.set_defaults(handler=_export)

    sub.add_parser("report", help="table and chart of every variant under reports/").set_defaults(
        handler=_report
    )

    sync = sub.add_parser(
        "sync", help="make the MLflow store agree with the pipeline's outputs (a dvc.yaml stage)"
    )
    sync.add_argument(
        "--verify", action="store_true", help="look at every run, not the last sync's receipt"
    )
    sync.set_defaults(handler=_sync)
    _add_compare(sub)
    _add_tune(sub)
    return parser


def _add_tune(sub) -> None:
    tune = sub.add_parser(
        "tune", help="search a variant's recipe on Ray Tune (params.yaml's tune: space)"
    )
    tune.add_argument("--variant", required=True)
    tune.add_argument("--samples", type=int, default=8, help="recipes to try (default: 8)")
    tune.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    tune.add_argument("--cpus-per-trial", type=float, default=1.0, help="default: 1")
    tune.add_argument("--gpus-per-trial", type=float, default=0.0, help="default: 0")
    tune.add_argument(
        "--address", help="a Ray cluster to join (default: RAY_ADDRESS, else Ray on this machine)"
    )
    tune.add_argument(
        "--max-failures", type=int, default=2, help="retries of a trial whose node died"
    )
    tune.add_argument(
        "--no-early-stopping", action="store_true", help="run every trial to its last epoch"
    )
    tune.add_argument(
        "--storage",
        type=Path,
        help="Tune's checkpoints (default: one-off/tune/; a cluster: shared)",
    )
    tune.add_argument("--seed", type=int, help="the search's seed (default: train.seed)")
    tune.add_argument("--apply", action="store_true", help="write the best recipe into params.yaml")
    tune.set_defaults(handler=_tune)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="variant x host/device table from the tracking store")
    compare.add_argument(
        "--experiment", help="experiment name (default: the params.yaml data set's)"
    )
    compare.add_argument("--variants", type=_names, help="comma-separated variant names to keep")
    compare.add_argument("--hosts", type=_names, help="comma-separated host labels to keep")
    compare.add_argument(
        "--exp", help="a DVC experiment's name: its runs beside its baseline commit's"
    )
    compare.add_argument(
        "--all-runs", action="store_true", help="every run, not the latest per group"
    )
    compare.add_argument(
        "--one-off", action="store_true", help="include one-off runs (recipes not in params.yaml)"
    )
    compare.add_argument("--csv", type=Path, help="also write the table as CSV")
    compare.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    compare.add_argument("--chart", type=Path, help="also write a PNG chart")
    compare.set_defaults(handler=_compare)


# --- one handler per command: parsed arguments in, a call of `commands` out ------------------


def _download(params, root: Path, args: argparse.Namespace) -> None:
    commands.download(params, root)


def _train(params, root: Path, args: argparse.Namespace) -> None:
    flags = _fields(Recipe) | _fields(TrainConfig)
    overrides = {name: value for name, value in vars(args).items() if name in flags}
    commands.train(params, args.variant, root, overrides)


def _evaluate(params, root: Path, args: argparse.Namespace) -> None:
    commands.evaluate(params, args.variant, root, one_off=args.one_off)


def _export(params, root: Path, args: argparse.Namespace) -> None:
    commands.export(params, args.variant, root)


def _report(params, root: Path, args: argparse.Namespace) -> None:
    commands.report(params, root)


def _sync(params, root: Path, args: argparse.Namespace) -> None:
    commands.sync(params, root, verify=args.verify)


def _compare(params, root: Path, args: argparse.Namespace) -> None:
    commands.compare(
        params,
        root,
        experiment=args.experiment,
        variants=args.variants,
        hosts=args.hosts,
        dvc_exp=args.exp,
        latest_only=not args.all_runs,
        one_off=args.one_off,
        csv_path=args.csv,
        markdown_path=args.markdown,
        chart_path=args.chart,
    )


def _tune(params, root: Path, args: argparse.Namespace) -> None:
    for flag, least in {"samples": 1, "max_concurrent": 1, "max_failures": 0}.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be at least {least}, got {value}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise ConfigError("--cpus-per-trial must be above 0 and --gpus-per-trial at least 0")
    options = {name: getattr(args, name) for name in TUNE_OPTIONS}
    options["early_stopping"] = not args.no_early_stopping
    target = (args.params or root / PARAMS_FILE) if args.apply else None
    commands.tune(params, args.variant, root, options, apply=target)


def _fields(model) -> set[str]:
    return set(getattr(model, "model_fields", None) or model.__dataclass_fields__)


def run(args: argparse.Namespace) -> int:
    root = project_root()
    params = load_params(args.params or root / PARAMS_FILE)
    args.handler(params, root, args)
    return 0


def _environment_error(err: BaseException) -> str | None:
    """One line for a failure of the machine or a service rather than of this code: an OSError
    (disk full, permission denied) or an MLflow error (the tracking store). None for anything
    else: a bug, which keeps its traceback."""
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException):
        return f"MLflow: {first_line(err, limit=300)}"
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not when main() first ran
    (logging.basicConfig configures once per process; in-process callers swap sys.stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def entry() -> None:
    """The `mnist-pipeline` command (and `python -m mnist_pipeline`): `main()`, then a quick exit.

    A stage process has imported torch, MLflow, SQLAlchemy and pandas (ONNX too for export):
    about half a million Python objects. The interpreter's own shutdown frees them one by one,
    1.3 s to 3.4 s per stage on a 2-core machine (benchmarks/README.md), with nothing left to
    save. So once `main()` has returned, and no non-daemon thread is still working, the exit
    handlers run (MLflow's included), the streams are flushed, and the process ends there.
    An uncaught exception (a bug) takes the normal exit and keeps its traceback.
    """
    code = main()
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        sys.exit(code)  # let the interpreter wait for them
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe (`| head`): nothing more can be written
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=os.environ.get("MNIST_PIPELINE_LOG", "WARNING"), handlers=[handler])
    # MLflow's INFO lines (database set-up, system-metrics start/stop) drown the epoch lines.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "MNIST_PIPELINE_LOG" not in os.environ:
        # A tracking server that goes away: MLflow's HTTP retries and its system-metrics thread
        # would each print warnings; the pipeline says what happened in a line of its own.
        for name in ("urllib3.connectionpool", "mlflow.system_metrics", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)

    def say(text: str) -> None:  # always one line
        print(f"mnist-pipeline {args.command}: " + " ".join(text.splitlines()), file=sys.stderr)

    try:
        return run(args)
    except PipelineError as err:
        say(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted; nothing was saved")
        return 130
    except BaseException as err:
        if isinstance(err, signals.Terminated):
            say("terminated; nothing was saved")
            return 143
        line = _environment_error(err)
        if line is None:
            raise
        logging.getLogger(__name__).debug("details", exc_info=True)  # MNIST_PIPELINE_LOG=DEBUG
        say(f"error: {line} (MNIST_PIPELINE_LOG=DEBUG shows the details)")
        return 1
