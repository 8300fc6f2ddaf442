"""Failure modes, each as a user meets it: bad params, bad data, a run that diverges, is
interrupted or fills the disk, a tracking store that is not there or goes away, a checkpoint that
is not ours, two jobs at once. Every case: one line on stderr (no traceback), a non-zero exit, and
nothing already on disk or in the tracking store lost or half-written.

The table in docs/failure-modes.md is the promise these tests keep. Covered elsewhere, not
repeated here: bad `train` flags (test_train.py), every kind of bad mirror reply and malformed IDX
header (test_dataset.py), `train`/`compare` against a closed port (test_server.py), foreign
checkpoints at the loader (test_evaluate.py).
"""

from __future__ import annotations

import errno
import gzip
import os
import pickle
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from mnist_pipeline import checkpoint, fileio, loop, paths
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import FILES, file_md5
from mnist_pipeline.models import VARIANTS, Architecture, build_model
from mnist_pipeline.record import training as record
from tests.conftest import tiny_params
from tests.helpers import cli, one_line, serving, stop_system_metrics

VARIANT = "ffn1_relu"


# --- helpers -------------------------------------------------------------------------------------


def files_under(root: Path, *folders: str) -> dict[str, bytes]:
    """Every file under root/<folder> (temporary files included), with its bytes."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def outputs(root: Path) -> dict[str, bytes]:
    return files_under(root, "models", "metrics", "plots", "one-off")


def runs(root: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"]
    )


def set_recipe(root: Path, **values: object) -> None:
    """Change VARIANT's recipe in params.yaml: a pipeline run (DVC's outputs), not a one-off."""
    edit_params(root, lambda params: params["variants"][VARIANT].update(values))


def edit_params(root: Path, change: Callable[[dict], object]) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: creating them costs seconds, copying nothing."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}")
    return path


@pytest.fixture
def project(tiny_data: Path, empty_store: Path) -> Path:
    """tiny_data's project with its (empty) tracking store already made."""
    shutil.copy(empty_store, tiny_data / "mlflow.db")
    return tiny_data


@pytest.fixture
def trained(project: Path, capsys) -> Path:
    """`project` after one good `train` of VARIANT: the state a failure must not lose."""
    assert cli(capsys, "train", "--variant", VARIANT)[0] == 0
    return project


def python_cli(*argv: str, **kwargs) -> subprocess.Popen:
    """`python -m mnist_pipeline ...` as a user would run it (the environment is the test's)."""
    return subprocess.Popen([sys.executable, "-m", "mnist_pipeline", *argv], text=True, **kwargs)


# --- params.yaml ---------------------------------------------------------------------------------


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    def change(params: dict) -> None:
        target = params["train"] if section == "train" else params["variants"][section]
        target[key] = value

    return change


