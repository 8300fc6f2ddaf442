"""`mnist-pipeline tune`: the `tune:` section's checks, `--apply` editing params.yaml in place, and
a search on a real two-node Ray cluster (two `ray start` processes, one CPU each) logging to a
real `mlflow server`, inside a network namespace of its own where loopback is the only address:
trials land on both nodes, ASHA stops some, and killing the worker node mid-search loses only
its running trial, which Ray retries on the head."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.cli import main
from mnist_pipeline.compare import compare
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import FILES, file_md5
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params_file import apply_recipe
from tests.conftest import REPO, committed_params_text, write_tiny_dataset
from tests.helpers import free_port

INNER_ENV = "MNIST_PIPELINE_TUNE_NETNS"  # set: this process runs in the test's network namespace
DEADLINE_S = 240  # the whole cluster test, inside the namespace
SPACE = {"lr": {"low": 1e-4, "high": 0.1}, "batch_size": [32, 100], "epochs": [6, 9]}


# --- params.yaml: the tune: section and --apply ----------------------------------------------


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({**SPACE, "lr": {"low": 0.1, "high": 0.01}}, "tune.lr: low (0.1) must be below high"),
        ({**SPACE, "lr": {"low": -1, "high": 0.01}}, "tune.lr.low: must be a positive number"),
        ({**SPACE, "lr": [0.1, 0.2]}, "tune.lr: expected a mapping"),
        ({**SPACE, "batch_size": []}, "tune.batch_size: expected a non-empty list"),
        ({**SPACE, "epochs": [3, 0]}, "tune.epochs[1]: must be at least 1, got 0"),
        ({**SPACE, "epochs": "5"}, "tune.epochs: expected a non-empty list"),
        ({**SPACE, "momentum": 0.9}, "tune: unknown key 'momentum'"),
        ({"lr": SPACE["lr"], "epochs": [1]}, "tune: missing key 'batch_size'"),
        ({**SPACE, "variants": {"nope": {}}}, "tune.variants.nope: unknown variant"),
        ({**SPACE, "variants": {"ffn1_relu": {"seed": 1}}}, "unknown key 'seed'"),
    ],
)
def test_a_bad_tune_section_is_one_line_and_exit_2(tiny_env, capsys, tune, message):
    params = yaml.safe_load((tiny_env / "params.yaml").read_text())
    params["tune"] = tune
    (tiny_env / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["tune", "--variant", "ffn1_relu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mnist-pipeline tune: error: ")
    assert message in err


def test_the_search_space_is_shared_and_replaced_per_variant(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text())
    params = load_params(path)
    shared, own = params.search_space("ffn1_relu"), params.search_space("mlp512_relu")
    assert shared.lr[0] < shared.lr[1] and shared.batch_size and shared.epochs
    assert own.lr != shared.lr and own.batch_size == shared.batch_size


def test_apply_changes_only_the_variants_values_and_keeps_every_comment(tmp_path):
    path = tmp_path / "params.yaml"
    entry = "  ffn1_relu:\n    optimizer: sgd\n    lr: 0.1\n    batch_size: 100\n    epochs: 5\n"
    commented = (  # comments above, beside and inside the entry --apply edits
        "  # the baseline\n  ffn1_relu:    # one hidden layer\n    optimizer: sgd\n"
        "    # searched by tune\n    lr: 0.1            # was 0.1\n\n    batch_size: 100\n"
        "    epochs: 5  # short\n"
    )
    assert entry in committed_params_text()
    before = committed_params_text().replace(entry, commented)
    path.write_text(before)
    params = load_params(path)
    best = dataclasses.replace(params.recipe("ffn1_relu"), lr=0.234567, batch_size=32, epochs=15)
    apply_recipe(path, "ffn1_relu", best)

    after = path.read_text()
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert changed == [
        ("    lr: 0.1            # was 0.1", "    lr: 0.2346         # was 0.1"),
        ("    batch_size: 100", "    batch_size: 32"),
        ("    epochs: 5  # short", "    epochs: 15 # short"),  # the comment keeps its column
    ]
    assert after.endswith("\n") and not after.endswith("\n\n")
    applied = load_params(path)
    assert applied.recipe("ffn1_relu") == dataclasses.replace(best, lr=0.2346)
    assert applied.recipe("ffn1_sigmoid") == params.recipe("ffn1_sigmoid")


def test_apply_refuses_a_variant_missing_from_the_file_and_writes_nothing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text())
    recipe = load_params(path).recipe("ffn1_relu")
    params = yaml.safe_load(committed_params_text())
    del params["variants"]["ffn1_relu"]  # removed while the search ran
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    before = path.read_bytes()
    with pytest.raises(PipelineError, match="ffn1_relu not found; add its recipe first"):
        apply_recipe(path, "ffn1_relu", recipe)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["params.yaml"]


def test_tune_refuses_a_local_store_for_a_cluster(tiny_data, capsys):
    assert main(["tune", "--variant", "ffn1_relu", "--address", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "is a file on this machine" in err and "MLFLOW_TRACKING_URI" in err


@pytest.mark.slow  # a minute of Ray start-up and trials: the two-node test covers the search itself
def test_a_diverging_trial_is_reported_and_the_search_goes_on(tiny_data, capsys):
    """Ray on this machine (no --address). Learning rates this high make the loss NaN within the
    first epoch: each trial says so in its run, is not retried, and the search ends with one
    line naming what happened."""
    import mlflow

    params = yaml.safe_load((tiny_data / "params.yaml").read_text())
    params["tune"] = {"lr": {"low": 1e30, "high": 1e31}, "batch_size": [100], "epochs": [2]}
    (tiny_data / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(["tune", "--variant", "ffn1_relu", "--samples", "2", "--max-failures", "3"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no trial of the search reported a validation accuracy (2 diverged)" in err
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    trials = [r for r in runs if r.data.tags.get("run.kind") == "trial"]
    assert len(trials) == 2  # not retried
    assert {(r.info.status, r.data.tags["tune.outcome"]) for r in trials} == {
        ("FAILED", "diverged")
    }
    assert "diverged" in trials[0].data.tags["tune.outcome.note"]
    (search,) = [r for r in runs if r.data.tags.get("run.kind") == "search"]
    assert search.info.status == "FAILED" and search.data.metrics["trials/diverged"] == 2


# --- a two-node cluster in a network namespace ----------------------------------------------


def test_a_search_on_a_two_node_cluster_survives_a_dead_node():
    """Re-runs the test below under `unshare --net`, with loopback up and nothing else."""
    missing = [tool for tool in ("unshare", "ip", "ss") if shutil.which(tool) is None]
    probe = None if missing else subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if missing or probe.returncode != 0:
        reason = (
            f"cannot make a network namespace: {', '.join(missing)} missing (make test-tools)"
            if missing
            else f"cannot make a network namespace (unshare --net: {probe.stderr.decode().strip()})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    test = f"{Path(__file__).relative_to(REPO)}::test_cluster_in_its_own_namespace"
    inner = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test]
    command = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
    env = {**os.environ, INNER_ENV: "1"}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S + 60
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the cluster test ran past its deadline:\n{(err.stdout or b'')[-4000:]}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


@pytest.fixture
def namespace_project(tiny_data: Path, monkeypatch) -> Path:
    if os.environ.get(INNER_ENV) != "1":
        pytest.skip("runs inside test_a_search_on_a_two_node_cluster_survives_a_dead_node")
    params = yaml.safe_load((tiny_data / "params.yaml").read_text())
    params["tune"] = SPACE
    (tiny_data / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # More training images than the tiny set: a trial's first epoch lasts long enough (a few
    # tenths of a second) for the test to see it running and kill its node then.
    folder = tiny_data / "data" / "mnist"
    write_tiny_dataset(folder, n_train=20_000)
    checksums = tiny_data / "checksums.json"
    checksums.write_text(json.dumps({name: file_md5(folder / name) for name in FILES}))
    monkeypatch.setenv("MNIST_CHECKSUMS_FILE", str(checksums))
    return tiny_data


def _start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _kill_tree(proc: subprocess.Popen) -> None:
    """The process and every process it started (Ray's raylet, workers, agents), by PID."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=15)
    proc.wait(timeout=15)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def _wait(what: str, ready, deadline: float, logs: list[Path], step=0.2, watch=None):
    """Poll `ready` until it returns something true; fail at the deadline, or at once if the
    process `watch` ended first."""
    while True:
        if value := ready():
            return value
        if time.monotonic() > deadline or (watch is not None and watch.poll() is not None):
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            pytest.fail(f"{what}: not within the deadline\n{tails}")
        time.sleep(step)


@pytest.fixture
def cluster(namespace_project: Path, monkeypatch) -> Iterator[dict]:
    """An MLflow server and a Ray head and worker node, one CPU each, all on 127.0.0.1."""
    # Ray's token authentication, with a token of the test's own (not ~/.ray/auth_token's):
    # every process below, and this one, inherit it.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    folder = Path(tempfile.mkdtemp(prefix="raytest-", dir="/tmp"))  # short: Ray's socket paths
    bin_dir = Path(sys.executable).parent
    mlflow_port, gcs_port = free_port(), free_port()
    started: list[subprocess.Popen] = []
    # The head notices a dead node in about 2 s, not Ray's default 30 s.
    head_env = {
        **os.environ,
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    ray_common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    ray_common += ["--node-ip-address", "127.0.0.1"]
    try:
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        started.append(_start([
            str(bin_dir / "mlflow"), "server", "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts", "--artifacts-destination",
            (folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--workers", "1",
        ], folder / "mlflow.log", server_env))  # fmt: skip
        started.append(_start([
            str(bin_dir / "ray"), "start", "--head", "--port", str(gcs_port),
            "--include-dashboard", "false", "--temp-dir", str(folder / "ray"), *ray_common,
        ], folder / "head.log", head_env))  # fmt: skip
        health = f"http://127.0.0.1:{mlflow_port}/health"
        _wait("the MLflow server", lambda: _answers(health), time.monotonic() + 120,
              [folder / "mlflow.log"])  # fmt: skip
        yield {
            "folder": folder,
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "address": f"127.0.0.1:{gcs_port}",
            "procs": started,
            "worker_command": [
                str(bin_dir / "ray"),
                "start",
                "--address",
                f"127.0.0.1:{gcs_port}",
                *ray_common,
            ],
        }
    finally:
        for proc in reversed(started):
            _kill_tree(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _nodes(address: str) -> dict[str, str]:
    """{'head': node id, 'worker': node id} once both nodes are alive, else {}."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    alive = [n for n in ray.nodes() if n["Alive"]]
    roles = {
        ("head" if "node:__internal_head__" in n["Resources"] else "worker"): n["NodeID"]
        for n in alive
    }
    return roles if len(roles) == 2 else {}


def _listening() -> list[str]:
    """Every TCP socket listening in this network namespace: address:port (process)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [" ".join((line.split()[3], line.split()[-1])) for line in out.splitlines() if line]


def _trial_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`run.kind` = 'trial'", max_results=500)


def test_cluster_in_its_own_namespace(cluster, namespace_project: Path):
    import mlflow
    import ray

    deadline = time.monotonic() + DEADLINE_S
    folder, logs = cluster["folder"], [cluster["folder"] / n for n in ("head.log", "mlflow.log")]
    worker = _start(cluster["worker_command"], folder / "worker.log")
    cluster["procs"].append(worker)
    logs.append(folder / "worker.log")
    nodes = _wait("two Ray nodes", lambda: _nodes(cluster["address"]), deadline, logs, 0.5)
    ray.shutdown()
    client = mlflow.MlflowClient(cluster["mlflow"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster["mlflow"], "MLFLOW_EXPERIMENT_NAME": "t"}
    command = ["mnist-pipeline", "tune", "--variant", "ffn1_relu", "--samples", "6"]
    command += ["--address", cluster["address"], "--max-failures", "3"]
    search = _start(command, folder / "tune.log", env)
    cluster["procs"].insert(0, search)
    logs.append(folder / "tune.log")
    experiment = lambda: client.get_experiment_by_name("t")  # noqa: E731
    _wait("the search's experiment", experiment, deadline, logs, watch=search)
    experiment_id = client.get_experiment_by_name("t").experiment_id

    def in_first_epoch_on_worker():
        """A trial on the worker that has not reported an epoch yet: Tune cannot have stopped
        it (a run stopped by ASHA stays RUNNING until the driver ends it)."""
        return any(
            r.info.status == "RUNNING"
            and r.data.tags.get("ray.node_id") == nodes["worker"]
            and "val/accuracy" not in r.data.metrics
            for r in _trial_runs(client, experiment_id)
        )

    _wait("a trial starting on the worker", in_first_epoch_on_worker, deadline, logs, 0.05, search)
    sockets = _listening()  # everything is up: servers, both nodes, the driver, the trials
    _kill_tree(worker)  # the worker node dies mid-trial
    _wait("the search to end", lambda: search.poll() is not None, deadline, logs, 0.5)
    assert search.returncode == 0, (folder / "tune.log").read_text()[-6000:]

    # [::ffff:127.0.0.1] is 127.0.0.1 on an IPv6 socket (gRPC's): loopback too, nothing else.
    hosts = (x.split()[0].rsplit(":", 1)[0] for x in sockets)
    bound = {h.removeprefix("[::ffff:").removesuffix("]") for h in hosts}
    assert bound == {"127.0.0.1"}, "\n".join(sockets)
    runs = _trial_runs(client, experiment_id)
    outcomes = [r.data.tags.get("tune.outcome") for r in runs]
    placed = {r.data.tags["ray.node_id"] for r in runs}
    assert placed == {nodes["head"], nodes["worker"]}, outcomes
    assert "stopped-early" in outcomes and "retried" in outcomes, outcomes
    assert all(r.info.status != "RUNNING" for r in runs), outcomes
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {
        search_run_id(client, experiment_id)
    }
    parent = client.get_run(search_run_id(client, experiment_id))
    assert parent.info.status == "FINISHED"
    final = {k: v for k, v in parent.data.metrics.items() if k.startswith("trials/")}
    assert sum(final.values()) == 6 and "trials/failed" not in final, final
    assert parent.data.metrics["best/val_accuracy"] > 0
    assert client.get_run(parent.data.params["best.run_id"]).info.status == "FINISHED"
    assert parent.outputs.model_outputs, "the best trial's weights are the search's logged model"
    assert json.loads(parent.data.params["search.space"])["epochs"] == [6, 9]

    # `compare` lists the search's finished trials side by side, never the search's own run.
    os.environ["MLFLOW_TRACKING_URI"] = cluster["mlflow"]  # (monkeypatched by tiny_env)
    table = compare(load_params(namespace_project / "params.yaml"), namespace_project,
                    experiment="t", one_off=True, latest_only=False)  # fmt: skip
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(table) == len(finished)


def search_run_id(client, experiment_id: str) -> str:
    (run,) = client.search_runs([experiment_id], "tags.`run.kind` = 'search'")
    return run.info.run_id
