"""docs/team.md, run as a team follows it, on real engines on 127.0.0.1: PostgreSQL, S3-compatible
storage that enforces each key's policy (moto's server), `mlflow server` started as its systemd
unit would start it, and the hosts (a trainer, a viewer) with DVC.

The page is the script (tests/team_docs.py runs its blocks as written, in order, its
`<PLACEHOLDERS>` filled; tests/team_servers.py gives each block its machine). The module does,
once, what the page's section 1 says (the database, the storage's bucket and keys, the
certificate, the server's files and unit, the accounts), and sections 2 and 3 for two hosts (a
trainer clones the project, names the DVC remote, sets the trainers' key, runs `dvc repro` and
`dvc push`, commits and pushes; a viewer clones, sets the viewers' key, runs `dvc pull` and
`mnist-pipeline compare`). Then, as a team would:

- no secret is on a command line, in the page's commands or in any running process; each key
  reaches only its role's prefix of the bucket;
- two hosts train at the same time, and `compare` shows them side by side;
- a pulled checkpoint keeps its run; a queued sweep lands on the server complete;
- no credentials, a wrong password, a viewer that would write, and a host that does not trust the
  certificate are refused in one line before any work, naming the experiment the stage writes
  to; a viewer's `dvc repro` says how to restore what DVC deleted; an account with no grant trains
  into an experiment of its own; a viewer reads runs and cannot log, register or move the alias;
  an account refused mid-run keeps its results;
- at the end, the secrets used (passwords, keys) are nowhere in the store, the bucket, the logs or
  the working trees, and the server's log holds no driver traceback.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from botocore.exceptions import ClientError
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from packaging.requirements import Requirement

from mnist_pipeline import paths
from mnist_pipeline.cli import main
from mnist_pipeline.compare import compare
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.record import evaluation as registry
from mnist_pipeline.record import training as record
from tests.conftest import Mirror, tiny_params
from tests.helpers import (
    DVC,
    GIT_IDENTITY,
    cli,
    free_port,
    one_line,
    project_repo,
    ran_stages,
    sh,
    stop_system_metrics,
    up_to_date,
)
from tests.team_docs import (
    NOT_RUN,
    PLACEHOLDER,
    Block,
    Shell,
    Values,
    bash_block,
    blocks,
    file_block,
    fill,
    run,
    write_file,
)
from tests.team_servers import (
    ADMIN_PASSWORD,
    BIN,
    DB_PASSWORD,
    FLASK_SECRET_KEY,
    PASSWORDS,
    S3,
    TRAINER,
    TRAINER_PASSWORD,
    VIEWER,
    VIEWER_PASSWORD,
    Key,
    MlflowServer,
    Postgres,
    clean_env,
    database_host,
    mlflow_server,
    process_group,
    s3_server,
)

pytestmark = pytest.mark.team  # about 3 minutes: `make test` runs it after the default run

# docs/team.md's bash blocks, in the page's order, by the names this module runs them by.
PAGE = {
    "database": "the database host, as its postgres user",
    "policies": "the storage administrator: the keys' policies",
    "aws": "the storage administrator, AWS S3: the bucket, a user per role, its policy and its key",
    "minio": "the storage administrator, MinIO: the bucket and a key per role",
    "certificate": "the server host, as root: the team CA, the server's key and certificate",
    "install": "the server host, as root: the server's user and its Python environment",
    "start": (
        "the server host, as root: each file readable by who needs it; start the server, now "
        "and at boot"
    ),
    "health": "any host: is the server up?",
    "accounts": "the owner: the accounts and the trainers' grants",
    "try-out": "one machine, a try-out",
    "clone": "every host: the project and its environment",
    "settings": "every host's settings",
    "gpu": "a GPU host, after the steps of every host",
    "remote": "a trainer, once for the whole team: the remote",
    "dvc-key": "every host, once: DVC reads its key from that file",
    "train-push": "a trainer: train, share the files, commit what they are",
    "pull": "a viewer: the files of the latest commit, and the runs",
    "sweep": "a trainer: a sweep from DVC's queue",
    "compare": "any host: compare",
}
# ...and those no test here runs, with the reason.
NOT_RUN_BLOCKS = {
    "minio": "no MinIO here: the same policies go to the test's storage by the AWS block",
    "try-out": "MLflow's plain server: tests/test_server.py",
    "gpu": "no GPU here: tests/test_gpu.py",
    "compare": "compare's options: tests/test_server.py; the viewer's block runs `compare`",
}
BUCKET = "ml-team"
EXPERIMENT = "mnist-pipeline-mnist"  # the pipeline's, where the page's hosts train
# One variant: the server, the bucket, the DVC remote and the queue carry any variant alike, and
# each variant costs every host a training and an evaluation, and the DVC repository's `dvc repro`
# three stage processes. `compare`'s table of several variants: test_server.py.
VARIANTS = ("ffn1_relu",)
HOSTS = ("laptop", "gpu-box")


def doc(name: str) -> Block:
    block = bash_block(PAGE[name])
    assert block.title == PAGE[name], block.title
    return block


@dataclass(frozen=True)
class Team:
    postgres: Postgres
    s3: S3
    server: MlflowServer
    base: Path  # the module's temporary folder
    values: Values  # the page's placeholders, paths and ports, as section 1 filled them
    keys: dict[str, Key]  # the storage's keys, by role: mlflow-server, dvc-trainer, dvc-viewer

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every password and secret key the set-up uses."""
        return (*PASSWORDS, *(k.secret for k in self.keys.values()), self.s3.admin.secret)