BAD_PARAMS = [
    # id, change to params.yaml (a dict edit, or the file's text), phrase in the message
    ("malformed YAML", "train: [seed: 0\nvariants: {}\n", "malformed YAML (line"),
    ("empty file", "", "the file is empty"),
    ("not a mapping", "- 1\n- 2\n", "top level: expected a mapping"),
    ("unknown top-level key", lambda p: p.update(extras=1), "top level: unknown key 'extras'"),
    ("missing section", lambda p: p.pop("train"), "top level: missing key 'train'"),
    (
        "unknown variant under variants",
        lambda p: p["variants"].update(ffn9_relu=p["variants"][VARIANT]),
        "variants: unknown variant 'ffn9_relu'; known variants: logistic_regression",
    ),
    (
        "unknown key in a recipe",
        _set(VARIANT, "momentum", 0.9),
        "variants.ffn1_relu: unknown key 'momentum'",
    ),
    ("lr is a word", _set(VARIANT, "lr", "fast"), "variants.ffn1_relu.lr: expected a positive"),
    ("lr zero", _set(VARIANT, "lr", 0), "variants.ffn1_relu.lr: must be a positive number"),
    ("lr negative", _set(VARIANT, "lr", -0.1), "variants.ffn1_relu.lr: must be a positive"),
    ("lr infinite", _set(VARIANT, "lr", float("inf")), "variants.ffn1_relu.lr: must be a"),
    ("batch size zero", _set(VARIANT, "batch_size", 0), "batch_size: must be at least 1, got 0"),
    ("batch size negative", _set(VARIANT, "batch_size", -32), "batch_size: must be at least 1"),
    ("batch size fraction", _set(VARIANT, "batch_size", 0.5), "batch_size: expected a whole"),
    ("epochs zero", _set(VARIANT, "epochs", 0), "variants.ffn1_relu.epochs: must be at least 1"),
    ("epochs negative", _set(VARIANT, "epochs", -1), "epochs: must be at least 1, got -1"),
    ("epochs quoted", _set(VARIANT, "epochs", "5"), "epochs: expected a whole number, got '5'"),
    ("shuffle a word", _set(VARIANT, "shuffle", "yes"), "shuffle: expected true or false"),
    ("unknown optimizer", _set(VARIANT, "optimizer", "rmsprop"), "'rmsprop' is not one of: sgd"),
    ("unknown device", _set("train", "device", "tpu"), "train.device: 'tpu' is not one of: auto"),
    ("negative val_size", _set("train", "val_size", -1), "train.val_size: must be at least 0"),
    ("unknown keep", _set("train", "keep", "first"), "train.keep: 'first' is not one of: best"),
    ("negative seed", _set("train", "seed", -3), "train.seed: must be at least 0"),
    (
        "unknown dataset",
        lambda p: p["data"].update(dataset="cifar10"),
        "data.dataset: 'cifar10' is not one of: mnist, fashion-mnist",
    ),
]


@pytest.mark.parametrize(
    ("change", "phrase"), [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS]
)
def test_bad_params_yaml_is_one_line_exit_2_before_any_work(tiny_data, capsys, change, phrase):
    if isinstance(change, str):
        (tiny_data / "params.yaml").write_text(change)
    else:
        edit_params(tiny_data, change)

    for argv in (["train", "--variant", VARIANT], ["evaluate", "--variant", VARIANT], ["report"]):
        code, err = cli(capsys, *argv)
        assert code == 2
        line = one_line(err)
        assert phrase in line and "params.yaml" in line, line

    assert not (tiny_data / "mlflow.db").exists()  # not even the tracking store was touched
    assert outputs(tiny_data) == {}


def test_bad_params_in_a_real_process_print_one_line(tiny_data):
    """What reaches the terminal, warnings and logging included, not only what main() prints."""
    (tiny_data / "params.yaml").write_text("train: [seed: 0\n")
    proc = python_cli(
        "train", "--variant", VARIANT, cwd=tiny_data, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert one_line(err).startswith("mnist-pipeline train: error: ")


def test_a_real_process_that_succeeds_leaves_nothing_behind_when_it_exits(tiny_data):
    """The command skips the interpreter's teardown (cli.entry): what it printed to a pipe, its
    exit status and everything it recorded must still all be there."""
    proc = python_cli(
        "train", "--variant", VARIANT, cwd=tiny_data, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1].startswith(f"{VARIANT}: MLflow run "), out
    (run,) = runs(tiny_data)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint.md5"] == file_md5(
        tiny_data / "models" / VARIANT / "model.pt"
    )  # the last thing train records
    client = mlflow.MlflowClient(f"sqlite:///{tiny_data / 'mlflow.db'}")
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.status.name == "READY"


def test_a_variant_without_a_recipe(tiny_data, capsys):
    edit_params(tiny_data, lambda p: p["variants"].pop(VARIANT))
    code, err = cli(capsys, "train", "--variant", VARIANT)
    assert code == 2
    assert "'ffn1_relu' has no recipe under 'variants:'" in one_line(err)


def test_an_unknown_variant_on_the_command_line(tiny_data, capsys):
    # `train --variant nope`: test_train.py; the other commands say the same
    code, err = cli(capsys, "evaluate", "--variant", "ffn1_gelu")
    assert code == 2
    assert "unknown variant 'ffn1_gelu'; choose from: logistic_regression" in one_line(err)


