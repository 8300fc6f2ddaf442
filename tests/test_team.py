"""The team set-up of docs/team.md on real engines: one `mlflow server` on PostgreSQL with its
artifacts proxied into S3-compatible storage (moto's server), one DVC remote on that storage.

The module starts, once, a PostgreSQL cluster of its own (temporary folder, free loopback port),
moto's S3 server and `mlflow server` as docs/team.md says (tests/team_servers.py): MLflow's
`basic-auth` app with its accounts in PostgreSQL, over HTTPS with a certificate from a CA made
here, the documentation's owner, trainer (alice) and viewer (bob). Clients hold no S3 credentials:
every model goes through the server. The hosts train as alice; this process reads as bob. Then,
as a team would:

- two hosts train at the same time, and `compare` shows them side by side;
- one clone runs the pipeline and pushes to the DVC remote, a fresh clone pulls, is up to date,
  and its `evaluate` logs into the run that trained the checkpoint;
- a queued sweep (`dvc exp run --queue`, `dvc queue start -j 2`) lands on the server complete;
- a server that goes away mid-run: training keeps its results and says how to re-log them;
- no credentials, a wrong password, a viewer that would write, and a host that does not trust the
  certificate are refused in one line before any work, and change nothing; a viewer reads runs
  and cannot log, register or move the alias; an account refused mid-run keeps its results;
- at the end, the secrets used (passwords, keys) are nowhere in the store, the bucket, the logs or
  the working trees.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from packaging.requirements import Requirement

from mnist_pipeline import paths, record, registry
from mnist_pipeline.cli import main
from mnist_pipeline.compare import compare
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import file_md5
from tests.conftest import Mirror, tiny_params
from tests.helpers import (
    DVC,
    GIT_IDENTITY,
    cli,
    one_line,
    project_repo,
    ran_stages,
    sh,
    stop_system_metrics,
    up_to_date,
)
from tests.team_servers import (
    ADMIN_PASSWORD,
    BIN,
    BUCKET,
    S3,
    S3_SECRET,
    SECRETS,
    TRAINER,
    TRAINER_PASSWORD,
    VIEWER,
    VIEWER_PASSWORD,
    MlflowServer,
    Postgres,
    clean_env,
    create_accounts,
    create_database,
    doc_block,
    doc_command,
    doc_commands,
    doc_exports,
    doc_values,
    fill,
    mlflow_server,
    no_aws_credentials,
    postgres_cluster,
    process_group,
    s3_server,
    server_files,
)

# One variant: the server, the bucket, the DVC remote and the queue carry any variant alike, and
# each variant costs every host a training and an evaluation, and the DVC repository's `dvc repro`
# three stage processes. `compare`'s table of several variants: test_server.py.
VARIANTS = ("ffn1_relu",)
HOSTS = ("laptop", "gpu-box")
# Two experiments for the two workers: two jobs at once on one store. None is params.yaml's 0.1 (the
# baseline's run).
SWEEP_LRS = ("0.05", "0.2")


@dataclass(frozen=True)
class Team:
    postgres: Postgres
    s3: S3
    server: MlflowServer
    base: Path  # the module's temporary folder


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    base = tmp_path_factory.mktemp("team")
    with ExitStack() as stack:
        postgres = stack.enter_context(postgres_cluster())
        create_database(postgres)
        s3 = stack.enter_context(s3_server(base))
        etc = server_files(base / "etc", postgres)
        server = stack.enter_context(mlflow_server(postgres, s3, base / "server", etc))
        create_accounts(server, postgres, s3)
        yield Team(postgres, s3, server, base)
        mlflow.set_tracking_uri(None)  # the server goes away: no process-wide pointer to it


def project_params() -> dict:
    params = tiny_params()
    params["variants"] = {v: params["variants"][v] for v in VARIANTS}
    return params


def filled(team: Team) -> dict[str, str]:
    """docs/team.md's placeholders and this module's values for them."""
    port = int(team.server.url.rsplit(":", 1)[1])
    return doc_values(port, team.postgres, team.s3, team.server.etc)


def client_env(
    team: Team, host: str, experiment: str, mirror: Mirror, home: Path | None = None
) -> dict[str, str]:
    """A team member's shell: docs/team.md's settings for every host (the server's URL, the CA,
    the trainer's account), a host label, no S3 credentials of any kind. With `home`, the
    password is in <home>/.mlflow/credentials (the documentation's file) instead."""
    settings = {name: fill([value], filled(team))[0] for name, value in doc_exports("2.").items()}
    assert settings["MLFLOW_TRACKING_URI"] == team.server.url
    assert settings["MLFLOW_TRACKING_USERNAME"] == TRAINER
    if home is not None:
        (home / ".mlflow").mkdir(parents=True)
        credentials = home / ".mlflow" / "credentials"
        credentials.write_text("\n".join(fill(doc_block("ini", "2.").splitlines(), filled(team))))
        credentials.chmod(0o600)
        del settings["MLFLOW_TRACKING_USERNAME"], settings["MLFLOW_TRACKING_PASSWORD"]
        settings["HOME"] = str(home)
    return {
        **clean_env(),
        **no_aws_credentials(team.base),
        **settings,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "MNIST_PIPELINE_HOST": host,
        "MNIST_MIRROR": str(mirror.folder),
        "MNIST_CHECKSUMS_FILE": str(mirror.checksums),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **GIT_IDENTITY,
    }


def sign_in(monkeypatch, team: Team, user: str | None, password: str | None) -> None:
    """This process's MLflow calls as `user` (None: no credentials at all), trusting the CA."""
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(team.server.ca))
    monkeypatch.setenv("HOME", str(team.base / "home"))  # no ~/.mlflow/credentials of the user's
    for name, value in [("USERNAME", user), ("PASSWORD", password)]:
        if value is None:
            monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
        else:
            monkeypatch.setenv(f"MLFLOW_TRACKING_{name}", value)


@pytest.fixture
def as_client(team: Team, monkeypatch) -> None:
    """This test process as a client: no S3 credentials either; it reads as the viewer."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in no_aws_credentials(team.base).items():
        monkeypatch.setenv(name, value)
    sign_in(monkeypatch, team, VIEWER, VIEWER_PASSWORD)


def runs_of(team: Team, experiment: str, filter_string: str = "") -> list:
    client = mlflow.MlflowClient(team.server.url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server"
    return client.search_runs([found.experiment_id], filter_string, max_results=1000)


def load_logged_model(run, variant: str) -> mlflow.pyfunc.PyFuncModel:
    """The run's logged model (named after its variant), loaded through the server."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{variant}'",
        output_format="list",
    )
    assert len(models) == 1, models
    return mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")