def machine_values(postgres: Postgres, s3: S3, etc: Path) -> Values:
    """The page's placeholders, and the machine's paths and ports the test moves."""
    return Values(
        placeholders={
            "<MLFLOW_HOST>": "localhost",  # the certificate's name, by which clients reach it
            "<SERVER_ADDRESS>": "127.0.0.1",
            "<DB_HOST>": "127.0.0.1",
            "<BUCKET>": BUCKET,
            "<S3_ENDPOINT>": s3.endpoint,
            "<DB_PASSWORD>": DB_PASSWORD,
            "<ADMIN_PASSWORD>": ADMIN_PASSWORD,
            "<FLASK_SECRET_KEY>": FLASK_SECRET_KEY,
        },
        paths={
            "/var/lib/postgresql/mlflow": str(postgres.data),
            "/etc/mlflow": str(etc),
            "/opt/mlflow-server/bin/": f"{BIN}/",
        },
        ports={"5000": str(free_port()), "5432": str(postgres.port)},
    )


def storage_keys(s3: S3, home: Path, values: Values) -> dict[str, Key]:
    """The storage administrator's blocks: the policies, the bucket, a user and key per role;
    the keys, from the files the page's commands wrote them to."""
    home.mkdir()
    admin = Shell(home, s3.admin_env(home))
    run(doc("policies"), admin, values)
    run(doc("aws"), admin, values)
    keys = {}
    for path in sorted((home / "team-keys").glob("*.key.json")):
        made = json.loads(path.read_text())["AccessKey"]
        role = path.name.removesuffix(".key.json")
        keys[role] = Key(made["AccessKeyId"], made["SecretAccessKey"])
    assert set(keys) == {"mlflow-server", "dvc-trainer", "dvc-viewer"}
    return keys


def owner_shell(home: Path, server: MlflowServer, values: Values) -> Shell:
    """The owner's shell: team-ca.pem and the owner's curl file in ~/.mlflow."""
    (home / ".mlflow").mkdir(parents=True)
    shutil.copy(server.ca, home / ".mlflow" / "team-ca.pem")
    write_file("~/.mlflow/admin.curlrc", values, home / ".mlflow" / "admin.curlrc")
    return Shell(home, clean_env() | {"HOME": str(home)})


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    """Section 1 of docs/team.md in its order: the database, the storage and its keys, the
    certificate, the server's files, the server (as its unit starts it), the accounts."""
    base = tmp_path_factory.mktemp("team")
    with ExitStack() as stack:
        postgres = stack.enter_context(database_host())
        s3 = stack.enter_context(s3_server(base))
        etc = base / "etc"
        values = machine_values(postgres, s3, etc)
        run(doc("database"), postgres.shell(), values, stdin=f"{DB_PASSWORD}\n" * 2)
        postgres.throw_away()
        keys = storage_keys(s3, base / "storage-admin", values)
        server_key = keys["mlflow-server"]
        values |= {"<SERVER_KEY_ID>": server_key.id, "<SERVER_SECRET_KEY>": server_key.secret}
        root = Shell(base, clean_env() | {"HOME": str(base)})
        run(doc("certificate"), root, values)
        run(doc("install"), root, values)
        for path in ("/etc/mlflow/basic_auth.ini", "/etc/mlflow/server.env"):
            write_file(path, values)
        run(doc("start"), root, values)
        unit = file_block("/etc/systemd/system/mlflow.service").text
        server = stack.enter_context(mlflow_server(unit, values, etc, base / "mlflow-server.log"))
        owner = owner_shell(base / "owner", server, values)
        health = run(doc("health"), replace(owner, cwd=owner.cwd / ".mlflow"), values)
        assert health.strip() == "OK"
        run(doc("accounts"), owner, values, stdin=f"{TRAINER_PASSWORD}\n{VIEWER_PASSWORD}\n")
        yield Team(postgres, s3, server, base, values, keys)
        mlflow.set_tracking_uri(None)  # the server goes away: no process-wide pointer to it