def test_val_size_larger_than_the_training_set(project, capsys):
    before = runs(project)
    for val_size in (600, 10_000):  # the tiny training set has 600 images
        edit_params(project, _set("train", "val_size", val_size))
        code, err = cli(capsys, "train", "--variant", VARIANT)
        assert code == 2
        line = one_line(err)
        assert f"train.val_size: {val_size} leaves nothing to train on (600 training" in line
    assert runs(project) == before == []  # no run was started
    assert outputs(project) == {}


@pytest.mark.parametrize(
    ("architecture", "phrase"),
    [
        (Architecture(hidden=((100, "gelu"),)), "activation 'gelu'; known activations: relu,"),
        (Architecture(head="log_softmax"), "head 'log_softmax'; known heads: logits, softmax"),
    ],
)
def test_an_architecture_with_an_unknown_layer(project, capsys, monkeypatch, architecture, phrase):
    monkeypatch.setitem(VARIANTS, VARIANT, architecture)
    code, err = cli(capsys, "train", "--variant", VARIANT)
    assert code == 2
    assert phrase in one_line(err)
    assert runs(project) == [] and outputs(project) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cuda_requested_without_a_gpu(tiny_data, capsys):
    edit_params(tiny_data, _set("train", "device", "cuda"))
    code, err = cli(capsys, "train", "--variant", VARIANT)
    assert code == 2
    assert "'cuda' requested but torch" in one_line(err) and "use device 'auto' or 'cpu'" in err
    assert not (tiny_data / "mlflow.db").exists() and outputs(tiny_data) == {}


# --- data ----------------------------------------------------------------------------------------

DATA = Path("data/mnist")


def _truncate(folder: Path) -> None:
    path = folder / FILES[0]
    path.write_bytes(path.read_bytes()[:100_000])


def _flip_a_byte(folder: Path) -> None:
    path = folder / FILES[0]
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same size, valid header: only the checksum can tell
    path.write_bytes(bytes(body))


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (lambda d: shutil.rmtree(d), "data/mnist: no data; run `mnist-pipeline download`"),
        (lambda d: (d / FILES[3]).unlink(), "t10k-labels-idx1-ubyte: missing; run `mnist-pipeline"),
        (_truncate, "train-images-idx3-ubyte: content does not match its checksum"),
        (_flip_a_byte, "train-images-idx3-ubyte: content does not match its checksum"),
    ],
    ids=["no data folder", "a file missing", "a truncated file", "a corrupted file"],
)
def test_bad_data_is_caught_before_training_and_download_fixes_it(project, capsys, damage, phrase):
    folder = project / DATA
    good = {name: file_md5(folder / name) for name in FILES}
    damage(folder)
    damaged = files_under(project, "data")

    code, err = cli(capsys, "train", "--variant", VARIANT)

    assert code == 1
    line = one_line(err)
    assert phrase in line and "mnist-pipeline download" in line
    assert runs(project) == [] and outputs(project) == {}  # caught before any training
    assert files_under(project, "data") == damaged  # the loader only reads

    # The fix the message gives: the download replaces what is missing or wrong.
    assert cli(capsys, "download")[0] == 0
    assert {name: file_md5(folder / name) for name in FILES} == good


def _mirror_folder(tiny_mirror, tmp_path: Path, broken: bytes) -> str:
    folder = tmp_path / "mirror"
    shutil.copytree(tiny_mirror.folder, folder)
    (folder / f"{FILES[0]}.gz").write_bytes(broken)
    return str(folder)


@pytest.mark.parametrize("kind", ["HTML page", "short file", "wrong data set", "unreachable"])
def test_a_bad_mirror_through_the_cli(tiny_env, tiny_mirror, tmp_path, monkeypatch, capsys, kind):
    # Each kind of bad reply, one by one over HTTP: test_dataset.py. Here: what the user sees.
    gz = (tiny_mirror.folder / f"{FILES[0]}.gz").read_bytes()
    if kind == "unreachable":
        mirror, phrase = f"http://127.0.0.1:{closed_port()}/", "unreachable"
    elif kind == "HTML page":
        page = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
        mirror, phrase = _mirror_folder(tiny_mirror, tmp_path, page), "HTML page"
    elif kind == "short file":
        mirror, phrase = _mirror_folder(tiny_mirror, tmp_path, gz[:200]), "truncated gzip"
    else:  # valid gzip of another file of the set
        other = gzip.compress((tiny_mirror.raw / FILES[2]).read_bytes())
        mirror, phrase = _mirror_folder(tiny_mirror, tmp_path, other), "wrong data set"
    monkeypatch.setenv("MNIST_MIRROR", mirror)

    code, err = cli(capsys, "download")

    assert code == 1
    line = one_line(err)
    assert f"{FILES[0]}.gz" in line and mirror in line and phrase in line
    assert "MNIST_MIRROR" in line  # the way out on an offline machine
    assert files_under(tiny_env, "data") == {}  # nothing half-written, no temporary file