def assert_complete(team: Team, run, variant: str, epochs: int = 1) -> None:
    """A finished run with everything a run should hold: recipe, every epoch's metrics, the model
    summary, test metrics, and a model that loads through the server."""
    mlflow.set_tracking_uri(team.server.url)  # for the model's loading (the fixture resets it)
    client = mlflow.MlflowClient(team.server.url)
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == variant
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients hold no keys
    assert {"variant", "optimizer", "lr", "batch_size", "epochs"} <= set(run.data.params)
    for metric in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == list(range(1, epochs + 1)), (metric, steps)
    assert "test/accuracy" in run.data.metrics
    assert "model_summary.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model = load_logged_model(run, variant)
    batch = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert np.asarray(model.predict(batch)).shape == (4, 10)


# --- the documentation's install lines -----------------------------------------------------------


def installed(requirement: str) -> list[str]:
    """What of `requirement` (its extras included) is not installed here, or in a wrong version."""
    req = Requirement(requirement)
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return [f"{requirement}: not installed"]
    problems = []
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{requirement}: {version} installed")
    for extra in req.extras:
        for dependency in importlib.metadata.requires(req.name) or []:
            dep = Requirement(dependency)
            if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                problems += installed(str(dep).split(";")[0])
    return problems


def test_the_documented_packages_are_what_these_tests_run(team):
    """docs/team.md's `pip install` lines name what runs here, drivers included; the backend
    URI it gives loads its driver (with only psycopg2 installed, SQLAlchemy 2.1 reads
    `postgresql://` as psycopg 3, and `mlflow server` stopped at once)."""
    import sqlalchemy.engine

    lines = [words[2:] for words in doc_commands("pip install")]
    requirements = [r for words in lines for r in words if not r.startswith("-")]
    assert {Requirement(r).name for r in requirements} >= {"mlflow", "psycopg", "boto3", "dvc"}
    problems = [p for r in requirements for p in installed(r)]
    assert not problems, problems

    command = doc_command("mlflow server", "1.", "postgresql")
    uri = command[command.index("--backend-store-uri") + 1]
    sqlalchemy.engine.make_url(uri).get_dialect().import_dbapi()  # raises if the driver is absent
    # the module's server is that command (tests/team_servers.py reads it from the docs)
    assert team.server.command[1:] == fill(command[1:], filled(team))
    assert "--app-name" in command and command[command.index("--app-name") + 1] == "basic-auth"