def project_params() -> dict:
    params = tiny_params()
    params["variants"] = {v: params["variants"][v] for v in VARIANTS}
    return params


def host_env(home: Path, mirror: Mirror) -> dict[str, str]:
    """A host's environment before its settings: its home, the project's tools on PATH, the
    tests' data mirror, no AWS settings (no ~/.aws either: the home is new)."""
    return clean_env() | {
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "MNIST_MIRROR": str(mirror.folder),
        "MNIST_CHECKSUMS_FILE": str(mirror.checksums),
        **GIT_IDENTITY,
    }


@dataclass(frozen=True)
class Host:
    label: str
    home: Path
    shell: Shell  # in its clone of the project, its settings as the shell's profile
    values: Values  # the team's, and this host's own: label, account, DVC key

    @property
    def repo(self) -> Path:
        return self.shell.cwd

    def run(self, name: str, stdin: str = "") -> str:
        return run(doc(name), self.shell, self.values, stdin=stdin)


def new_host(
    team: Team, home: Path, label: str, account: tuple[str, str], key: Key, mirror: Mirror, git: str
) -> Host:
    """Section 2 of the page for one host: its account's credentials file, the CA's
    certificate, its settings, the project cloned; and its DVC credentials file (3.)."""
    values = team.values | {
        "<HOST_LABEL>": label,
        "<MLFLOW_USER>": account[0],
        "<MLFLOW_PASSWORD>": account[1],
        "<DVC_KEY_ID>": key.id,
        "<DVC_SECRET_KEY>": key.secret,
        "<GIT_URL>": git,
    }
    (home / ".mlflow").mkdir(parents=True)
    shutil.copy(team.server.ca, home / ".mlflow" / "team-ca.pem")
    write_file("~/.mlflow/credentials", values, home / ".mlflow" / "credentials")
    dvc_credentials = home / ".config" / "mnist-pipeline" / "dvc-credentials"
    write_file("~/.config/mnist-pipeline/dvc-credentials", values, dvc_credentials)
    shell = Shell(home, host_env(home, mirror), profile=fill(doc("settings").text, values))
    run(doc("clone"), shell, values)
    return Host(label, home, replace(shell, cwd=home / "mnist-pipeline"), values)


def team_repository(base: Path, env: dict[str, str]) -> str:
    """The project as the team keeps it (the page's <GIT_URL>): a bare repository."""
    work = base / "project"
    work.mkdir()
    project_repo(work, project_params(), env)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "the project"], work, env)
    sh(["git", "clone", "-q", "--bare", str(work), str(base / "origin.git")], base, env)
    return str(base / "origin.git")


@dataclass(frozen=True)
class DocFlow:
    trainer: Host
    viewer: Host
    trained: str  # what the trainer's block printed
    viewed: str  # what the viewer's block printed


@pytest.fixture(scope="module")
def doc_flow(team, tiny_mirror, tmp_path_factory) -> DocFlow:
    """Sections 2 and 3 of the page, as a team follows them: a trainer clones the project,
    names the DVC remote for the team, sets the trainers' DVC key, trains, pushes the files and
    commits; then a viewer clones, sets the viewers' key, pulls and compares."""
    base = tmp_path_factory.mktemp("hosts")
    git = team_repository(base, host_env(base, tiny_mirror))
    account, key = (TRAINER, TRAINER_PASSWORD), team.keys["dvc-trainer"]
    trainer = new_host(team, base / "alice", "trainer", account, key, tiny_mirror, git)
    trainer.run("remote")
    trainer.run("dvc-key")
    trained = trainer.run("train-push")
    account, key = (VIEWER, VIEWER_PASSWORD), team.keys["dvc-viewer"]
    viewer = new_host(team, base / "bob", "viewer", account, key, tiny_mirror, git)
    viewer.run("dvc-key")
    viewed = viewer.run("pull")
    return DocFlow(trainer, viewer, trained, viewed)


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
    """This test process as a client: no S3 credentials either; it reads as the viewer. It
    downloads models through the server: moto cannot check a presigned URL's signature while it
    checks keys (team_servers.s3_server), and the server's presigned downloads would fail."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(team.base / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(team.base / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    sign_in(monkeypatch, team, VIEWER, VIEWER_PASSWORD)


def runs_of(team: Team, experiment: str, filter_string: str = "") -> list:
    """The experiment's training runs (not the exported forms' child runs) that `filter_string`
    picks."""
    client = mlflow.MlflowClient(team.server.url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server"
    training = "tags.`run.kind` != 'form'"
    where = f"{filter_string} and {training}" if filter_string else training
    return client.search_runs([found.experiment_id], where, max_results=1000)


def load_logged_model(run, variant: str) -> mlflow.pyfunc.PyFuncModel:
    """The run's logged model (its PyTorch form), loaded through the server."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND tags.`export.form` = 'torch'",
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


