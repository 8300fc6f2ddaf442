"""The machines a team runs, for tests/test_team.py, on 127.0.0.1: a database host (a folder
for PostgreSQL's cluster, which docs/team.md's block makes and starts), S3-compatible storage
that enforces its keys' policies (moto's server mode with IAM checks on, what DVC's own S3 tests
run against), and `mlflow server` started as docs/team.md's systemd unit starts it: its command,
with its environment file.

What runs on them is docs/team.md's (tests/team_docs.py); the code here only gives each block a
machine to run on, and stops each machine by the process it started.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.helpers import STARTUP_TIMEOUT_S, free_port
from tests.team_docs import Shell, Values, env_file, fill, unit_settings

BIN = Path(sys.executable).parent  # mlflow, dvc, aws, moto_server: this environment's
REGION = "us-east-1"
# What a reader would type at a prompt or paste into a file (12 characters or more). The keys'
# secrets are the storage's own making (tests/test_team.py reads them from the files the
# documented commands write).
DB_PASSWORD = "team-test-db-password"
ADMIN_PASSWORD = "team-test-admin-pw"
TRAINER, TRAINER_PASSWORD = "alice", "team-test-alice-pw"
VIEWER, VIEWER_PASSWORD = "bob", "team-test-bob-pw"
FLASK_SECRET_KEY = "team-test-flask-secret-key"
PASSWORDS = (DB_PASSWORD, ADMIN_PASSWORD, TRAINER_PASSWORD, VIEWER_PASSWORD, FLASK_SECRET_KEY)


def missing(reason: str) -> NoReturn:
    """Skip where a developer lacks an engine; in CI (CI set), fail: CI never silently skips."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def clean_env() -> dict[str, str]:
    """This process's environment without MLflow's, DVC's, the pipeline's or AWS's settings."""
    prefixes = ("MLFLOW_", "MNIST_", "DVC_", "AWS_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return env | {"MNIST_PIPELINE_WARM": "off"}  # no warm process outlives a test (conftest.py)


# --- processes -----------------------------------------------------------------------------------


@contextmanager
def process_group(
    command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None, grace_s: float = 20
) -> Iterator[subprocess.Popen]:
    """`command` in a process group of its own; the whole group is ended afterwards (SIGTERM,
    then SIGKILL after `grace_s`)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        kill_group(proc, signal.SIGTERM, grace_s)


def kill_group(proc: subprocess.Popen, sig: int, grace_s: float = 20) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


def wait_until_healthy(
    url: str, proc: subprocess.Popen, log: Path, what: str, ca: Path | None = None
) -> bytes:
    """The body of GET <url> once it answers 200 (over TLS: trusting the CA certificate `ca`)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                return reply.read()
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


# --- the database host ---------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder holding PostgreSQL's server programs: on PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (not on PATH there), the newest version."""
    candidates = []
    if found := shutil.which("initdb"):
        candidates.append(Path(found).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))[::-1]
    names = ("initdb", "pg_ctl", "postgres", "createuser", "createdb", "pg_dump", "psql")
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    return None


