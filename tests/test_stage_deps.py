"""dvc.yaml is honest: each stage lists every project module that can change its outputs.

The imports of each stage's command are walked inside the package: the `cli.py` handler its
command runs, then every module that one imports, and so on. A module missing from the stage's
deps would let an edit leave stale outputs while `dvc status` says all is well. Modules that only
write to MLflow are not followed (`MLFLOW_ONLY`): editing a tag must not retrain nine models.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "src" / "mnist_pipeline"
# What these modules write goes to the MLflow store only, never to a DVC output.
MLFLOW_ONLY = {"tracking.py", "record.py", "registry.py"}
# No logic: the package's docstring and version, and `python -m`.
IGNORED = {"__init__.py", "__main__.py"}


def package_imports(node: ast.AST) -> set[str]:
    """The package modules `node` imports, anywhere in it (lazy imports included)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.module:
            if child.module == "mnist_pipeline":
                found |= {f"{alias.name}.py" for alias in child.names}
            elif child.module.startswith("mnist_pipeline."):
                found.add(child.module.split(".")[1] + ".py")
        elif isinstance(child, ast.Import):
            found |= {
                a.name.split(".")[1] + ".py" for a in child.names if a.name.startswith("mnist_")
            }
    return {name for name in found if (PACKAGE / name).is_file()}


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), set(start)
    while todo:
        name = todo.pop()
        if name in seen or name in IGNORED:
            continue
        seen.add(name)
        if name not in MLFLOW_ONLY:
            todo |= package_imports(ast.parse((PACKAGE / name).read_text()))
    return seen - IGNORED


def command_modules(command: str) -> set[str]:
    """What `mnist-pipeline <command>` runs: cli.py's own imports, `run()`, and the handler."""
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {f.name: f for f in cli.body if isinstance(f, ast.FunctionDef)}
    top = {n for n in cli.body if isinstance(n, ast.Import | ast.ImportFrom)}
    start = package_imports(functions["run"]) | package_imports(functions[f"_{command}"])
    for node in top:
        start |= package_imports(node)
    return {"cli.py"} | closure(start)  # cli.py itself: only the handler's part of it runs


def stages() -> list:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        command = re.match(r"mnist-pipeline (\w+)", body["cmd"])[1]
        deps = {Path(d).name for d in body.get("deps", []) if d.startswith("src/mnist_pipeline/")}
        out.append(pytest.param(command, deps, id=name))
    return out


@pytest.mark.parametrize(("command", "deps"), stages())
def test_each_stage_lists_every_module_that_can_change_its_outputs(command, deps):
    needed = command_modules(command) - MLFLOW_ONLY
    missing = sorted(needed - deps)
    assert not missing, f"add to this stage's deps in dvc.yaml: {missing}"


@pytest.mark.parametrize(("command", "deps"), stages())
def test_no_stage_lists_a_module_it_does_not_run(command, deps):
    extra = sorted(deps - command_modules(command))
    assert not extra, f"not run by `mnist-pipeline {command}`: {extra}"


def test_the_walk_follows_lazy_imports():
    # evaluate imports `record` inside a function; record draws the charts with plots.py
    assert "record.py" in command_modules("evaluate")
    assert "plots.py" in command_modules("report")
