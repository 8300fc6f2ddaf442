"""The real pipeline: `dvc repro` in a temporary git repository holding a copy of the project,
on the tiny data set served as a mirror, every variant shrunk to one short epoch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from mnist_pipeline.models import VARIANTS
from tests.conftest import REPO, tiny_params

DVC = str(Path(sys.executable).with_name("dvc"))


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_mirror):
    """A git + DVC repository with the project copied in, after one full `dvc repro`."""
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(
        REPO / "src", repo / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_", "DVC_"))}
    env |= {
        "MNIST_MIRROR": str(tiny_mirror.folder),
        "MNIST_CHECKSUMS_FILE": str(tiny_mirror.checksums),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    sh(["git", "init", "-q"], repo, env)
    sh([DVC, "init", "-q"], repo, env)
    sh([DVC, "config", "core.analytics", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "project"], repo, env)
    first = sh([DVC, "repro"], repo, env)
    return repo, env, first


def test_all_stages_run(pipeline):
    repo, _, first = pipeline
    expected = ["download"]
    expected += [f"train@{v}" for v in VARIANTS] + [f"evaluate@{v}" for v in VARIANTS]
    assert sorted(ran_stages(first)) == sorted([*expected, "report"])
    for variant in VARIANTS:
        assert (repo / "models" / variant / "model.pt").is_file()
        assert (repo / "plots" / "train" / f"{variant}.csv").is_file()
        assert (repo / "plots" / "predictions" / f"{variant}.csv").is_file()
        test = json.loads((repo / "metrics" / "test" / f"{variant}.json").read_text())
        assert 0 <= test["test/accuracy"] <= 1
    assert (repo / "reports" / "results.md").read_text().count("|") > 9 * 10
    assert (repo / "reports" / "results.png").stat().st_size > 10_000


def test_one_run_per_variant_with_test_metrics(pipeline):
    repo, _, _ = pipeline
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(VARIANTS)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test/accuracy" in run.data.metrics
        assert run.data.tags["dvc.stage"] == f"train@{run.data.tags['variant']}"
        artifacts = {
            a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")
        }
        assert "evaluation/confusion_matrix.png" in artifacts
        assert "evaluation/misclassified.png" in artifacts


def test_metrics_and_plots_show(pipeline):
    repo, env, _ = pipeline
    shown = json.loads(sh([DVC, "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    for variant in VARIANTS:
        assert f"metrics/test/{variant}.json" in files
        assert f"metrics/train/{variant}.json" in files
    sh([DVC, "plots", "show", "-o", str(repo / "dvc_plots")], repo, env)
    html = (repo / "dvc_plots" / "index.html").read_text()
    # one curve chart and one confusion matrix per variant, nothing else
    assert html.count("vegaEmbed(") == 2 * len(VARIANTS)
    assert "Confusion matrix (test set)" in html and "Loss and accuracy per epoch" in html


def test_second_repro_does_nothing_and_one_change_reruns_one_variant(pipeline):
    repo, env, _ = pipeline
    second = sh([DVC, "repro"], repo, env)
    assert ran_stages(second) == []
    assert "up to date" in second.lower()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["variants"]["ffn1_tanh"]["lr"] = 0.05
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh([DVC, "repro"], repo, env)
    assert sorted(ran_stages(third)) == ["evaluate@ffn1_tanh", "report", "train@ffn1_tanh"]