@dataclass(frozen=True)
class Postgres:
    """The database host: PostgreSQL's programs, where docs/team.md's cluster lives (PGDATA,
    moved into a temporary folder), the port it listens on, and its `postgres` user."""

    bin: Path
    home: Path
    port: int
    user: dict  # subprocess's user/group: the cluster's owner (PostgreSQL refuses root)

    @property
    def data(self) -> Path:
        return self.home / "mlflow"

    @property
    def log(self) -> Path:
        return self.data / "server.log"  # where the documented `pg_ctl start` writes

    def shell(self) -> Shell:
        """The `postgres` user's shell, PostgreSQL's programs on PATH. PGPORT: the port the
        documented cluster takes by default (5432) is a free one here."""
        env = clean_env() | {
            "HOME": str(self.home),
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "PGPORT": str(self.port),
        }
        return Shell(cwd=self.home, env=env, user=self.user)

    def dump(self, database: str) -> str:
        """Everything in `database` as SQL (pg_dump, as the cluster's owner over its socket):
        what the store holds. Without the `\\restrict` lines, whose key pg_dump draws at random
        on each dump."""
        command = [str(self.bin / "pg_dump"), "-p", str(self.port), "--no-owner", database]
        shell = self.shell()
        done = subprocess.run(
            command, env=shell.env, capture_output=True, text=True, timeout=60, **self.user
        )
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        return re.sub(r"^\\(un)?restrict .*$", "", done.stdout, flags=re.M)

    def throw_away(self) -> None:
        """The documented cluster, made a test's: no waiting for the disk at each commit (a
        throw-away cluster need not survive a power cut; MLflow commits at every call)."""
        settings = ("fsync", "synchronous_commit", "full_page_writes")
        for name in settings:
            self._psql(f"ALTER SYSTEM SET {name} = off")
        self._psql("SELECT pg_reload_conf()")

    def _psql(self, sql: str) -> None:
        command = [str(self.bin / "psql"), "-p", str(self.port), "-X", "-q", "-c", sql, "postgres"]
        shell = self.shell()
        done = subprocess.run(
            command, env=shell.env, capture_output=True, text=True, timeout=60, **self.user
        )
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"

    def stop(self) -> None:
        """Stop the cluster the documented `pg_ctl start` started, if it did: `pg_ctl stop`,
        else its postmaster by the PID it recorded."""
        pidfile = self.data / "postmaster.pid"
        if not pidfile.is_file():
            return
        pid = int(pidfile.read_text().splitlines()[0])
        stop = [str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-t", "30"]
        with suppress(subprocess.TimeoutExpired):
            done = subprocess.run(stop, capture_output=True, timeout=60, **self.user)
            if done.returncode == 0:
                return
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its backends notice the postmaster is gone and exit


@contextmanager
def database_host() -> Iterator[Postgres]:
    """A database host for docs/team.md's cluster: a free port, a home for the `postgres`
    system user (Debian's package makes it; as root, the cluster runs as that user), the
    default socket folder PostgreSQL's programs use. The cluster is stopped and its folder
    removed afterwards."""
    folder = postgres_bin()
    if folder is None:
        missing(
            "PostgreSQL's server programs (initdb, postgres) are not installed; "
            "`apt-get install postgresql` (Debian, Ubuntu) provides them"
        )
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            missing(f"`{tool}` is not installed; `apt-get install {tool}` (Debian, Ubuntu)")
    user: dict = {}
    owner = pwd.getpwuid(os.geteuid())
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("no `postgres` system user to run PostgreSQL as (Debian's package makes it)")
        user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    sockets = _default_socket_folder(folder)
    if os.geteuid() == 0 and not sockets.exists():  # as Debian's package makes it
        sockets.mkdir(parents=True)
        os.chown(sockets, owner.pw_uid, owner.pw_gid)
        sockets.chmod(0o2775)
    if not os.access(sockets, os.W_OK) and os.geteuid() != 0:
        missing(f"PostgreSQL's socket folder {sockets} is not writable by this user")
    # Not under pytest's tmp_path: as root, its parents are private to root.
    home = Path(tempfile.mkdtemp(prefix="mnist-team-db-"))
    os.chown(home, owner.pw_uid, owner.pw_gid)
    postgres = Postgres(folder, home, free_port(), user)
    try:
        yield postgres
    finally:
        postgres.stop()
        shutil.rmtree(home, ignore_errors=True)


def _default_socket_folder(folder: Path) -> Path:
    """Where this build of PostgreSQL puts its Unix socket by default (Debian's:
    /var/run/postgresql), which the documented cluster and its tools use."""
    described = subprocess.run(
        [str(folder / "postgres"), "--describe-config"], capture_output=True, text=True, timeout=60
    ).stdout
    for line in described.splitlines():
        fields = line.split("\t")
        if fields[0] == "unix_socket_directories":
            return Path(fields[4].split(",")[0].strip())
    return Path("/tmp")


# --- the storage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    id: str
    secret: str


@dataclass(frozen=True)
class S3:
    endpoint: str
    admin: Key  # the storage administrator's: an IAM user allowed everything

    def client(self, key: Key | None = None, service: str = "s3"):
        import boto3

        key = key or self.admin
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=key.id,
            aws_secret_access_key=key.secret,
            region_name=REGION,
        )

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def admin_env(self, home: Path) -> dict[str, str]:
        """The storage administrator's shell: the AWS CLI signed in as the administrator, its
        endpoint the test's storage (what AWS's own endpoint would be)."""
        return clean_env() | {
            "HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "AWS_ACCESS_KEY_ID": self.admin.id,
            "AWS_SECRET_ACCESS_KEY": self.admin.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_CONFIG_FILE": str(home / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        }


@contextmanager
def s3_server(folder: Path) -> Iterator[S3]:
    """moto's S3 (and IAM) server on a free loopback port, enforcing IAM: the administrator's
    account is made first; from then on every request must be signed by a key the storage knows
    and allowed by its user's policies. The bucket is docs/team.md's to make.

    What moto checks: each object action (s3:GetObject, PutObject, DeleteObject) against the
    policies' resources, as AWS does. What it does not: a policy's conditions (`s3:prefix` on
    ListBucket: any key that may list the bucket lists all of it here), and a presigned URL's
    signature (a GET by presigned URL fails with HTTP 500 while IAM checks are on)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process_group(command, log, clean_env()) as proc:
        wait_until_healthy(f"{endpoint}/moto-api/", proc, log, "moto's S3 server")
        iam = S3(endpoint, Key("unchecked", "unchecked")).client(service="iam")
        iam.create_user(UserName="admin")
        everything = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [everything]})
        iam.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=policy)
        made = iam.create_access_key(UserName="admin")["AccessKey"]
        checks_on = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",  # checks on after 0 more requests
            headers={"Content-Type": "application/octet-stream"},  # not a form: moto reads it raw
        )
        with urllib.request.urlopen(checks_on, timeout=10) as reply:
            assert reply.status == 200
        yield S3(endpoint, Key(made["AccessKeyId"], made["SecretAccessKey"]))


# --- mlflow server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    url: str
    proc: subprocess.Popen
    command: list[str]
    env: dict[str, str]  # what its environment file gave it
    etc: Path  # docs/team.md's /etc/mlflow (CA, key, certificate, accounts, environment)
    log: Path

    @property
    def ca(self) -> Path:
        return self.etc / "team-ca.pem"


@contextmanager
def mlflow_server(unit: str, values: Values, etc: Path, log: Path) -> Iterator[MlflowServer]:
    """The server as the systemd unit `unit` (docs/team.md's, filled) starts it: its ExecStart,
    with what its EnvironmentFile holds and the little systemd adds (PATH, HOME, LANG), in a
    process group the test ends afterwards."""
    settings = unit_settings(fill(unit, values))
    command = shlex.split(settings["ExecStart"])
    env = env_file(Path(settings["EnvironmentFile"]).read_text())
    systemd = {"PATH": os.environ["PATH"], "HOME": str(etc), "LANG": "C.UTF-8"}
    host, port = values.placeholders["<MLFLOW_HOST>"], command[command.index("--port") + 1]
    url = f"https://{host}:{port}"
    # uvicorn's workers wait, on SIGTERM, for clients' kept-alive TLS connections to close (this
    # process keeps some): a few seconds, then SIGKILL, for a server whose store is a test's.
    with process_group(command, log, systemd | env, grace_s=3) as proc:
        body = wait_until_healthy(f"{url}/health", proc, log, "mlflow server", etc / "team-ca.pem")
        assert body.strip() == b"OK"  # what the documentation says `curl .../health` prints
        yield MlflowServer(url, proc, command, env, etc, log)
