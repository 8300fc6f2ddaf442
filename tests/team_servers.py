"""The engines a team runs, started for real on 127.0.0.1 for tests/test_team.py: a PostgreSQL
cluster of its own in a temporary folder, an S3-compatible object store (moto's server mode, what
DVC's own S3 tests run against), and `mlflow server` started the way docs/team.md tells a team to
start it: MLflow's `basic-auth` app (its accounts in the same PostgreSQL), HTTPS with a
certificate from a CA made here by the documentation's `openssl` commands, the documentation's
accounts made by its `curl` commands.

docs/team.md is read, not copied: its install lines, the PostgreSQL commands, the certificate
commands, the accounts file (its ```ini block), the server's environment and command line, the
accounts and grants, the clients' settings and the DVC remote commands are taken from its blocks,
the documentation's placeholders (host names, ports, paths, `CHANGE_ME...` for a password or key)
replaced by the test's values. A change to a command in the documentation changes what these
tests run.
"""

from __future__ import annotations

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

from tests.conftest import REPO
from tests.helpers import STARTUP_TIMEOUT_S, free_port

DOCS = REPO / "docs" / "team.md"
BIN = Path(sys.executable).parent  # mlflow, dvc, moto_server: this environment's
BUCKET = "ml-team"  # the bucket docs/team.md names; each moto server starts empty
# moto accepts any key. The access key's ID is no secret: presigned download URLs (which the
# server hands clients) carry it, and the storage logs them. Its secret is one.
S3_KEY_ID, S3_SECRET = "team-test-key-id", "team-test-s3-secret"
DB_PASSWORD = "team-test-password"
# The accounts of docs/team.md (user names are not secrets; passwords are 12+ characters).
ADMIN_PASSWORD = "team-test-admin-pw"
TRAINER, TRAINER_PASSWORD = "alice", "team-test-alice-pw"
VIEWER, VIEWER_PASSWORD = "bob", "team-test-bob-pw"
SECRET_KEY = "team-test-flask-secret-key"  # MLFLOW_FLASK_SERVER_SECRET_KEY
SECRETS = (S3_SECRET, DB_PASSWORD, ADMIN_PASSWORD, TRAINER_PASSWORD, VIEWER_PASSWORD, SECRET_KEY)


def missing(reason: str) -> NoReturn:
    """Skip where a developer lacks an engine; in CI (CI set), fail: CI never silently skips."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


# --- docs/team.md --------------------------------------------------------------------------------


def doc_section(section: str | None) -> str:
    """The text under the `## ` heading of docs/team.md starting with `section` (all if None)."""
    text = DOCS.read_text()
    if section is None:
        return text
    parts = [p for p in text.split("\n## ") if p.startswith(section)]
    assert len(parts) == 1, f"docs/team.md: no single section '## {section}'"
    return parts[0]


def doc_block(language: str, section: str) -> str:
    """The one ```<language> block of a section of docs/team.md."""
    blocks = re.findall(rf"```{language}\n(.*?)```", doc_section(section), flags=re.S)
    assert len(blocks) == 1, f"docs/team.md, section {section}: {len(blocks)} ```{language} blocks"
    return blocks[0]


def doc_commands(prefix: str, section: str | None = None) -> list[list[str]]:
    """Every command in docs/team.md's ```bash blocks (under the `## ` heading starting with
    `section`, if given) whose words start with `prefix`, as an argument list: continuation lines
    joined, comments dropped."""
    text = doc_section(section)
    want = shlex.split(prefix)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[: len(want)] == want:
                found.append(words)
    return found


def doc_command(prefix: str, section: str | None = None, containing: str = "") -> list[str]:
    """The one command in docs/team.md starting with `prefix` (and holding `containing`)."""
    commands = [c for c in doc_commands(prefix, section) if containing in " ".join(c)]
    assert len(commands) == 1, f"docs/team.md: expected one `{prefix} ...`, found {commands}"
    return commands[0]


def fill(words: list[str], values: dict[str, str]) -> list[str]:
    """The documentation's placeholders replaced by the test's values, word by word."""
    filled = []
    for word in words:
        for placeholder, value in values.items():
            word = word.replace(placeholder, value)
        filled.append(word)
    return filled


def doc_exports(section: str) -> dict[str, str]:
    """NAME=VALUE of every `export` line in one section of docs/team.md."""
    env = {}
    for words in doc_commands("export", section):
        for assignment in words[1:]:
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder holding PostgreSQL's server programs: on PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (not on PATH there), the newest version."""
    candidates = []
    if found := shutil.which("initdb"):
        candidates.append(Path(found).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))[::-1]
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "postgres", "psql", "createdb")):
            return folder
    return None