# --- two hosts, one server -----------------------------------------------------------------------


def make_project(root: Path, mirror: Mirror) -> Path:
    """A host's copy of the project: params (two variants, one short epoch) and the data."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    shutil.copytree(mirror.raw, root / "data" / "mnist")
    return root


def test_two_hosts_train_at_once_and_compare_shows_both(
    team, tiny_mirror, tmp_path, monkeypatch, capsys, as_client
):
    experiment = "team-two-hosts"
    script = " && ".join(
        f"mnist-pipeline train --variant {v} && mnist-pipeline evaluate --variant {v}"
        for v in VARIANTS
    )
    with ExitStack() as stack:
        jobs = {}
        for host in HOSTS:
            root = make_project(tmp_path / host, tiny_mirror)
            # one host keeps its password in the environment, the other in MLflow's file
            home = tmp_path / f"{host}-home" if host == "gpu-box" else None
            env = client_env(team, host, experiment, tiny_mirror, home) | {
                "MNIST_PIPELINE_ROOT": str(root)
            }
            log = tmp_path / f"{host}.log"
            proc = stack.enter_context(process_group(["bash", "-ec", script], log, env, root))
            jobs[host] = (proc, log)
        codes = {host: proc.wait(timeout=600) for host, (proc, _) in jobs.items()}

    # What the team sees first (printed before the checks, so that a failure shows it too).
    root = tmp_path / HOSTS[0]
    monkeypatch.setenv("MNIST_PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    capsys.readouterr()
    compared = main(["compare"])
    printed = capsys.readouterr().out
    print(printed)  # for the record: `pytest -rA` shows it
    for host, (_, log) in jobs.items():
        assert codes[host] == 0, log.read_text()[-3000:]

    runs = runs_of(team, experiment)
    pairs = sorted((r.data.tags["host"], r.data.tags["variant"]) for r in runs)
    assert pairs == sorted((h, v) for h in HOSTS for v in VARIANTS)  # one run each, no duplicate
    for run in runs:
        assert "time/train_seconds" in run.data.metrics
        assert_complete(team, run, run.data.tags["variant"])
    # The models went through the server into the bucket.
    stored = team.s3.keys("mlflow-artifacts/")
    assert sum(key.endswith("/MLmodel") for key in stored) == len(runs)

    table = compare(load_params(root / "params.yaml"), root)
    groups = sorted(table.columns.get_level_values(0).unique())
    assert groups == ["gpu-box · cpu", "laptop · cpu"]
    assert list(table.index) == list(VARIANTS)
    for group in groups:
        for variant in VARIANTS:
            assert 0 < table.loc[variant, (group, "test/accuracy")] <= 1
    assert compared == 0
    assert "laptop · cpu" in printed and "gpu-box · cpu" in printed


# --- the DVC remote ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    repo: Path  # the clone that ran the pipeline and pushed
    env: dict[str, str]
    first: str  # what its `dvc repro` printed


def dvc_remote_setup(repo: Path, env: dict, values: dict, local_only: bool = False) -> None:
    """docs/team.md's `dvc remote` commands (a fresh clone: only the `--local` ones, the
    credentials, which git does not carry)."""
    commands = doc_commands("dvc remote", "3.")
    assert commands, "docs/team.md: no `dvc remote` commands"
    for words in commands:
        if local_only and "--local" not in words:
            continue
        sh([DVC, *fill(words, values)[1:]], repo, env)


@pytest.fixture(scope="module")
def shared(team, tiny_mirror, tmp_path_factory) -> Shared:
    """A git + DVC repository with the project, its remote on the team's S3 set up as
    docs/team.md says, after `dvc repro` and `dvc push`, everything committed."""
    repo = tmp_path_factory.mktemp("trainer")
    env = client_env(team, "trainer", "team-dvc", tiny_mirror)
    values = doc_values(0, team.postgres, team.s3)
    project_repo(repo, project_params(), env)
    dvc_remote_setup(repo, env, values)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "project, with the team's DVC remote"], repo, env)
    first = sh([DVC, "repro"], repo, env)
    sh([DVC, "push"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "results"], repo, env)
    return Shared(repo, env, first)


def test_dvc_push_then_pull_in_a_fresh_clone_finds_the_same_complete_run(
    team, shared, tmp_path, as_client
):
    repo, env = shared.repo, shared.env
    expected = {"download", *(f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS)}
    assert expected <= set(ran_stages(shared.first))
    # The credentials stayed out of git; the remote's address did not.
    tracked = sh(["git", "ls-files", ".dvc"], repo, env).split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    assert S3_SECRET in (repo / ".dvc" / "config.local").read_text()
    assert S3_SECRET not in (repo / ".dvc" / "config").read_text()
    assert team.s3.endpoint in (repo / ".dvc" / "config").read_text()
    assert team.s3.keys("mnist-dvc/")  # the push reached the bucket

    clone = tmp_path / "colleague"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "models").exists() and not (clone / "data" / "mnist").exists()
    colleague = env | {"MNIST_PIPELINE_HOST": "colleague"}
    dvc_remote_setup(clone, colleague, doc_values(0, team.postgres, team.s3), local_only=True)
    sh([DVC, "pull"], clone, colleague)
    assert up_to_date(sh([DVC, "status"], clone, colleague))
    for variant in VARIANTS:
        checkpoint = paths.checkpoint_path(clone, variant)
        assert checkpoint.read_bytes() == paths.checkpoint_path(repo, variant).read_bytes()

    before = {r.info.run_id: r for r in runs_of(team, "team-dvc")}
    assert sorted(r.data.tags["variant"] for r in before.values()) == sorted(VARIANTS)
    sh(["mnist-pipeline", "evaluate", "--variant", "ffn1_relu"], clone, colleague)

    after = {r.info.run_id: r for r in runs_of(team, "team-dvc")}
    assert after.keys() == before.keys()  # no new run...
    assert not runs_of(team, "team-dvc", "tags.`record.source` = 'outputs'")
    (trained,) = [r for r in after.values() if r.data.tags["variant"] == "ffn1_relu"]
    md5 = file_md5(paths.checkpoint_path(clone, "ffn1_relu"))
    assert trained.data.tags["checkpoint.md5"] == md5  # ...the run that trained this checkpoint
    history = mlflow.MlflowClient(team.server.url).get_metric_history(
        trained.info.run_id, "test/accuracy"
    )
    # the trainer's evaluation (step 1; the exported forms' are at step 0): the colleague's same
    # outputs add nothing
    assert [m.step for m in history if m.step == record.EVALUATION_STEP] == [1]
    assert_complete(team, trained, "ffn1_relu")


# --- a queued sweep ------------------------------------------------------------------------------


def queue_workers(repo: Path) -> dict[int, int]:
    """{pid: process group} of the repository's live queue workers: `dvc queue start` spawns
    each in a process group of its own, with a pid file; the experiments it runs are in its
    group."""
    workers = {}
    for pidfile in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("*.pid"):
        with suppress(ProcessLookupError, ValueError):
            pid = int(pidfile.read_text())
            workers[pid] = os.getpgid(pid)
    return workers


def queue_states(status: str) -> dict[str, str]:
    """{task: state} from `dvc queue status` (its first and last columns)."""
    states = ("Queued", "Running", "Success", "Failed")
    return {w[0]: w[-1] for line in status.splitlines() if (w := line.split()) and w[-1] in states}


@dataclass(frozen=True)
class Sweep:
    status: str  # `dvc queue status` once every task ended
    logs: str  # what the failed tasks logged, if any


@pytest.fixture(scope="module")
def sweep(shared, tmp_path_factory) -> Sweep:
    """docs/team.md's queued sweep on the `shared` clone: an experiment per learning rate of
    SWEEP_LRS, `dvc queue start -j 2`, until every task ended."""
    repo = shared.repo
    env = shared.env | {"MLFLOW_EXPERIMENT_NAME": "team-sweep", "MNIST_PIPELINE_HOST": "sweep"}
    (documented,) = {tuple(w[:5]) for w in doc_commands("dvc exp run --queue", "3.")}
    for lr in SWEEP_LRS:
        sh([DVC, *documented[1:], "-S", f"variants.ffn1_relu.lr={lr}"], repo, env)
    started = tmp_path_factory.mktemp("sweep") / "queue-start.log"
    groups: set[int] = set()
    try:
        # Not through pipes: the workers it starts inherit its stdout and stderr, and a reader of
        # a pipe waits for every holder to close it, i.e. for the workers to end.
        with open(started, "w") as log:
            start = subprocess.run(
                [DVC, "queue", "start", "-j", "2"],
                cwd=repo,
                env=env,
                stdout=log,
                stderr=log,
                timeout=120,
            )
        assert start.returncode == 0, started.read_text()
        deadline = time.monotonic() + 540
        while len(pidfiles := list((repo / ".dvc/tmp/exps/celery").glob("*.pid"))) < 2:
            assert time.monotonic() < deadline, "the queue workers did not start"
            time.sleep(0.2)
        assert len(pidfiles) == 2
        # Wait for every task to end, not for the workers: a worker can outlive an empty queue
        # (DVC's race: the first worker to stop wipes the broker, the other's stop message with
        # it; treeverse/dvc#10427). docs/team.md says so; the `finally` below ends it.
        while True:
            workers = queue_workers(repo)  # read before the status: one may end just after it
            groups |= set(workers.values())
            status = sh([DVC, "queue", "status"], repo, env)
            ended = [s for s in queue_states(status).values() if s in ("Success", "Failed")]
            if len(ended) == len(SWEEP_LRS):
                break
            assert workers, "the queue workers stopped with tasks left:\n" + status
            assert time.monotonic() < deadline, status
            time.sleep(3)
    finally:
        if queue_workers(repo):
            stop = [DVC, "queue", "stop", "--kill"]
            with suppress(subprocess.TimeoutExpired):  # the groups are killed below in any case
                subprocess.run(stop, cwd=repo, env=env, capture_output=True, timeout=60)
        for group in groups:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    status = sh([DVC, "queue", "status"], repo, env)
    failed = [task for task, state in queue_states(status).items() if state == "Failed"]
    logs = [
        subprocess.run(
            [DVC, "queue", "logs", task], cwd=repo, env=env, capture_output=True, timeout=60
        ).stdout.decode(errors="replace")
        for task in failed
    ]
    return Sweep(status, "\n".join(logs)[-4000:])


def test_every_task_of_a_queued_sweep_succeeds(sweep):
    assert sweep.status.count("Success") == len(SWEEP_LRS), sweep.status + sweep.logs


def test_each_experiment_of_the_sweep_has_a_run_of_its_own_on_the_server(team, sweep, as_client):
    runs = runs_of(team, "team-sweep")
    assert sorted(r.data.params["lr"] for r in runs) == sorted(SWEEP_LRS)  # told apart
    assert {r.data.tags["host"] for r in runs} == {"sweep"}


def test_the_sweeps_runs_arrive_complete(team, sweep, as_client):
    for run in runs_of(team, "team-sweep"):
        assert_complete(team, run, "ffn1_relu")


# --- the server goes away mid-run ----------------------------------------------------------------


# --- who may do what -----------------------------------------------------------------------------

CAROL, CAROL_PASSWORD = "carol", "team-test-carol-pw"  # a trainer made, then refused, mid-run


def refusal(team: Team, code: int, who: str) -> str:
    """The line check_reachable gives for an HTTP refusal."""
    if code == 401:
        return (
            f"the MLflow tracking server at {team.server.url} refused {who} (HTTP 401 "
            "Unauthorized); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "~/.mlflow/credentials) to your account on that server"
        )
    return (
        f"the MLflow tracking server at {team.server.url} refused {who} writing runs to "
        "experiment 'Default' (HTTP 403 Forbidden: a read-only account); ask the server's owner "
        "to make it a trainer (docs/team.md), or set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to a trainer's account"
    )


def test_no_account_a_wrong_password_a_viewer_or_an_untrusted_certificate_stop_before_any_work(
    team, tiny_env, capsys, monkeypatch, as_client
):
    """Each is one line before any data is loaded, and the store is as it was."""
    untrusted = (
        f"cannot verify the TLS certificate of the MLflow tracking server at {team.server.url} "
        "(certificate verify failed: unable to get local issuer certificate); set "
        "MLFLOW_TRACKING_SERVER_CERT_PATH to the team's CA certificate (docs/team.md)"
    )
    anonymous = refusal(team, 401, "a client without credentials")
    wrong = refusal(team, 401, f"the password of user '{TRAINER}'")
    viewer = refusal(team, 403, f"user '{VIEWER}'")
    cases = [  # (user, password, trust the CA, commands, the line)
        (None, None, True, ("train", "evaluate", "compare"), anonymous),
        (TRAINER, "not-" + TRAINER_PASSWORD, True, ("train", "compare"), wrong),
        (VIEWER, VIEWER_PASSWORD, True, ("train", "evaluate"), viewer),
        (TRAINER, TRAINER_PASSWORD, False, ("train", "compare"), untrusted),
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.server.url)
    before = team.postgres.dump("mlflow")
    for user, password, trusted, commands, expected in cases:
        sign_in(monkeypatch, team, user, password)
        if not trusted:
            monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        for command in commands:
            args = [command] if command == "compare" else [command, "--variant", "ffn1_relu"]
            code, err = cli(capsys, *args)
            assert code == 1
            assert one_line(err) == f"mnist-pipeline {command}: error: {expected}"
            print(one_line(err))  # for the record: `pytest -rA` shows what a user sees
    assert not (tiny_env / "data").exists() and not (tiny_env / "models").exists()
    assert team.postgres.dump("mlflow") == before  # nothing changed on the server


def test_a_viewer_reads_the_runs_and_cannot_log_register_or_move_the_alias(team, shared, as_client):
    """The trainers' pipelines (the `shared` clone, and the two hosts when they ran) registered
    their models and set `champion`; the viewer (this process) sees all of it and changes none of
    it."""
    client = mlflow.MlflowClient(team.server.url)
    assert {r.data.tags["variant"] for r in runs_of(team, "team-dvc")} == set(VARIANTS)
    name = registry.model_name("mnist", "ffn1_relu")
    champion = client.get_model_version_by_alias(name, registry.ALIAS)  # the registry reads too
    run = client.get_run(champion.run_id)
    assert run.data.tags["variant"] == "ffn1_relu" and "test/accuracy" in run.data.metrics
    attempts = {
        "log a metric": lambda: client.log_metric(run.info.run_id, "test/accuracy", 1.0),
        "start a run": lambda: client.create_run(run.info.experiment_id),
        "register a version": lambda: client.create_model_version(
            name, champion.source, run_id=champion.run_id
        ),
        "move the alias": lambda: client.set_registered_model_alias(
            name, registry.ALIAS, champion.version
        ),
        "delete the alias": lambda: client.delete_registered_model_alias(name, registry.ALIAS),
    }
    before = team.postgres.dump("mlflow")
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException, match="error code 403") as refused:
            attempt()
        print(f"viewer may not {what}: {refused.value}")
    assert team.postgres.dump("mlflow") == before


def test_an_account_refused_mid_run_keeps_the_results(
    team, tiny_data, monkeypatch, capsys, as_client
):
    """A trainer's grant is revoked after epoch 1 of 3 (the owner's doing): training goes on,
    keeps its results and says how to record them; a trainer's account then records them."""
    variant, experiment = "ffn1_relu", "team-refused-mid-run"
    params = project_params()
    params["variants"][variant]["epochs"] = 3
    (tiny_data / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    owner = AuthServiceClient(team.server.url)
    sign_in(monkeypatch, team, "admin", ADMIN_PASSWORD)
    owner.create_user(CAROL, CAROL_PASSWORD)
    owner.grant_user_permission(CAROL, "experiment", "*", "EDIT")
    # The owner's experiment: its creator would hold MANAGE on it, whatever the grants.
    mlflow.MlflowClient(team.server.url).create_experiment(experiment)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    sign_in(monkeypatch, team, CAROL, CAROL_PASSWORD)
    real_call = record.EpochLogger.__call__

    def log_then_revoke(self, row, epoch):
        real_call(self, row, epoch)
        if epoch == 1:  # the owner, from another host, takes the grant back
            revoked = requests.post(
                f"{team.server.url}/api/3.0/mlflow/users/permissions/revoke",
                json={"username": CAROL, "resource_type": "experiment", "resource_id": "*"},
                auth=("admin", ADMIN_PASSWORD),
                verify=str(team.server.ca),
                timeout=30,
            )
            assert revoked.status_code == 200, revoked.text

    monkeypatch.setattr(record.EpochLogger, "__call__", log_then_revoke)
    code, err = cli(capsys, "train", "--variant", variant)
    stop_system_metrics()
    monkeypatch.setattr(record.EpochLogger, "__call__", real_call)  # the revoke was once

    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    print(line)
    assert f"the tracking store at {team.server.url} failed during training" in line
    assert "403" in line and "training finished and its results are saved" in line
    checkpoint = paths.checkpoint_path(tiny_data, variant)
    assert (
        checkpoint.is_file() and paths.pipeline_outputs(tiny_data, variant).train_metrics.is_file()
    )
    history = paths.pipeline_outputs(tiny_data, variant).history.read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]
    (advice,) = re.findall(r"`(mnist-pipeline sync)`", line)

    sign_in(monkeypatch, team, TRAINER, TRAINER_PASSWORD)
    code, err = cli(capsys, *shlex.split(advice)[1:])
    assert code == 0, err
    (recorded,) = runs_of(team, experiment, "tags.`record.source` = 'outputs'")
    assert recorded.data.tags["checkpoint.md5"] == file_md5(checkpoint)