# --- the page ------------------------------------------------------------------------------------


def test_every_block_of_the_page_runs_here_or_says_why_not():
    """The page's bash blocks are the ones this module runs, in the page's order; a new one
    fails here until a test runs it (or says why none does)."""
    assert [b.title for b in blocks("bash")] == list(PAGE.values())
    assert set(NOT_RUN_BLOCKS) <= set(PAGE)
    lines = {line for b in blocks("bash") for line in b.text.splitlines()}
    assert set(NOT_RUN) <= lines, set(NOT_RUN) - lines  # no reason for a line the page dropped


def test_no_secret_is_in_a_command_of_the_page():
    """Secrets go into files (the ini blocks) or are typed at prompts: no command of the page
    holds one, so none is ever on a command line or in a shell's history."""
    secret = re.compile(r"<[A-Z_]*(PASSWORD|SECRET)[A-Z_]*>")
    in_files = {s for b in blocks("ini") for s in secret.findall(b.text)}
    assert in_files  # the files do hold them
    for block in blocks("bash"):
        assert not [p for p in PLACEHOLDER.findall(block.text) if secret.fullmatch(p)], block.title


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


def test_the_documented_packages_are_installed(team):
    """The server's `pip install` line (which no test runs) names what runs here, drivers
    included; the store URI of its environment file loads its driver (with only psycopg2
    installed, SQLAlchemy 2.1 reads `postgresql://` as psycopg 3, and `mlflow server` stopped at
    once)."""
    import sqlalchemy.engine

    (line,) = [line for line in doc("install").text.splitlines() if " install " in line]
    requirements = shlex.split(line)[2:]
    assert {Requirement(r).name for r in requirements} == {"mlflow", "psycopg", "boto3"}
    problems = [p for r in requirements for p in installed(r)]
    assert not problems, problems
    uri = team.server.env["MLFLOW_BACKEND_STORE_URI"]
    sqlalchemy.engine.make_url(uri).get_dialect().import_dbapi()  # raises if the driver is absent
    assert "--app-name" in team.server.command
    assert team.server.command[team.server.command.index("--app-name") + 1] == "basic-auth"


# --- secrets and keys ----------------------------------------------------------------------------


def command_lines() -> dict[int, str]:
    """{pid: its command line} of every process on the machine, as `ps` shows them to anyone."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
    return {pid: line.decode(errors="replace") for pid, line in found.items()}


def test_no_secret_is_on_any_command_line(team, doc_flow):
    """With the database, the storage, the server and its workers running: no password or key
    in any process's command line. The server has them in its environment, which Linux shows
    to the process's own user (and root) only."""
    lines = command_lines()
    server = [pid for pid, line in lines.items() if "mlflow" in line and "server" in line]
    assert team.server.proc.pid in server and len(lines) > 5
    leaks = [(pid, s) for pid, line in lines.items() for s in team.secrets if s in line]
    assert not leaks
    environ = Path(f"/proc/{team.server.proc.pid}/environ")
    assert DB_PASSWORD.encode() in environ.read_bytes()
    assert environ.stat().st_mode & 0o077 == 0


def denied(call: Callable[[], object]) -> bool:
    """Whether the storage refuses `call` (HTTP 403, AccessDenied)."""
    try:
        call()
    except ClientError as err:
        return err.response["Error"]["Code"] == "AccessDenied"
    return False


def test_the_viewers_key_reads_the_dvc_remote_and_cannot_write_or_delete(team, doc_flow):
    viewer = team.s3.client(team.keys["dvc-viewer"])
    pushed = team.s3.keys(BUCKET, "mnist-dvc/")
    assert viewer.get_object(Bucket=BUCKET, Key=pushed[0])["Body"].read()
    new = "mnist-dvc/files/md5/00/0123456789abcdef0123456789abcd"
    assert denied(lambda: viewer.put_object(Bucket=BUCKET, Key=new, Body=b"x"))
    assert denied(lambda: viewer.put_object(Bucket=BUCKET, Key=pushed[0], Body=b"x"))
    assert denied(lambda: viewer.delete_object(Bucket=BUCKET, Key=pushed[0]))
    batch = viewer.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in pushed]})
    assert {e["Code"] for e in batch["Errors"]} == {"AccessDenied"} and not batch.get("Deleted")
    artifact = team.s3.keys(BUCKET, "mlflow-artifacts/")[0]
    assert denied(lambda: viewer.get_object(Bucket=BUCKET, Key=artifact))
    assert team.s3.keys(BUCKET, "mnist-dvc/") == pushed