# --- training ------------------------------------------------------------------------------------


def test_diverging_loss_stops_at_once_and_keeps_the_previous_model(trained, capsys):
    before = outputs(trained)

    set_recipe(trained, lr=1e30, epochs=5)
    code, err = cli(capsys, "train", "--variant", VARIANT)

    assert code == 1
    line = one_line(err)
    assert "training loss became nan in epoch 1" in line
    assert "lower learning rate than 1e+30 (variants.ffn1_relu.lr)" in line
    assert outputs(trained) == before  # checkpoint, run id, metrics and plots as they were
    first, failed = runs(trained)
    assert first.info.status == "FINISHED" and failed.info.status == "FAILED"


def test_infinite_loss_in_a_later_epoch_names_that_epoch(project, capsys, monkeypatch):
    calls = []
    real_epoch = loop.train_epoch

    def epoch_then_inf(*args, **kwargs):
        calls.append(1)
        loss, acc = real_epoch(*args, **kwargs)
        return (float("inf") if len(calls) == 2 else loss), acc

    monkeypatch.setattr(loop, "train_epoch", epoch_then_inf)
    set_recipe(project, epochs=5)
    code, err = cli(capsys, "train", "--variant", VARIANT)

    assert code == 1
    assert "training loss became inf in epoch 2" in one_line(err)
    assert len(calls) == 2  # stopped at once, not at the end
    (run,) = runs(project)
    assert run.info.status == "FAILED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1]  # the finite epoch is on record
    assert outputs(project) == {}