@dataclass(frozen=True)
class Postgres:
    bin: Path
    port: int
    superuser_env: dict[str, str]  # PGPASSWORD for the cluster's superuser

    def uri(self, scheme: str, user: str, password: str, database: str) -> str:
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self, words: list[str]) -> str:
        """A documented `sudo -u postgres <program> ...` command, run as the cluster's superuser
        over TCP (the test's cluster has no Unix socket and no peer authentication)."""
        assert words[:3] == ["sudo", "-u", "postgres"], words
        program, *args = words[3:]
        command = [str(self.bin / program), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-U", "postgres", *args]
        return self._run(command)

    def dump(self, database: str) -> str:
        """Everything in `database` as SQL (pg_dump): what the store holds. Without the
        `\\restrict` lines, whose key pg_dump draws at random on each dump."""
        command = [str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port)]
        sql = self._run([*command, "-U", "postgres", "--no-owner", database])
        return re.sub(r"^\\(un)?restrict .*$", "", sql, flags=re.M)

    def _run(self, command: list[str]) -> str:
        env = {**os.environ, **self.superuser_env}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, f"{command}: {proc.stdout}{proc.stderr}"
        return proc.stdout


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """A new cluster (initdb) in a temporary folder, its server on a free loopback port, no Unix
    socket; removed afterwards. PostgreSQL refuses to run as root: as root, the cluster belongs
    to the `postgres` system user (Debian's package makes it), the server runs as that user."""
    folder = postgres_bin()
    if folder is None:
        missing(
            "PostgreSQL's server programs (initdb, postgres) are not installed; "
            "`apt-get install postgresql` (Debian, Ubuntu) provides them"
        )
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    # Not under pytest's tmp_path: as root, its parents are private to root.
    base = Path(tempfile.mkdtemp(prefix="mnist-team-pg-"))
    superuser_password = "team-test-superuser"
    (base / "pwfile").write_text(superuser_password + "\n")
    if as_user:
        for path in (base, base / "pwfile"):
            os.chown(path, as_user["user"], as_user["group"])
    proc = None
    try:
        initdb = [str(folder / "initdb"), "-D", str(base / "data"), "-U", "postgres"]
        initdb += ["--pwfile", str(base / "pwfile"), "--auth", "scram-sha-256"]
        initdb += ["--encoding", "UTF8", "--no-sync"]
        done = subprocess.run(initdb, cwd=base, capture_output=True, text=True, **as_user)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}{done.stderr}"
        port = free_port()
        server = [str(folder / "postgres"), "-D", str(base / "data"), "-p", str(port)]
        server += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        # A throw-away cluster: no need to survive a power cut.
        server += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
        server += ["-c", "full_page_writes=off"]
        log = base / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                server, cwd=base, stdout=out, stderr=subprocess.STDOUT, **as_user
            )
        ready = [str(folder / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while subprocess.run(ready).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Postgres(folder, port, {"PGPASSWORD": superuser_password})
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends every session
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()  # its backends notice the postmaster is gone and exit
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


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


def clean_env() -> dict[str, str]:
    """This process's environment without MLflow's, DVC's, the pipeline's or AWS's settings."""
    prefixes = ("MLFLOW_", "MNIST_", "DVC_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def no_aws_credentials(folder: Path) -> dict[str, str]:
    """Settings under which botocore finds no credentials at all: no AWS_* keys (clean_env), no
    ~/.aws files, no instance metadata. A client that tried S3 directly would fail."""
    return {
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# --- S3 (moto) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )

    def keys(self, prefix: str) -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextmanager
def s3_server(folder: Path) -> Iterator[S3]:
    """moto's S3 server on a free loopback port, with the documentation's bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = folder / "moto.log"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process_group(command, log, clean_env()) as proc:
        wait_until_healthy(f"{endpoint}/moto-api/", proc, log, "moto's S3 server")
        s3 = S3(endpoint)
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3


# --- mlflow server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    url: str
    proc: subprocess.Popen
    command: list[str]
    etc: Path  # the server's files: docs/team.md's /etc/mlflow (CA, key, certificate, accounts)

    @property
    def ca(self) -> Path:
        return self.etc / "team-ca.pem"


def doc_values(port: int, postgres: Postgres, s3: S3, etc: Path | None = None) -> dict[str, str]:
    """docs/team.md's placeholders and the test's values for them, in the order they are
    replaced (the longer placeholders first)."""
    return {
        "db.internal:5432": f"127.0.0.1:{postgres.port}",
        "DNS:mlflow.internal": "IP:127.0.0.1",  # the certificate names the address clients use
        "mlflow.internal": "127.0.0.1",
        "0.0.0.0": "127.0.0.1",
        "5000": str(port),
        "/etc/mlflow/": f"{etc}/",
        "$HOME/.mlflow/team-ca.pem": f"{etc}/team-ca.pem",
        "CHANGE_ME_FLASK_KEY": SECRET_KEY,
        "CHANGE_ME_ADMIN": ADMIN_PASSWORD,
        "CHANGE_ME_ALICE": TRAINER_PASSWORD,
        "CHANGE_ME_BOB": VIEWER_PASSWORD,
        "CHANGE_ME_KEY_ID": S3_KEY_ID,
        "CHANGE_ME_S3_SECRET": S3_SECRET,
        "CHANGE_ME": DB_PASSWORD,
        "https://minio.internal:9000": s3.endpoint,
    }


def create_database(postgres: Postgres) -> None:
    """The documentation's database and user for MLflow, and its database for the accounts."""
    for words in doc_commands("sudo -u postgres", "1."):
        postgres.admin(fill(words, doc_values(0, postgres, S3(""))))


def server_files(etc: Path, postgres: Postgres) -> Path:
    """docs/team.md's /etc/mlflow: the team CA, the server's key and certificate (its `openssl`
    commands, run there) and the accounts file (its ```ini block)."""
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            missing(f"`{tool}` is not installed; `apt-get install {tool}` (Debian, Ubuntu)")
    etc.mkdir(parents=True)
    values = doc_values(0, postgres, S3(""), etc)
    for words in doc_commands("openssl", "1."):
        done = subprocess.run(fill(words, values), cwd=etc, capture_output=True, text=True)
        assert done.returncode == 0, f"{words}: {done.stdout}{done.stderr}"
    ini = "\n".join(fill(doc_block("ini", "1.").splitlines(), values))
    (etc / "basic_auth.ini").write_text(ini)
    (etc / "basic_auth.ini").chmod(0o600)
    return etc


def server_env(postgres: Postgres, s3: S3, port: int, etc: Path) -> dict[str, str]:
    """The server's environment: what docs/team.md exports for it (the S3 credentials and
    endpoint, the accounts file, the admin's first password among them), on a clean
    environment."""
    values = doc_values(port, postgres, s3, etc)
    exported = {name: fill([value], values)[0] for name, value in doc_exports("1.").items()}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= set(exported)
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= set(exported)
    return {**clean_env(), **exported}


@contextmanager
def mlflow_server(postgres: Postgres, s3: S3, folder: Path, etc: Path) -> Iterator[MlflowServer]:
    """docs/team.md's `mlflow server` command on a free loopback port, in a process group, with
    the server files in `etc` (server_files)."""
    port = free_port()
    values = doc_values(port, postgres, s3, etc)
    command = fill(doc_command("mlflow server", "1.", "postgresql"), values)
    command[0] = str(BIN / "mlflow")
    url = f"https://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "mlflow-server.log"
    # uvicorn's workers wait, on SIGTERM, for clients' kept-alive TLS connections to close (this
    # process keeps some): a few seconds, then SIGKILL, for a server whose store is a test's.
    env = server_env(postgres, s3, port, etc)
    with process_group(command, log, env, grace_s=3) as proc:
        body = wait_until_healthy(f"{url}/health", proc, log, "mlflow server", etc / "team-ca.pem")
        assert body.strip() == b"OK"  # what the documentation says `curl .../health` prints
        yield MlflowServer(url, proc, command, etc)


def create_accounts(server: MlflowServer, postgres: Postgres, s3: S3) -> None:
    """The documentation's accounts and grants: its `curl` commands, as the owner, run where
    the CA certificate is."""
    port = server.url.rsplit(":", 1)[1]
    values = doc_values(int(port), postgres, s3, server.etc)
    commands = doc_commands("curl --fail-with-body", "1.")
    assert len(commands) >= 3, "docs/team.md: no accounts made"
    for words in commands:
        done = subprocess.run(fill(words, values), cwd=server.etc, capture_output=True, text=True)
        assert done.returncode == 0, f"{words}: {done.stdout}{done.stderr}"