def test_the_trainers_key_cannot_touch_the_servers_artifacts(team, doc_flow):
    trainer = team.s3.client(team.keys["dvc-trainer"])
    artifacts = team.s3.keys(BUCKET, "mlflow-artifacts/")
    assert denied(lambda: trainer.get_object(Bucket=BUCKET, Key=artifacts[0]))
    assert denied(lambda: trainer.put_object(Bucket=BUCKET, Key=artifacts[0], Body=b"x"))
    assert denied(lambda: trainer.delete_object(Bucket=BUCKET, Key=artifacts[0]))
    assert team.s3.keys(BUCKET, "mlflow-artifacts/") == artifacts


def test_the_servers_key_reaches_only_the_artifacts(team, doc_flow):
    server = team.s3.client(team.keys["mlflow-server"])
    pushed = team.s3.keys(BUCKET, "mnist-dvc/")
    assert denied(lambda: server.get_object(Bucket=BUCKET, Key=pushed[0]))
    assert denied(lambda: server.delete_object(Bucket=BUCKET, Key=pushed[0]))
    assert denied(lambda: server.put_object(Bucket=BUCKET, Key="elsewhere/x", Body=b"x"))


# --- two hosts, one server -----------------------------------------------------------------------


def make_project(root: Path, mirror: Mirror) -> Path:
    """A host's copy of the project: params (one variant, one short epoch) and the data."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    shutil.copytree(mirror.raw, root / "data" / "mnist")
    return root


def test_two_hosts_train_at_once_and_compare_shows_both(
    team, tiny_mirror, tmp_path, monkeypatch, capsys, as_client
):
    """Both hosts as the page sets a host (its settings, the CA's certificate); one signs in
    with MLflow's credentials file, the other with the environment (CI's way)."""
    experiment = "team-two-hosts"
    commands = " && ".join(
        f"mnist-pipeline {stage} --variant {v}" for v in VARIANTS for stage in ("train", "evaluate")
    )
    commands += " && mnist-pipeline sync"  # the record of the evaluation, as `dvc repro` ends
    with ExitStack() as stack:
        jobs = {}
        for host in HOSTS:
            home = tmp_path / f"{host}-home"
            values = team.values | {"<HOST_LABEL>": host}
            values |= {"<MLFLOW_USER>": TRAINER, "<MLFLOW_PASSWORD>": TRAINER_PASSWORD}
            (home / ".mlflow").mkdir(parents=True)
            shutil.copy(team.server.ca, home / ".mlflow" / "team-ca.pem")
            env = host_env(home, tiny_mirror) | {"MLFLOW_EXPERIMENT_NAME": experiment}
            if host == "gpu-box":
                write_file("~/.mlflow/credentials", values, home / ".mlflow" / "credentials")
            else:
                env |= {"MLFLOW_TRACKING_USERNAME": TRAINER}
                env |= {"MLFLOW_TRACKING_PASSWORD": TRAINER_PASSWORD}
            root = make_project(tmp_path / host, tiny_mirror)
            script = f"{fill(doc('settings').text, values)}\n{commands}"
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
    for run_ in runs:
        assert "time/train_seconds" in run_.data.metrics
        assert_complete(team, run_, run_.data.tags["variant"])
    # The models went through the server into the bucket, under the server's prefix.
    stored = team.s3.keys(BUCKET, "mlflow-artifacts/")
    assert sum(key.endswith("/MLmodel") for key in stored) >= len(runs)

    table = compare(load_params(root / "params.yaml"), root)
    groups = sorted(table.columns.get_level_values(0).unique())
    assert groups == ["gpu-box · cpu", "laptop · cpu"]
    assert list(table.index) == list(VARIANTS)
    for group in groups:
        for variant in VARIANTS:
            assert 0 < table.loc[variant, (group, "test/accuracy")] <= 1
    assert compared == 0
    assert "laptop · cpu" in printed and "gpu-box · cpu" in printed


# --- the DVC remote: the page's trainer and viewer -----------------------------------------------


def test_the_trainer_trains_pushes_and_commits(team, doc_flow):
    expected = {"download", *(f"{s}@{v}" for s in ("train", "evaluate") for v in VARIANTS)}
    assert expected <= set(ran_stages(doc_flow.trained))
    assert team.s3.keys(BUCKET, "mnist-dvc/")  # the push reached the bucket
    env = doc_flow.trainer.shell.env
    status = sh(["git", "status", "--porcelain"], doc_flow.trainer.repo, env)
    assert not status.strip(), status  # everything the pipeline wrote is committed or DVC's
    origin = sh(["git", "log", "--oneline", "origin/HEAD"], doc_flow.trainer.repo, env)
    assert "Retrain" in origin and "DVC remote" in origin  # and pushed


def test_the_dvc_key_stays_out_of_git_and_of_the_projects_settings(team, doc_flow):
    """DVC's settings name the remote (git carries them) and the key's file (`--local`, which
    git ignores); the key itself is in that file only."""
    repo, env = doc_flow.trainer.repo, doc_flow.trainer.shell.env
    tracked = sh(["git", "ls-files", ".dvc"], repo, env).split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    settings = (repo / ".dvc" / "config").read_text() + (repo / ".dvc" / "config.local").read_text()
    assert team.s3.endpoint in settings and "dvc-credentials" in settings
    assert not [s for s in team.secrets if s in settings]


def test_the_viewer_pulls_the_files_the_trainer_pushed(doc_flow):
    viewer, trainer = doc_flow.viewer, doc_flow.trainer
    for variant in VARIANTS:
        pulled = paths.pipeline_outputs(viewer.repo, variant).checkpoint.read_bytes()
        assert pulled == paths.pipeline_outputs(trainer.repo, variant).checkpoint.read_bytes()
    assert up_to_date(sh([DVC, "status"], viewer.repo, viewer.shell.env))


def test_the_viewers_compare_shows_the_trainers_run(doc_flow):
    table = doc_flow.viewed[doc_flow.viewed.index(f"{EXPERIMENT} at") :]
    assert "trainer · cpu" in table
    assert all(variant in table for variant in VARIANTS)


def test_a_trainer_in_a_pulled_clone_adds_no_run(team, doc_flow, as_client):
    """The checkpoint pulled from the remote keeps its link to the run that trained it: a
    trainer evaluating it in the viewer's clone (a trainer's account, from the environment,
    which wins over the credentials file) logs into that run, and adds none."""
    viewer = doc_flow.viewer
    before = {r.info.run_id: r for r in runs_of(team, EXPERIMENT)}
    env = viewer.shell.env | {
        "MLFLOW_TRACKING_USERNAME": TRAINER,
        "MLFLOW_TRACKING_PASSWORD": TRAINER_PASSWORD,
    }
    script = (
        f"{viewer.shell.profile}\nmnist-pipeline evaluate --variant ffn1_relu\nmnist-pipeline sync"
    )
    sh(["bash", "-ec", script], viewer.repo, env)

    after = {r.info.run_id: r for r in runs_of(team, EXPERIMENT)}
    assert after.keys() == before.keys()  # no new run...
    assert not runs_of(team, EXPERIMENT, "tags.`record.source` = 'outputs'")
    (trained,) = [r for r in after.values() if r.data.tags["variant"] == "ffn1_relu"]
    md5 = file_md5(paths.pipeline_outputs(viewer.repo, "ffn1_relu").checkpoint)
    assert trained.data.tags["checkpoint.md5"] == md5  # ...the run that trained this checkpoint
    history = mlflow.MlflowClient(team.server.url).get_metric_history(
        trained.info.run_id, "test/accuracy"
    )
    # one value: the same outputs add nothing, and the other forms' have names of their own
    assert len(history) == 1
    assert_complete(team, trained, "ffn1_relu")


def test_a_viewers_dvc_repro_is_refused_and_names_the_checkout_that_restores_the_outputs(
    team, doc_flow
):
    """`dvc repro -f` deletes the stage's outputs before it runs the stage, which refuses the
    viewer; the one line says which `dvc checkout` brings them back, and it does."""
    viewer = doc_flow.viewer
    checkpoint = paths.pipeline_outputs(viewer.repo, "ffn1_relu").checkpoint
    kept = checkpoint.read_bytes()
    script = f"{viewer.shell.profile}\n{DVC} repro -f -s train@ffn1_relu"
    done = subprocess.run(
        ["bash", "-c", script], cwd=viewer.repo, env=viewer.shell.env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("mnist-pipeline train: error:")]
    print(line)
    assert "Traceback" not in done.stderr
    assert f"refused user '{VIEWER}' writing runs to experiment '{EXPERIMENT}'" in line
    assert not checkpoint.exists()  # DVC deleted it before the stage ran
    (restore,) = re.findall(r"`([^`]+)` brings them back$", line)
    assert restore.endswith(" && dvc checkout train@ffn1_relu")  # and the metrics, from git
    sh(["bash", "-ec", restore], viewer.repo, viewer.shell.env)
    assert checkpoint.read_bytes() == kept
    assert up_to_date(sh([DVC, "status"], viewer.repo, viewer.shell.env))


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


def sweep_lrs() -> list[str]:
    """The learning rates of the page's sweep."""
    return sorted(re.findall(r"variants\.ffn1_relu\.lr=(\S+)", doc("sweep").text))