def _wait_for(proc: subprocess.Popen, text: str, timeout_s: float = 120) -> list[str]:
    """Lines of proc's stdout up to the first that contains `text`; fails at the deadline even
    when the process prints nothing."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and selector.select(timeout=left):
            line = proc.stdout.readline()
            if not line:
                break  # the process closed its output
            seen.append(line)
            if text in line:
                return seen
    pytest.fail(f"{text!r} not printed within {timeout_s} s; stdout: {seen}")


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [
        (signal.SIGINT, 130, "interrupted; nothing was saved"),
        (signal.SIGTERM, 143, "terminated; nothing was saved"),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_mid_run_ends_it_killed_and_saves_nothing(
    project, capsys, tmp_path, sig, code, said
):
    stderr = tmp_path / "stderr.txt"
    set_recipe(project, epochs=1000)
    with stderr.open("w") as err_file:
        proc = python_cli(
            *("train", "--variant", VARIANT),
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=err_file,
        )
        try:
            _wait_for(proc, f"{VARIANT} epoch 1/1000")
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == code
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()

    line = one_line(stderr.read_text())
    assert line == f"mnist-pipeline train: {said}"
    (run,) = runs(project)
    assert run.info.status == "KILLED"
    assert not paths.pipeline_outputs(project, VARIANT).checkpoint.exists()
    assert outputs(project) == {}  # no partial checkpoint, metrics or plot, no temporary file

    # The next run of the variant (what `dvc repro` does: its outputs are missing) starts clean.
    set_recipe(project, epochs=1)
    assert cli(capsys, "train", "--variant", VARIANT)[0] == 0
    killed, finished = runs(project)
    assert killed.info.status == "KILLED" and finished.info.status == "FINISHED"
    checkpoint = paths.pipeline_outputs(project, VARIANT).checkpoint
    assert finished.data.tags["checkpoint.md5"] == file_md5(checkpoint)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _DiskFillsUp:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self) -> _DiskFillsUp:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data) -> int:
        self.file.write(bytes(data)[: len(data) // 2])
        self.file.flush()
        _no_space()

    def __getattr__(self, name: str):
        return getattr(self.file, name)


@pytest.mark.parametrize("where", ["while writing", "at the rename"])
def test_a_full_disk_keeps_the_previous_checkpoint(trained, capsys, monkeypatch, where):
    # (Tried for real on a 48 kB tmpfs too: the same line, the same state.)
    before = outputs(trained)
    if where == "while writing":
        real_open = Path.open

        def open_(self, mode="r", *args, **kwargs):
            file = real_open(self, mode, *args, **kwargs)
            if self.name.startswith(".model.pt.") and "w" in mode:  # atomic_path's temp file
                return _DiskFillsUp(file)
            return file

        monkeypatch.setattr(Path, "open", open_)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "model.pt":
                _no_space()
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(fileio.os, "replace", replace)

    set_recipe(trained, lr=0.05)
    code, err = cli(capsys, "train", "--variant", VARIANT)

    assert code == 1
    line = one_line(err)
    checkpoint = paths.pipeline_outputs(trained.resolve(), VARIANT).checkpoint
    assert f"could not write {checkpoint} (No space left on device)" in line
    assert "before is unchanged; free some disk space" in line
    assert outputs(trained) == before  # byte for byte, and no temporary file left
    first, failed = runs(trained)
    assert first.info.status == "FINISHED" and failed.info.status == "FAILED"


# --- tracking ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["train", "--variant", VARIANT], id="train"),
        pytest.param(["evaluate", "--variant", VARIANT, "--one-off"], id="evaluate-one-off"),
        pytest.param(["sync"], id="sync"),
        pytest.param(["compare"], id="compare"),
    ],
)
def test_an_unreachable_server_is_one_line_before_any_work(tiny_data, capsys, monkeypatch, command):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = outputs(tiny_data)
    code, err = cli(capsys, *command)
    assert code == 1
    line = one_line(err)
    assert f"cannot reach the MLflow tracking server at {uri}" in line
    assert "MLFLOW_TRACKING_URI" in line
    assert outputs(tiny_data) == before and not (tiny_data / "mlflow.db").exists()


def test_evaluate_and_export_need_no_tracking_server(tiny_data, capsys, monkeypatch):
    """The pipeline's evaluate and export only compute (sync records them): a server that is
    down stops neither."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    params = load_params(tiny_data / "params.yaml")
    path = paths.pipeline_outputs(tiny_data, VARIANT).checkpoint
    checkpoint.save(path, build_model(VARIANT), VARIANT, params.variants[VARIANT])
    for command in ("evaluate", "export"):
        code, err = cli(capsys, command, "--variant", VARIANT)
        assert code == 0, err
    assert paths.pipeline_outputs(tiny_data, VARIANT).int8.is_file()


def test_a_broken_local_store_fails_before_training(tiny_data, capsys):
    (tiny_data / "mlflow.db").write_text("this is not a database\n")
    code, err = cli(capsys, "train", "--variant", VARIANT)
    assert code == 1
    assert "cannot open the MLflow tracking store sqlite:///" in one_line(err)
    assert (tiny_data / "mlflow.db").read_text() == "this is not a database\n"  # left alone
    assert outputs(tiny_data) == {}


def _check_relogged(root: Path, store_uri: str, lost_run_id: str, capsys) -> None:
    """Follow the advice: `sync` records a run rebuilt from the outputs, linked to the
    checkpoint, with the epochs the lost run never got."""
    code, err = cli(capsys, "sync")
    assert code == 0, err
    client = mlflow.MlflowClient(store_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`record.source` = 'outputs'")
    assert run.info.status == "FINISHED" and run.info.run_id != lost_run_id
    assert run.data.tags["run.kind"] == "pipeline"
    checkpoint = paths.pipeline_outputs(root, VARIANT).checkpoint
    assert run.data.tags["checkpoint.md5"] == file_md5(checkpoint)
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2, 3]


