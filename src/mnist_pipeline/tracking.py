"""Where runs go and whether that store can be used: URI, experiment, checks, client.

MLflow is imported inside the functions: `sync`'s no-op path runs without it."""

import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.paths import default_artifact_location, default_tracking_uri

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
_ACCOUNT = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"  # what names the user


def store_root(root: Path) -> Path:
    """The project root, or DVC_ROOT (`dvc exp run --queue` runs stages in a temporary copy)."""
    return Path(os.environ.get("DVC_ROOT") or root)


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store_root(root))


def experiment_name(dataset: str) -> str:
    return os.environ.get(EXPERIMENT_ENV) or f"mnist-pipeline-{dataset}"


def check_reachable(
    uri: str, *, writing: bool = True, experiment: str | None = None, root: Path | None = None
) -> None:
    """Fail fast if the store cannot be used: a server that is down, untrusted or refuses the
    account (reading; `writing` into `experiment`), a SQLite file that will not open. Under `dvc
    repro`, it says how to bring back the outputs DVC deleted (`root`: their project)."""
    try:
        _check_store(uri, writing, experiment)
    except PipelineError as err:
        raise PipelineError(f"{err}{_restore_hint(root)}") from None


def _check_store(uri: str, writing: bool, experiment: str | None) -> None:
    if uri.startswith("sqlite:"):
        _open_sqlite_store(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    # MLflow retries for minutes by default; a few seconds tell a blip from a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)  # what every MLflow call of this process sends
    ask = functools.partial(_ask, uri, creds)
    ask("/health")  # unprotected: says whether a server is there and its certificate is trusted
    user = f"user '{creds.username}'" if creds.username else "a client without credentials"
    status, _ = ask("/api/2.0/mlflow/experiments/search", params={"max_results": 1})
    if status == 401:
        who = f"the password of {user}" if creds.username else user
        fix = f"set {_ACCOUNT} (or ~/.mlflow/credentials) to your account on that server"
        raise _refused(uri, who, "401 Unauthorized", fix)
    if status == 403:
        fix = f"ask the server's owner for READ permission, or set {_ACCOUNT} to another account"
        raise _refused(uri, f"{user} reading runs", "403 Forbidden", fix)
    if writing and status == 200:
        _check_writable(uri, ask, user, experiment or os.environ.get(EXPERIMENT_ENV) or "Default")


def _refused(uri: str, what: str, status: str, fix: str) -> PipelineError:
    return PipelineError(
        f"the MLflow tracking server at {uri} refused {what} (HTTP {status}); {fix}"
    )


def _ask(uri: str, creds, endpoint: str, method: str = "GET", **kwargs):
    """(HTTP status, JSON body or None) of one request as MLflow makes it, without retries."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request

    try:
        reply = http_request(
            creds, endpoint, method, max_retries=0, timeout=5, raise_on_status=False, **kwargs
        )
    except MlflowException as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, requests.exceptions.SSLError):
            found = re.search(r"certificate verify failed: .*?(?=\.? \(_ssl)", str(cause))
            reason = found.group(0).replace("\\'", "'") if found else "the TLS handshake failed"
            fix = (
                "point MLFLOW_TRACKING_URI at the host name its certificate was made for"
                if "mismatch" in reason
                else "set MLFLOW_TRACKING_SERVER_CERT_PATH to the team's CA certificate"
            )
            raise PipelineError(
                f"cannot verify the TLS certificate of the MLflow tracking server at {uri} "
                f"({reason}); {fix} (docs/team.md)"
            ) from None
        # requests wraps urllib3's reason ("[Errno 111] Connection refused") in two layers.
        found = re.search(r"\[Errno[^\]]*\][^'\")(]*|timed out", str(cause or err))
        reason = found.group(0).strip() if found else first_line(cause or err)
        raise PipelineError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or point "
            "MLFLOW_TRACKING_URI at a running one (unset it to use the local store)"
        ) from None
    with contextlib.suppress(ValueError):
        return reply.status_code, reply.json()
    return reply.status_code, None


def _check_writable(uri: str, ask, user: str, experiment: str) -> None:
    """May the account write runs into the experiment, or create it? Each probe changes nothing and
    is refused (403) before it is read: deleting a missing tag, creating an unnamed experiment."""
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    where = f"experiment {experiment_id}" if experiment_id else f"experiment '{experiment}'"
    if not experiment_id:
        named = {"experiment_name": experiment}
        status, body = ask("/api/2.0/mlflow/experiments/get-by-name", params=named)
        if status == 200 and body:
            experiment_id = body["experiment"]["experiment_id"]
        elif status == 403:
            fix = f"ask the server's owner for READ permission on it, or set {_ACCOUNT}"
            raise _refused(uri, f"{user} reading {where}", "403 Forbidden", fix)
    if experiment_id:
        doing, account = f"writing runs to {where}", "a read-only account"
        probe = {"experiment_id": experiment_id, "key": "mnist-pipeline.write-check"}
        status, _ = ask("/api/2.0/mlflow/experiments/delete-experiment-tag", "POST", json=probe)
    else:
        doing, account = f"creating {where}", "an account that may not create experiments"
        status, _ = ask("/api/2.0/mlflow/experiments/create", "POST", json={"name": ""})
    if status == 403:
        owner = "ask the server's owner to make it a trainer (docs/team.md)"
        fix = f"{owner}, or set {_ACCOUNT} to a trainer's account"
        raise _refused(uri, f"{user} {doing}", f"403 Forbidden: {account}", fix)


def _restore_hint(root: Path | None) -> str:
    """How to bring back the outputs DVC deleted before a stage that then stopped, or ""."""
    stage = os.environ.get("DVC_STAGE")
    if not stage or root is None or not (root / "dvc.lock").is_file():
        return ""
    try:
        lock = YAML(typ="safe").load((root / "dvc.lock").read_text())
        outs = lock["stages"][stage].get("outs", [])
        gone = [out["path"] for out in outs if not (root / out["path"]).exists()]
        if not gone:
            return ""
        in_git = subprocess.run(
            ["git", "ls-files", "--", *gone], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError, YAMLError, LookupError, TypeError):
        return ""  # no hint, rather than a second error
    commands = [f"git checkout -- {' '.join(in_git)}"] if in_git else []
    if set(gone) - set(in_git):
        commands.append(f"dvc checkout {stage}")
    return (
        f"; DVC deleted this stage's outputs before running it ({', '.join(gone)}): "
        f"`{' && '.join(commands)}` brings them back"
    )


def _open_sqlite_store(uri: str) -> None:
    """Open a SQLite store one process at a time: MLflow's schema migration takes no lock."""
    import mlflow
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    key = hashlib.md5(uri.encode()).hexdigest()
    lock = Path(tempfile.gettempdir()) / f"mnist-pipeline-store-{key}.lock"
    try:
        with lock.open("a") as handle:
            try:
                import fcntl
            except ImportError:  # Windows: no lock (and no parallel DVC jobs there)
                pass
            else:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            mlflow.MlflowClient(tracking_uri=uri)  # MLflow keeps this store for the process
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as err:
        raise PipelineError(
            f"cannot open the MLflow tracking store {uri} ({first_line(err)}); check the file and "
            "its folder are writable, or point MLFLOW_TRACKING_URI elsewhere"
        ) from None


def run_experiment_id(dataset: str, root: Path) -> str:
    """MLFLOW_EXPERIMENT_ID (`mlflow run` sets it), else `experiment_name`, made if needed."""
    import mlflow

    if found := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return found
    name = experiment_name(dataset)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = mlflow.get_tracking_uri()
    location = default_artifact_location(store_root(root)) if uri.startswith("sqlite:") else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it since the lookup (parallel `dvc exp` jobs)
        if (experiment := mlflow.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id


def client():
    """A client of the current tracking store: MLflow keeps one store object per URI."""
    import mlflow

    return mlflow.MlflowClient()


# The local store's tables that hold absolute artifact paths (MLflow records them resolved).
_ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def follow_a_moved_project(root: Path) -> str | None:
    """Point a moved project's local store at this folder's mlartifacts; the old location."""
    here = store_root(root)
    if tracking_uri(root) != default_tracking_uri(here) or not (here / "mlflow.db").is_file():
        return None
    new = default_artifact_location(here)
    with contextlib.closing(sqlite3.connect(here / "mlflow.db", timeout=30)) as db:
        try:
            found = {row[0] for row in db.execute("SELECT artifact_location FROM experiments")}
        except sqlite3.Error:
            return None  # not a store (yet): MLflow says what is wrong when it opens it
        local = [a for a in found if a and a.startswith("file://") and a.endswith("/mlartifacts")]
        moved = sorted(a for a in local if a != new)
        with db:  # one transaction: all paths move, or none
            for old in moved:
                for table, column in _ARTIFACT_COLUMNS:
                    db.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, old, len(old) + 1, old + "/"),
                    )
    return moved[0] if moved else None