@dataclass(frozen=True)
class Sweep:
    status: str  # `dvc queue status` once every task ended
    logs: str  # what the failed tasks logged, if any


@pytest.fixture(scope="module")
def sweep(doc_flow) -> Sweep:
    """The page's queued sweep, in the trainer's clone (its runs into an experiment of their
    own, host label `sweep`), until every task ended."""
    trainer = doc_flow.trainer
    repo = trainer.repo
    values = trainer.values | {"<HOST_LABEL>": "sweep"}
    env = trainer.shell.env | {"MLFLOW_EXPERIMENT_NAME": "team-sweep"}
    shell = replace(trainer.shell, env=env, profile=fill(doc("settings").text, values))
    assert len(sweep_lrs()) == 2  # one experiment per worker: two jobs at once on one store
    groups: set[int] = set()
    try:
        run(doc("sweep"), shell, values)
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
            if len(ended) == len(sweep_lrs()):
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
    assert sweep.status.count("Success") == len(sweep_lrs()), sweep.status + sweep.logs


def test_each_experiment_of_the_sweep_has_a_run_of_its_own_on_the_server(team, sweep, as_client):
    runs = runs_of(team, "team-sweep")
    assert sorted(r.data.params["lr"] for r in runs) == sweep_lrs()  # told apart
    assert {r.data.tags["host"] for r in runs} == {"sweep"}


