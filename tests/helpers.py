"""Helpers the tests share: writers of small IDX data sets (the format `dataset.read_idx` reads),
and a server started for a test and stopped after it."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
def serving(command: list[str], *, url: str, log: Path, **popen: Any) -> Iterator[None]:
    """Run `command` (a process group of its own, output to `log`) until `url` answers; stop it,
    by its process group, when the block ends. Fails the test if it exits or is not up in time."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{command[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{url} not up in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
