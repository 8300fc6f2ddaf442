"""The Makefile's targets as a user runs them: `make ui` says only what means something."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import REPO
from tests.helpers import free_port, serving

VENV = Path(sys.executable).parent.parent  # this test run's environment, already set up


def test_make_ui_starts_one_quiet_server(tmp_path: Path):
    port = free_port()
    command = [
        *("make", "--no-print-directory", "-s", "ui", f"VENV={VENV}"),
        *("-o", f"{VENV}/.installed"),  # never (re)install from a test
        *(f"UI_STORE=sqlite:///{tmp_path / 'mlflow.db'}", f"UI_PORT={port}"),
    ]
    log = tmp_path / "ui.log"
    with serving(command, url=f"http://127.0.0.1:{port}/health", log=log, cwd=REPO):
        pass
    out = log.read_text()
    assert "Warning" not in out, out  # no StarletteDeprecationWarning (MLflow's to fix)
    assert out.count("Started server process") == 1, out  # one worker, each line once
    assert "Registry store URI not provided" not in out, out
    assert f"http://127.0.0.1:{port}" in out, out  # the one line a user needs
