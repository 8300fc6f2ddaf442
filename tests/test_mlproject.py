"""The MLproject: parsed by MLflow's own loader, its commands are the ones dvc.yaml calls, and a
real `mlflow run` of one short training leaves a parent run with one child."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.projects._project_spec import load_project
from mlflow.utils.environment import _PythonEnv

from mnist_pipeline.cli import build_parser, main
from tests.conftest import REPO, Mirror, tiny_params

ENTRY_POINTS = {"main", "download", "train", "evaluate", "tune"}
# `mlflow run -e train -P <name>=<value>` -> the `mnist-pipeline train` flag it sets, a sample value
TRAIN_OVERRIDES = {
    "epochs": ("--epochs", "1"),
    "lr": ("--lr", "0.05"),
    "batch-size": ("--batch-size", "32"),
    "optimizer": ("--optimizer", "adam"),
    "seed": ("--seed", "3"),
    "device": ("--device", "cpu"),
    "val-size": ("--val-size", "0"),
    "keep": ("--keep", "last"),
}


@pytest.fixture(scope="module")
def project():
    return load_project(str(REPO))


def argv(project, entry_point: str, parameters: dict[str, str]) -> list[str]:
    """The arguments MLflow's computed command passes to `mnist-pipeline`, as bash parses them."""
    command = project.get_entry_point(entry_point).compute_command(parameters, None)
    stub = 'mnist-pipeline() { printf "%s\\0" "$@"; }; '  # a function shadows the real command
    out = subprocess.run(["bash", "-c", stub + command], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\0")[:-1]


def dvc_command(stage: str, key: str) -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmd = stages[stage]["do"]["cmd"] if "do" in stages[stage] else stages[stage]["cmd"]
    return shlex.split(cmd.replace("${key}", key))[1:]  # without the program name


def test_project_parses_with_its_python_env(project):
    assert project.name == "mnist-pipeline"
    assert set(project._entry_points) == ENTRY_POINTS
    env = _PythonEnv.from_yaml(project.env_config_path)
    assert env.python and "." in env.dependencies


def test_fixed_commands(project):
    compute = lambda name, **p: project.get_entry_point(name).compute_command(p, None)  # noqa: E731
    assert compute("main") == "dvc repro"
    assert compute("download") == "mnist-pipeline download"
    assert compute("evaluate", variant="ffn1_relu") == (
        "mnist-pipeline evaluate --variant ffn1_relu && mnist-pipeline sync"
    )
    assert argv(project, "download", {}) == dvc_command("download", "")
    # dvc.yaml's evaluate, then its record: what `dvc repro` does with its sync stage
    assert argv(project, "evaluate", {"variant": "mlp512_relu"}) == [
        *dvc_command("evaluate", "mlp512_relu"),
        *dvc_command("sync", ""),
    ]


def test_train_without_overrides_is_dvcs_command(project):
    """No override given, none passed: params.yaml's values hold."""
    assert argv(project, "train", {"variant": "ffn1_relu"}) == dvc_command("train", "ffn1_relu")


def test_train_overrides_become_cli_flags(project):
    given = {name: value for name, (_, value) in TRAIN_OVERRIDES.items()}
    args = argv(project, "train", {"variant": "mlp_relu_dropout", **given})
    expected = ["train", "--variant", "mlp_relu_dropout"]
    for flag, value in TRAIN_OVERRIDES.values():
        expected += [flag, value]
    assert args == expected
    parsed = build_parser().parse_args(args)
    assert (parsed.epochs, parsed.lr, parsed.batch_size, parsed.val_size) == (1, 0.05, 32, 0)

    one = argv(project, "train", {"variant": "ffn1_relu", "lr": "0.01"})
    assert one == ["train", "--variant", "ffn1_relu", "--lr", "0.01"]


def test_every_train_value_flag_can_be_given_and_only_given_ones_are_recorded(project):
    """A value flag of `mnist-pipeline train` is an MLproject parameter by its own name, and
    MLflow records only the parameters given: no optional one with an empty default."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = commands.choices["train"]
    # Flags that take a value. The on/off switches (--shuffle/--no-shuffle, nargs=0) are set in
    # params.yaml.
    flags = {a.option_strings[0] for a in train._actions if a.option_strings and a.nargs is None}
    assert flags - {"--variant"} == {flag for flag, _ in TRAIN_OVERRIDES.values()}
    assert {f"--{name}" for name in TRAIN_OVERRIDES} == flags - {"--variant"}
    entry_point = project.get_entry_point("train")
    assert set(entry_point.parameters) == {"variant"}  # nothing with a default to record as ''
    recorded, extra = entry_point.compute_parameters({"variant": "ffn1_relu", "lr": "0.01"}, None)
    assert recorded | extra == {"variant": "ffn1_relu", "lr": "0.01"}


def test_tune_entry_point_passes_the_flags(project):
    from mnist_pipeline.cli import build_parser

    assert argv(project, "tune", {"variant": "ffn1_relu"}) == [
        *("tune", "--variant", "ffn1_relu", "--samples", "8"),
        *("--cpus-per-trial", "1", "--gpus-per-trial", "0"),
    ]
    given = {"variant": "ffn1_relu", "samples": "16", "address": "head:6379", "apply": "1"}
    args = argv(project, "tune", {**given, "max_concurrent": "2", "gpus_per_trial": "0.5"})
    parsed = build_parser().parse_args(args)
    assert (parsed.samples, parsed.max_concurrent, parsed.gpus_per_trial) == (16, 2, 0.5)
    assert parsed.address == "head:6379" and parsed.apply


def test_a_value_cannot_inject_shell(project):
    args = argv(project, "train", {"variant": "ffn1_relu", "optimizer": "adam; echo pwned"})
    assert args[-2:] == ["--optimizer", "adam; echo pwned"]


# --- a real `mlflow run` ------------------------------------------------------------------------


def mlflow_env(root: Path, mirror: Mirror) -> dict[str, str]:
    """The environment `mlflow run` gets: this venv's commands first, a private tracking store,
    the tiny data's checksums; no MNIST_PIPELINE_ROOT, so the project is found from the cwd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_"))}
    env["MNIST_PIPELINE_WARM"] = "off"  # no warm process outlives a test (conftest.py)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env["MNIST_CHECKSUMS_FILE"] = str(mirror.checksums)
    env["MNIST_MIRROR"] = str(mirror.folder)
    env["MNIST_PIPELINE_HOST"] = "mlflow-run-test"
    return env


def copy_project(root: Path, variants: list[str] | None = None) -> None:
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(REPO / name, root / name)
    params = tiny_params()
    if variants:
        params["variants"] = {k: v for k, v in params["variants"].items() if k in variants}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def family(root: Path, experiment: str) -> tuple[mlflow.entities.Run, list]:
    """The project run `mlflow run` made and the runs recorded as its children."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.project.entryPoint" in r.data.tags]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_mlflow_run_train_makes_a_child_run(tiny_data: Path, tiny_mirror: Mirror):
    root = tiny_data
    copy_project(root)
    experiment = "mnist-pipeline-mnist"
    command = [
        *("mlflow", "run", str(root), "--env-manager", "local", "-e", "train"),
        *("--experiment-name", experiment, "--run-name", "ffn1_relu, 1 epoch"),
        *("-P", "variant=ffn1_relu", "-P", "epochs=1"),
    ]
    env = mlflow_env(root, tiny_mirror)
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    parent, children = family(root, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "ffn1_relu, 1 epoch"  # the README's --run-name, not a random one
    assert parent.data.params == {"variant": "ffn1_relu", "epochs": "1"}  # what was given: no ''
    assert [c.data.tags["variant"] for c in children] == ["ffn1_relu"]
    child = children[0]
    assert child.info.status == "FINISHED"
    assert child.info.experiment_id == parent.info.experiment_id
    assert child.data.params["epochs"] == "1"  # the override
    assert child.data.params["lr"] == "0.1"  # params.yaml's value, kept
    assert child.data.tags["host"] == "mlflow-run-test"
    assert (root / "models" / "ffn1_relu" / "model.pt").is_file()


@pytest.mark.slow
def test_mlflow_run_main_runs_the_pipeline(tmp_path: Path, tiny_mirror: Mirror):
    """`mlflow run .` = `dvc repro` in a fresh git + DVC repo: one child run per variant, each
    evaluated into its own run."""
    root = tmp_path / "project"
    root.mkdir()
    variants = ["logistic_regression", "ffn1_relu"]
    copy_project(root, variants)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = mlflow_env(root, tiny_mirror)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, timeout=120)

    experiment = "mnist-pipeline-mnist"
    command = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", experiment]
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    parent, children = family(root, experiment)
    assert parent.data.tags["mlflow.project.entryPoint"] == "main"
    assert sorted(c.data.tags["variant"] for c in children) == sorted(variants)
    for child in children:
        assert "test/accuracy" in child.data.metrics  # evaluate logged into the child
    assert (root / "reports" / "results.md").is_file()


def test_mlflow_run_evaluate_records_a_child_not_the_parent(
    tiny_data: Path, tiny_mirror: Mirror, monkeypatch
):
    """A checkpoint whose training run is not in the store: under `mlflow run -e evaluate` the run
    rebuilt for it is a child of the project's run; the project's run is not resumed."""
    root = tiny_data
    copy_project(root)
    env = mlflow_env(root, tiny_mirror)
    # The checkpoint, trained in this process (no second process's start-up) into another store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'elsewhere.db'}")
    assert main(["train", "--variant", "ffn1_relu"]) == 0

    experiment = "mnist-pipeline-mnist"
    command = [
        *("mlflow", "run", str(root), "--env-manager", "local", "-e", "evaluate"),
        *("--experiment-name", experiment, "-P", "variant=ffn1_relu"),
    ]
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    parent, children = family(root, experiment)
    assert "checkpoint.md5" not in parent.data.tags and "test/accuracy" not in parent.data.metrics
    (child,) = children
    assert child.data.tags["record.source"] == "outputs" and child.info.status == "FINISHED"
    assert "test/accuracy" in child.data.metrics and "checkpoint.md5" in child.data.tags