def test_the_sweeps_runs_arrive_complete(team, sweep, as_client):
    runs = runs_of(team, "team-sweep")
    assert len(runs) == len(sweep_lrs())  # the loop below asserts nothing on an empty list
    for run_ in runs:
        assert_complete(team, run_, "ffn1_relu")


# --- who may do what -----------------------------------------------------------------------------

CAROL, CAROL_PASSWORD = "carol", "team-test-carol-pw"  # a trainer made, then refused, mid-run
DAVE, DAVE_PASSWORD = "dave", "team-test-dave-pw"  # an account with no grant


def refusal(team: Team, code: int, who: str, experiment: str = EXPERIMENT) -> str:
    """The line check_reachable gives for an HTTP refusal."""
    if code == 401:
        return (
            f"the MLflow tracking server at {team.server.url} refused {who} (HTTP 401 "
            "Unauthorized); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "~/.mlflow/credentials) to your account on that server"
        )
    return (
        f"the MLflow tracking server at {team.server.url} refused {who} writing runs to "
        f"experiment '{experiment}' (HTTP 403 Forbidden: a read-only account); ask the server's "
        "owner to make it a trainer (docs/team.md), or set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to a trainer's account"
    )


def test_no_account_a_wrong_password_a_viewer_or_an_untrusted_certificate_stop_before_any_work(
    team, doc_flow, tiny_env, capsys, monkeypatch, as_client
):
    """Each is one line before any data is loaded, and the store is as it was. The viewer's
    names the experiment the stage writes to: the pipeline's, which the page's trainer made."""
    untrusted = (
        f"cannot verify the TLS certificate of the MLflow tracking server at {team.server.url} "
        "(certificate verify failed: unable to get local issuer certificate); set "
        "MLFLOW_TRACKING_SERVER_CERT_PATH to the team's CA certificate (docs/team.md)"
    )
    anonymous = refusal(team, 401, "a client without credentials")
    wrong = refusal(team, 401, f"the password of user '{TRAINER}'")
    viewer = refusal(team, 403, f"user '{VIEWER}'")
    cases = [  # (user, password, trust the CA, commands, the line)
        (None, None, True, ("train", "sync", "compare"), anonymous),
        (TRAINER, "not-" + TRAINER_PASSWORD, True, ("train", "compare"), wrong),
        (VIEWER, VIEWER_PASSWORD, True, ("train", "sync"), viewer),
        (TRAINER, TRAINER_PASSWORD, False, ("train", "compare"), untrusted),
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.server.url)
    before = team.postgres.dump("mlflow")
    for user, password, trusted, commands, expected in cases:
        sign_in(monkeypatch, team, user, password)
        if not trusted:
            monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        for command in commands:
            args = (
                [command] if command in ("compare", "sync") else [command, "--variant", "ffn1_relu"]
            )
            code, err = cli(capsys, *args)
            assert code == 1
            assert one_line(err) == f"mnist-pipeline {command}: error: {expected}"
            print(one_line(err))  # for the record: `pytest -rA` shows what a user sees
    assert not (tiny_env / "data").exists() and not (tiny_env / "models").exists()
    assert team.postgres.dump("mlflow") == before  # nothing changed on the server


