"""The warm process (mnist_pipeline.warm): a stage command run in a fork of it writes what a
process of its own writes, says what it says, exits as it exits, takes Ctrl-C and SIGTERM the
same way, and runs the code on disk. The warm process is real: the first command starts it, as a
user's first `dvc repro` stage does; the test ends it by the PID it wrote."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mnist_pipeline import paths, warm
from tests.helpers import one_line

VARIANT = "ffn1_relu"
CLI = str(Path(sys.executable).with_name("mnist-pipeline"))
WARM_START_S = 300  # importing torch, MLflow and ONNX Runtime on a busy 2-core machine


def _run(argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *argv], env=env, cwd=cwd, capture_output=True, text=True)


def _served(result: subprocess.CompletedProcess) -> bool:
    """Whether the command ran in a fork of the warm process (MNIST_PIPELINE_LOG=DEBUG says so)."""
    return "a fork of the warm one" in result.stderr


def _wait_for_socket(folder: Path) -> int:
    """The PID of the warm process once it listens (it binds its socket after loading)."""
    deadline = time.monotonic() + WARM_START_S
    while time.monotonic() < deadline and not _died(folder):
        if list(folder.glob("*.sock")) and list(folder.glob("*.pid")):
            return int(next(folder.glob("*.pid")).read_text())
        time.sleep(0.5)
    logs = {p.name: p.read_text()[-2000:] for p in folder.glob("*.log")}
    pytest.fail(f"no warm process listened within {WARM_START_S} s; its log: {logs}")


def _died(folder: Path) -> bool:
    """It wrote to its log and no longer holds its lock: it ended before listening."""
    for log in folder.glob("*.log"):
        if log.read_text().strip():
            with log.with_suffix(".lock").open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except OSError:
                    pass
    return False


def _end(pid: int) -> None:
    """End the warm process this test started (not our child: wait for it to go)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def warm_env(tiny_data: Path, tmp_path: Path):
    """The tiny project, a copy of the code on PYTHONPATH (to edit), warm processes allowed."""
    code = tmp_path / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(Path(warm.__file__).parents[1], code, ignore=ignore)
    runtime = Path(tempfile.mkdtemp(prefix="mp-"))  # short: a socket's path holds 107 bytes
    env = dict(os.environ, MNIST_PIPELINE_WARM="120", XDG_RUNTIME_DIR=str(runtime))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    folder = runtime / f"mnist-pipeline-{os.getuid()}"
    started: list[int] = []
    yield tiny_data, env, code, folder, started
    for pid in started:
        _end(pid)
    shutil.rmtree(runtime, ignore_errors=True)


def test_a_stage_in_the_warm_process_is_the_same_command(warm_env):
    root, env, code, folder, started = warm_env
    debug = dict(env, MNIST_PIPELINE_LOG="DEBUG")
    checkpoint = paths.pipeline_outputs(root, VARIANT).checkpoint
    test_metrics = paths.pipeline_outputs(root, VARIANT).test_metrics

    # The first command runs in a process of its own and starts the warm process.
    here = _run(["train", "--variant", VARIANT], debug, root)
    assert here.returncode == 0, here.stderr
    assert not _served(here)
    started.append(_wait_for_socket(folder))
    assert _run(["evaluate", "--variant", VARIANT], env, root).returncode == 0
    alone = {p: p.read_bytes() for p in (checkpoint, test_metrics)}

    # The same commands again, each in a fork of it: the same bytes, the same lines.
    checkpoint.unlink()
    test_metrics.unlink()
    there = _run(["train", "--variant", VARIANT], debug, root)
    assert there.returncode == 0, there.stderr
    assert _served(there)
    assert there.stdout.splitlines()[-1].startswith(f"{VARIANT}: MLflow run ")
    evaluated = _run(["evaluate", "--variant", VARIANT], debug, root)
    assert evaluated.returncode == 0 and _served(evaluated), evaluated.stderr
    assert {p: p.read_bytes() for p in (checkpoint, test_metrics)} == alone

    # Bad input: the same one line and exit code 2.
    bad = _run(["train", "--variant", "no_such_variant"], env, root)
    assert bad.returncode == 2
    assert "no_such_variant" in one_line(bad.stderr)

    # The code on disk, not the code the warm process saw when it started.
    report = code / "mnist_pipeline" / "report.py"
    report.write_text(report.read_text() + '\nprint("edited after the warm process started")\n')
    edited = _run(["report"], debug, root)  # on one variant of nine: it says so, exit 1
    assert _served(edited)
    assert "edited after the warm process started" in edited.stdout
    assert edited.returncode == 1
    assert "no results for" in edited.stderr.strip().splitlines()[-1]


def test_a_signal_reaches_the_command_in_the_warm_process(warm_env):
    root, env, _, folder, started = warm_env
    assert _run(["train", "--variant", VARIANT], env, root).returncode == 0  # starts it
    started.append(_wait_for_socket(folder))
    checkpoint = paths.pipeline_outputs(root, VARIANT).checkpoint
    one_epoch = checkpoint.read_bytes()
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 1\n", "epochs: 1000\n"))
    debug = dict(env, MNIST_PIPELINE_LOG="DEBUG")
    proc = subprocess.Popen(
        [CLI, "train", "--variant", VARIANT],
        env=debug,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if f"{VARIANT} epoch 1/1000" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert "a fork of the warm one" in err
    assert err.strip().splitlines()[-1] == "mnist-pipeline train: terminated; nothing was saved"
    assert checkpoint.read_bytes() == one_epoch  # nothing saved over it


def test_what_decides_where_a_command_runs(monkeypatch, tmp_path):
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    assert warm.key(base) == warm.key(base | {"DVC_STAGE": "train@x", "MNIST_MIRROR": "/m"})
    assert warm.key(base) != warm.key(base | {"OMP_NUM_THREADS": "1"})  # read when torch loads
    assert warm.idle_seconds({}) == warm.DEFAULT_IDLE_S
    assert warm.idle_seconds({"MNIST_PIPELINE_WARM": "off"}) is None
    assert warm.idle_seconds({"MNIST_PIPELINE_WARM": "30"}) == 30
    with pytest.raises(ValueError, match="MNIST_PIPELINE_WARM='soon'"):
        warm.idle_seconds({"MNIST_PIPELINE_WARM": "soon"})
    monkeypatch.setenv("MNIST_PIPELINE_WARM", "soon")
    assert warm.delegate(["train", "--variant", VARIANT]) == 2  # the one-line error, exit 2
    monkeypatch.setenv("MNIST_PIPELINE_WARM", "60")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    # Commands that run where they are called: nothing is started for them.
    for argv in (["compare"], ["tune", "--variant", VARIANT], ["--help"], []):
        assert warm.delegate(argv) is None
    assert not (tmp_path / f"mnist-pipeline-{os.getuid()}").exists()