@pytest.fixture
def mlflow_server(
    tmp_path: Path, empty_store: Path
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """A real `mlflow server` on 127.0.0.1: its URL, its SQLite file, its process."""
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store, db)
    port = closed_port()
    command = [
        *(str(Path(sys.executable).with_name("mlflow")), "server"),
        *("--backend-store-uri", f"sqlite:///{db}"),
        *("--no-serve-artifacts", "--default-artifact-root", (db.parent / "art").as_uri()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job workers: one process less
    url = f"http://127.0.0.1:{port}"
    with serving(command, url=f"{url}/health", log=db.parent / "server.log", env=env) as proc:
        yield url, db, proc


def test_tracking_server_dying_mid_run(project, capsys, monkeypatch, mlflow_server):
    """The server dies after epoch 1. Training finishes, its results are saved, the user is
    told how to record them, and doing so rebuilds the run from the outputs."""
    url, db, server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name, value in [("MAX_RETRIES", "0"), ("BACKOFF_FACTOR", "0"), ("TIMEOUT", "5")]:
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)  # no minutes of retries here

    real_call = record.EpochLogger.__call__

    def log_then_die(self, row, epoch):
        real_call(self, row, epoch)
        if epoch == 1:  # epoch 1 is on the server; then it is gone (the whole process group)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    monkeypatch.setattr(record.EpochLogger, "__call__", log_then_die)
    set_recipe(project, epochs=3)
    code, err = cli(capsys, "train", "--variant", VARIANT)
    stop_system_metrics()

    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"the tracking store at {url} failed during training" in line
    assert "results are saved (models/ffn1_relu/model.pt" in line
    assert "`mnist-pipeline sync` records them" in line
    assert len(paths.pipeline_outputs(project, VARIANT).history.read_text().splitlines()) == 1 + 3

    # The store answers again (here: its database, read directly) and the advice works.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (lost,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    lost_run_id = lost.info.run_id
    steps = [m.step for m in client.get_metric_history(lost_run_id, "train/loss")]
    assert steps == [1]  # what reached the server before it died
    _check_relogged(project, f"sqlite:///{db}", lost_run_id, capsys)


# --- checkpoints ---------------------------------------------------------------------------------


class _Exploit:
    """A pickle that creates a file when loaded: the proof that loading ran its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


CHECKPOINTS = ["pickled code", "garbage pickle", "a text file", "a Git LFS pointer", "empty"]


@pytest.mark.parametrize("kind", [*CHECKPOINTS, "another variant's"])
def test_evaluate_refuses_a_checkpoint_that_is_not_ours(trained, capsys, recwarn, tmp_path, kind):
    checkpoint = paths.pipeline_outputs(trained.resolve(), VARIANT).checkpoint
    marker = tmp_path / "pwned"
    planted = {
        "pickled code": pickle.dumps(
            {"format": "mnist-pipeline/checkpoint/1", "x": _Exploit(marker)}
        ),
        "garbage pickle": b"\x80\x04not really a checkpoint",
        "a text file": b"hello\n",
        "a Git LFS pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
        "empty": b"",
    }.get(kind)
    if planted is None:  # a real checkpoint, relabelled
        payload = torch.load(checkpoint, weights_only=True)
        payload["variant"] = "ffn2_relu"
        torch.save(payload, checkpoint)
        planted = checkpoint.read_bytes()
    checkpoint.write_bytes(planted)
    before = outputs(trained)
    runs_before = [(r.info.run_id, r.info.status, r.data.metrics) for r in runs(trained)]

    code, err = cli(capsys, "evaluate", "--variant", VARIANT)

    assert code == 1
    line = one_line(err)
    assert f"{checkpoint}: refused to load" in line
    assert "weights_only" not in line  # torch's advice to load it unsafely is not passed on
    assert not [w for w in recwarn if "pickle" in str(w.message)]  # nor its warnings
    assert not marker.exists()  # never executed
    assert checkpoint.read_bytes() == planted and outputs(trained) == before
    assert [(r.info.run_id, r.info.status, r.data.metrics) for r in runs(trained)] == runs_before


# --- concurrency ---------------------------------------------------------------------------------


def test_two_trainings_at_once_on_a_fresh_local_store(tiny_data, tmp_path):
    """`dvc exp run --queue` with two jobs: two processes, one SQLite store not yet created
    (MLflow's table creation raced, and one job crashed, before tracking.check_reachable)."""
    variants = ("ffn1_relu", "logistic_regression")
    logs = {variant: tmp_path / f"{variant}.err" for variant in variants}
    procs = {}
    for variant, log in logs.items():
        with log.open("w") as err:  # the child keeps its own copy of the file
            argv = ("train", "--variant", variant, "--epochs", "2")
            procs[variant] = python_cli(*argv, cwd=tiny_data, stdout=subprocess.DEVNULL, stderr=err)
    for variant, proc in procs.items():
        assert proc.wait(timeout=240) == 0, logs[variant].read_text()[-3000:]
        assert "Traceback" not in logs[variant].read_text()

    store = f"sqlite:///{tiny_data / 'mlflow.db'}"
    done = {r.data.tags["variant"]: r for r in runs(tiny_data)}
    assert sorted(done) == sorted(variants)
    client = mlflow.MlflowClient(store)
    mlflow.set_tracking_uri(store)
    for variant, run in done.items():
        assert run.info.status == "FINISHED"
        for name in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]
        (model,) = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        assert model.status == "READY"  # (loading it back: test_train.py)
        checkpoint = paths.one_off_outputs(tiny_data, variant).checkpoint  # (--epochs 2)
        assert run.data.tags["checkpoint.md5"] == file_md5(checkpoint)


class _OtherJobFirst:
    """A tracking client whose first `log_inputs` loses the race to another job: that job's run
    logs the same datasets first (for real, in the same store), and this call is then refused as
    the team's PostgreSQL server refused it in a two-host run."""

    REFUSAL = (
        "BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique "
        'constraint "dataset_pk"'
    )

    def __init__(self, client: mlflow.MlflowClient, other_run: str, refusal: str = REFUSAL):
        self.client, self.other_run, self.refusal, self.calls = client, other_run, refusal, 0

    def log_inputs(self, run_id: str, datasets: list) -> None:
        self.calls += 1
        if self.calls == 1:
            self.client.log_inputs(self.other_run, datasets=datasets)
            raise mlflow.exceptions.MlflowException(self.refusal)
        self.client.log_inputs(run_id, datasets=datasets)


def _two_runs(tmp_path: Path) -> tuple[dict, mlflow.MlflowClient, str, str]:
    """The tiny params' dataset inputs, and two runs in a fresh SQLite store."""
    from mnist_pipeline.config import load_params
    from mnist_pipeline.record.store import datasets

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    params = load_params(tmp_path / "params.yaml")
    found = datasets(params.data, "0" * 32, val_size=100, seed=0)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("two-jobs")
    return found, client, *(client.create_run(experiment).info.run_id for _ in range(2))


def _inputs(client: mlflow.MlflowClient, run_id: str) -> set[tuple[str, str]]:
    return {
        (d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs
    }


def test_two_jobs_logging_the_same_data_at_once_both_link_it(tmp_path):
    """MLflow's store looks a dataset up, then inserts it; two hosts starting at once both
    insert, and the store refuses the second by its unique key (seen in test_team.py's two-host
    run). The loser tries again and links the winner's dataset."""
    from mnist_pipeline.record.store import log_datasets

    found, client, ours, theirs = _two_runs(tmp_path)
    racing = _OtherJobFirst(client, theirs)
    log_datasets(ours, found, racing)
    assert racing.calls == 2
    assert _inputs(client, ours) == _inputs(client, theirs)
    assert len(_inputs(client, ours)) == len(found) == 3


def test_a_store_error_that_is_not_the_race_is_not_retried(tmp_path):
    from mnist_pipeline.record.store import log_datasets

    found, client, ours, theirs = _two_runs(tmp_path)
    failing = _OtherJobFirst(client, theirs, refusal="RESOURCE_DOES_NOT_EXIST: run not found")
    with pytest.raises(mlflow.exceptions.MlflowException, match="run not found"):
        log_datasets(ours, found, failing)
    assert failing.calls == 1 and _inputs(client, ours) == set()