# --- secrets -------------------------------------------------------------------------------------


def is_secret_holder(team: Team, path: Path) -> bool:
    """The files meant to hold a secret: the server's accounts file (the database password: the
    server's own), a DVC clone's .dvc/config.local (the remote's key, which git ignores) and a
    host's ~/.mlflow/credentials (its password)."""
    return (
        path == team.server.etc / "basic_auth.ini"
        or path.parts[-2:] == (".dvc", "config.local")
        or path.parts[-2:] == (".mlflow", "credentials")
    )


def test_no_secret_reaches_the_store_the_bucket_the_logs_or_the_working_trees(
    team, shared, tmp_path_factory
):
    """After the module's team work (in file order, this test is last; alone, it has the DVC
    clone's pipeline run): none of the passwords and keys used is in the tracking store, the
    accounts store (it keeps password hashes), an object of the bucket, a log, a file of any
    host's working tree (DVC files and git history included), but in the files meant for them."""
    found = []
    for database in ("mlflow", "mlflow_auth"):
        dump = team.postgres.dump(database)
        found += [(f"database {database}", s) for s in SECRETS if s in dump]
    s3 = team.s3.client()
    keys = team.s3.keys("")
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        found += [(f"s3://{BUCKET}/{key}", s) for s in SECRETS if s.encode() in body]
    scanned = 0
    for path in tmp_path_factory.getbasetemp().rglob("*"):
        if path.is_file() and not path.is_symlink() and not is_secret_holder(team, path):
            data = path.read_bytes()
            scanned += 1
            found += [(str(path), s) for s in SECRETS if s.encode() in data]
    history = sh(["git", "log", "-p", "--all"], shared.repo, shared.env)
    found += [("git history", s) for s in SECRETS if s in history]
    assert not found
    assert scanned > 100 and len(keys) > 10  # the scan saw the team's work
    logs = [p.name for p in team.base.rglob("*.log")]
    assert {"mlflow-server.log", "moto.log"} <= set(logs)
