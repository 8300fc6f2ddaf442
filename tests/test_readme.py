"""README snippets run as written, from where a user may be: the registry example from `src/`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mnist_pipeline.cli import main
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def bash_block_with(text: str) -> str:
    """The README's ```bash block that contains `text`."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL) if text in b]
    assert len(blocks) == 1, f"{len(blocks)} bash blocks in README.md contain {text!r}"
    return blocks[0]


def test_the_registry_snippet_works_from_src(tiny_data: Path):
    """A champion in the project's store; the README's block, run from `src/` with no tracking
    URI of the user's, loads it and predicts, and leaves no stray store in `src/`."""
    root = tiny_data
    assert main(["train", "--variant", "mlp512_relu"]) == 0
    assert main(["evaluate", "--variant", "mlp512_relu"]) == 0
    assert main(["sync"]) == 0  # records the evaluation: registers the champion
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # a checkout, as a user's is
    (root / "src").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_"))}
    env["MNIST_PIPELINE_WARM"] = "off"  # no warm process outlives a test (conftest.py)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    snippet = bash_block_with('load_model("models:/mnist-mlp512_relu@champion")')
    out = subprocess.run(
        ["bash", "-euc", snippet],
        cwd=root / "src",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 10)"
    assert sorted(p.name for p in (root / "src").iterdir()) == []  # no mlflow.db, no mlruns/
