"""dvc.yaml is honest: each stage lists every project module that can change its outputs, and
none that cannot; and no stage module imports another.

A stage `mnist-pipeline X` computes and writes its outputs in the stage module `X.py` (`sync`,
which writes no DVC output, runs `record/agree.py`); `cli.py` parses the command line and
`commands.py` records what the stage wrote in MLflow, after it. So each stage's deps are exactly
the import closure of its stage module (lazy imports included), walked with no exemption: a
module the stage module reaches is a dependency, whatever it does; one it does not reach (the
parser, the recording) cannot change what it writes.
"""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from tests.conftest import REPO

PACKAGE = REPO / "src" / "mnist_pipeline"
NO_LOGIC = {"__init__.py", "__main__.py", "record/__init__.py"}  # docstrings, `python -m`
STAGE_MODULE = {"sync": "record/agree.py"}  # else mnist-pipeline X runs X.py
# Modules whose job is to compute something a user asked for, each its own entry point: none
# may import another (what two share lives in a module of its own below them).
STAGE_MODULES = (
    "download.py",
    "train.py",
    "evaluate.py",
    "export.py",
    "report.py",
    "tune.py",
    "compare.py",
)


def module_file(name: str) -> str | None:
    """'mnist_pipeline.record.store' -> 'record/store.py' (None outside the package)."""
    parts = name.split(".")
    if parts[0] != "mnist_pipeline" or len(parts) == 1:
        return None
    path = "/".join(parts[1:])
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if (PACKAGE / candidate).is_file():
            return candidate
    return None


def package_imports(file: str) -> set[str]:
    """The package modules `file` imports, anywhere in it (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / file).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {f for f in map(module_file, names) if f is not None}
    return found - NO_LOGIC


def closure(start: str) -> set[str]:
    seen, todo = set(), {start}
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= package_imports(name)
    return seen


def stages() -> list:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        body = stage.get("do", stage)
        command = re.match(r"mnist-pipeline (\w+)", body["cmd"])[1]
        prefix = "src/mnist_pipeline/"
        deps = {d[len(prefix) :] for d in body.get("deps", []) if d.startswith(prefix)}
        out.append(pytest.param(STAGE_MODULE.get(command, f"{command}.py"), deps, id=name))
    return out


@pytest.mark.parametrize(("module", "deps"), stages())
def test_each_stage_lists_every_module_that_can_change_its_outputs(module, deps):
    missing = sorted(closure(module) - deps)
    assert not missing, f"add to this stage's deps in dvc.yaml: {missing}"


@pytest.mark.parametrize(("module", "deps"), stages())
def test_no_stage_lists_a_module_it_does_not_run(module, deps):
    extra = sorted(deps - closure(module))
    assert not extra, f"not run by {module}: {extra}"


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_no_stage_module_imports_another(module):
    others = sorted((closure(module) - {module}) & set(STAGE_MODULES))
    assert not others, f"{module} imports the stage modules {others}"


@pytest.mark.parametrize("module", [m for m in STAGE_MODULES if m not in ("tune.py", "compare.py")])
def test_no_dvc_stage_imports_the_parser_or_the_recording(module):
    reached = closure(module)
    assert not {"cli.py", "commands.py"} & reached
    assert not [m for m in reached if m.startswith("record/")], sorted(reached)


def test_every_output_file_name_lives_in_paths():
    """The checkpoint, the ONNX files, the data's files and the report's, like every other
    output, are named in paths.py alone."""
    names = ("model.pt", "model.onnx", "model.int8.onnx", "results.", "-idx3-ubyte")
    for file in PACKAGE.rglob("*.py"):
        if file.name != "paths.py":
            text = file.read_text()
            assert not [n for n in names if n in text], file


def test_the_walk_follows_lazy_and_package_imports():
    assert "plots.py" in closure("report.py")  # imported inside a function
    assert "record/store.py" in closure("record/agree.py")  # `from mnist_pipeline.record import`
    assert "loop.py" in closure("tune.py")
