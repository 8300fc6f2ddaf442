"""Helpers the tests share: writers of small IDX data sets (the format `dataset.read_idx` reads),
and a server started for a test and stopped after it."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnist_pipeline.dataset import IDX_UBYTE


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with path.open("wb") as f:
        f.write(header)
        f.write(array.tobytes())


def gzip_file(src: Path, dst: Path) -> None:
    with src.open("rb") as f_in, gzip.open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)


# --- servers a test starts on 127.0.0.1 ----------------------------------------------------------

STARTUP_TIMEOUT_S = 120  # MLflow's server imports a lot; a busy CI machine takes its time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(
    command: list[str], *, url: str, log: Path, timeout_s: float = STARTUP_TIMEOUT_S, **popen: Any
) -> Iterator[subprocess.Popen]:
    """Run `command` (a process group of its own, output to `log`) until `url` answers; stop it,
    by its process group, when the block ends (unless the test already did). Fails the test if it
    exits or is not up in time."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{command[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{url} not up in {timeout_s}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield proc
    finally:
        with suppress(ProcessLookupError):  # the test may have ended it itself
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the CLI, in-process -------------------------------------------------------------------------


def one_line(err: str) -> str:
    """The single line the user sees; fails on a traceback or on more than one line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mnist-pipeline "), err
    return lines[0]


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return the exit code and its stderr."""
    from mnist_pipeline.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def stop_system_metrics() -> None:
    """A run whose end could not be recorded leaves MLflow's system-metrics thread running; the
    CLI's process exits, a test's process does not."""
    from mlflow.tracking import fluent

    for monitor in list(getattr(fluent, "run_id_to_system_metrics_monitor", {}).values()):
        monitor.finish()
    getattr(fluent, "run_id_to_system_metrics_monitor", {}).clear()


# --- a project in a git + DVC repository ---------------------------------------------------------

DVC = str(Path(sys.executable).with_name("dvc"))
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


def sh(cmd: list[str], cwd: Path, env: dict | None = None, *, stderr: bool = True) -> str:
    """Run `cmd`; its output (and its stderr, unless told not), or the test fails with both."""
    env = env or {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + (proc.stderr if stderr else "")


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` printed it ran."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def up_to_date(status: str) -> bool:
    """`dvc status` found nothing to do but the `sync` stage, which DVC always runs."""
    return status.split() in (
        ["Data", "and", "pipelines", "are", "up", "to", "date."],
        ["sync:", "always", "changed"],
    )


def project_repo(repo: Path, params: dict, env: dict) -> None:
    """The project's pipeline (dvc.yaml, its code and chart templates) and `params` in a new git +
    DVC repository at `repo` (not committed: the caller adds what it needs first)."""
    import yaml

    from tests.conftest import REPO

    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    ignored = shutil.ignore_patterns("*.egg-info", "__pycache__")
    shutil.copytree(REPO / "src", repo / "src", ignore=ignored)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], repo, env)
    sh([DVC, "init", "-q"], repo, env)
    sh([DVC, "config", "core.analytics", "false"], repo, env)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")  # the charts' templates


# --- a training, as the `train` command makes it -------------------------------------------------


@dataclass(frozen=True)
class Trained:
    run_id: str
    model_id: str


def train(params, variant: str, root: Path, **overrides) -> Trained:
    """`mnist-pipeline train` in-process: the run's id and its (PyTorch) logged model's."""
    import mlflow

    from mnist_pipeline import commands

    run_id = commands.train(params, root, variant, **overrides)
    run = mlflow.MlflowClient().get_run(run_id)
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    return Trained(run_id, model.model_id)