def test_an_account_with_no_grant_trains_into_an_experiment_of_its_own(
    team, tiny_data, monkeypatch, capsys, as_client
):
    """On a server whose default permission is READ, an account with no grant may create an
    experiment, and MLflow makes it the experiment's manager: the pre-flight check lets it
    train there. A viewer is then refused writing to that experiment, by its name."""
    experiment = "daves-own"
    sign_in(monkeypatch, team, "admin", ADMIN_PASSWORD)
    owner = AuthServiceClient(team.server.url)
    owner.create_user(DAVE, DAVE_PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    sign_in(monkeypatch, team, DAVE, DAVE_PASSWORD)
    code, err = cli(capsys, "train", "--variant", "ffn1_relu")
    stop_system_metrics()
    assert code == 0, err
    (trained,) = runs_of(team, experiment)
    assert trained.info.status == "FINISHED"
    sign_in(monkeypatch, team, "admin", ADMIN_PASSWORD)
    permission = owner.get_user_permission(DAVE, "experiment", trained.info.experiment_id)
    assert permission.permission == "MANAGE"  # MLflow made its creator its manager

    sign_in(monkeypatch, team, VIEWER, VIEWER_PASSWORD)
    code, err = cli(capsys, "train", "--variant", "ffn1_relu")
    assert code == 1
    expected = refusal(team, 403, f"user '{VIEWER}'", experiment)
    assert one_line(err) == f"mnist-pipeline train: error: {expected}"


def test_a_viewer_reads_the_runs_and_cannot_log_register_or_move_the_alias(
    team, doc_flow, as_client
):
    """The trainers' pipelines (the page's trainer, and the two hosts when they ran) registered
    their models and set `champion`; the viewer (this process) sees all of it and changes none of
    it."""
    client = mlflow.MlflowClient(team.server.url)
    assert {r.data.tags["variant"] for r in runs_of(team, EXPERIMENT)} == set(VARIANTS)
    name = "mnist-ffn1_relu"
    champion = client.get_model_version_by_alias(name, registry.ALIAS)  # the registry reads too
    run_ = client.get_run(champion.run_id)
    assert run_.data.tags["variant"] == "ffn1_relu" and "test/accuracy" in run_.data.metrics
    attempts = {
        "log a metric": lambda: client.log_metric(run_.info.run_id, "test/accuracy", 1.0),
        "start a run": lambda: client.create_run(run_.info.experiment_id),
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
    checkpoint = paths.pipeline_outputs(tiny_data, variant).checkpoint
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


# --- at the end: the secrets and the logs --------------------------------------------------------


def is_secret_holder(team: Team, path: Path) -> bool:
    """The files meant to hold a secret, the page's: the server's environment file and accounts
    file, the storage administrator's key files, the owner's curl file, a host's MLflow
    credentials and DVC credentials. (A clone's .dvc/config.local is not one: it names the
    DVC credentials file.)"""
    return (
        (path.parent == team.server.etc and path.name in ("server.env", "basic_auth.ini"))
        or path.name.endswith(".key.json")
        or path.name == "admin.curlrc"
        or path.parts[-2:] == (".mlflow", "credentials")
        or path.name == "dvc-credentials"
    )


def test_no_secret_reaches_the_store_the_bucket_the_logs_or_the_working_trees(
    team, doc_flow, tmp_path_factory
):
    """After the module's team work (in file order, this test is among the last; alone, it has
    the page's hosts' work): none of the passwords and keys used is in the tracking store, the
    accounts store (it keeps password hashes), an object of the bucket, a log (the server's,
    the database's, the storage's), a file of any host's working tree (DVC files and git history
    included), but in the files meant for them."""
    secrets = team.secrets
    found = []
    for database in ("mlflow", "mlflow_auth"):
        dump = team.postgres.dump(database)
        found += [(f"database {database}", s) for s in secrets if s in dump]
    s3 = team.s3.client()
    keys = team.s3.keys(BUCKET, "")
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        found += [(f"s3://{BUCKET}/{key}", s) for s in secrets if s.encode() in body]
    scanned = 0
    for path in [*tmp_path_factory.getbasetemp().rglob("*"), team.postgres.log]:
        if path.is_file() and not path.is_symlink() and not is_secret_holder(team, path):
            data = path.read_bytes()
            scanned += 1
            found += [(str(path), s) for s in secrets if s.encode() in data]
    for repo in (doc_flow.trainer.repo, doc_flow.viewer.repo):
        history = sh(["git", "log", "-p", "--all"], repo, doc_flow.trainer.shell.env)
        found += [(f"git history of {repo}", s) for s in secrets if s in history]
    assert not found
    assert scanned > 100 and len(keys) > 10  # the scan saw the team's work
    assert team.server.log.is_file() and team.postgres.log.is_file()


def test_the_servers_log_has_no_driver_traceback(team, doc_flow):
    """What the server's log shows of clients' errors is one access line each: no traceback,
    no psycopg warning; the database's log, no duplicate-key error on the runs' metrics (a
    client sending a metric the store holds already)."""
    log = team.server.log.read_text()
    noise = [x for x in log.splitlines() if re.search(r"Traceback|psycopg|pipeline aborted", x)]
    assert not noise, "\n".join(noise[:20])
    database = team.postgres.log.read_text()
    assert "metric_pk" not in database, database[-3000:]
