"""Shared fixtures: a tiny, learnable MNIST look-alike written as real IDX files, a mirror folder
holding it gzip-compressed, and a throw-away project root with the real params shrunk to one
short epoch per variant. No test needs the network or the real data set."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_pipeline.dataset import FILES, file_md5
from tests.helpers import gzip_file, write_idx

REPO = Path(__file__).resolve().parents[1]
# Every command a test starts runs in a process of its own: a warm process (mnist_pipeline.warm)
# would outlive the test that started it. tests/test_warm.py turns it on, and ends it. A test
# that builds an environment without MNIST_* variables sets it again.
os.environ["MNIST_PIPELINE_WARM"] = "off"
# One that starts anyway (an environment built without it) does so in this folder, where the
# session's end finds it: ended by its PID, and reported.
RUNTIME = Path(tempfile.mkdtemp(prefix="mp-tests-"))  # short: a socket's path holds 107 bytes
os.environ["XDG_RUNTIME_DIR"] = str(RUNTIME)


@pytest.fixture(scope="session", autouse=True)
def no_warm_process_outlives_the_tests():
    yield
    started = sorted(RUNTIME.glob("*/*.log"))
    for log in started:  # it writes its pid once it has loaded
        pid_file = log.with_suffix(".pid")
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    shutil.rmtree(RUNTIME, ignore_errors=True)
    assert not started, f"a test started a warm process (no MNIST_PIPELINE_WARM=off): {started}"


N_TRAIN, N_TEST = 600, 200


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k lights a 6x6 patch at its own place, over noise: learnable in one epoch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 3 + (k // 5) * 12, 2 + (k % 5) * 5
        images[i, r : r + 6, c : c + 6] = 230
    return images, labels


def write_tiny_dataset(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> None:
    """The four IDX files, uncompressed, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, seed=1)
    test_x, test_y = make_images(n_test, seed=2)
    for name, array in zip(FILES, (train_x, train_y, test_x, test_y), strict=True):
        write_idx(folder / name, array)


@dataclass(frozen=True)
class Mirror:
    folder: Path  # the four .gz files
    raw: Path  # the same files, uncompressed
    checksums: Path  # JSON {file: md5}, for MNIST_CHECKSUMS_FILE


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Mirror:
    base = tmp_path_factory.mktemp("mirror")
    raw, folder = base / "raw", base / "gz"
    write_tiny_dataset(raw)
    folder.mkdir()
    for name in FILES:
        gzip_file(raw / name, folder / f"{name}.gz")
    checksums = base / "checksums.json"
    checksums.write_text(json.dumps({name: file_md5(raw / name) for name in FILES}))
    return Mirror(folder=folder, raw=raw, checksums=checksums)


@functools.cache
def committed_params_text() -> str:
    """params.yaml as committed (HEAD), never the working tree's: `dvc exp run -S ...` applies an
    experiment to the working tree, and the tests must not depend on which one ran last."""
    out = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout


def tiny_params(epochs: int = 1, val_size: int = 100) -> dict:
    """The committed params.yaml, every variant shrunk to `epochs` short epochs on CPU."""
    params = yaml.safe_load(committed_params_text())
    params["train"].update(device="cpu", val_size=val_size)
    for recipe in params["variants"].values():
        recipe["epochs"] = epochs
    return params


def tiny_project(monkeypatch, mirror: Mirror, root: Path, *, data: bool = False) -> Path:
    """A project root at `root` (params.yaml shrunk), the tiny mirror, a private MLflow store;
    with `data`, the data already under data/mnist/."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    monkeypatch.setenv("MNIST_PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MNIST_MIRROR", str(mirror.folder))
    monkeypatch.setenv("MNIST_CHECKSUMS_FILE", str(mirror.checksums))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # runs here are short
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    if data:
        shutil.copytree(mirror.raw, root / "data" / "mnist")
    return root


@pytest.fixture
def tiny_env(monkeypatch, tiny_mirror: Mirror, tmp_path: Path) -> Path:
    """A project root in tmp_path (params.yaml shrunk), the tiny mirror, a private MLflow store."""
    return tiny_project(monkeypatch, tiny_mirror, tmp_path / "project")


@pytest.fixture
def tiny_data(tiny_env: Path, tiny_mirror: Mirror) -> Path:
    """tiny_env with the data already under data/mnist/."""
    shutil.copytree(tiny_mirror.raw, tiny_env / "data" / "mnist")
    return tiny_env
