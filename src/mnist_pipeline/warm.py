"""The `mnist-pipeline` entry point: a stage command runs in a fork of a warm process, one that has
already imported torch, MLflow, ONNX Runtime and the rest, instead of importing them again.

A stage's own work is often a second or less; importing its libraries costs several (torch 1.3 to
3 s, MLflow and its SQL store 2 to 4 s, torch's optimizers pull in `torch._dynamo`, 1.4 to 2.3 s),
and `dvc repro` starts one process per stage (benchmarks/README.md). So the first stage command of
a session starts a warm process in the background and runs as it always did; the later ones
connect to it over a Unix socket, hand over their arguments, working folder, environment and
stdin/stdout/stderr, and wait for a fork of it to run the command. Ctrl-C and SIGTERM are passed
on; the fork's exit status becomes the command's.

What a fork runs is always the code on disk: the warm process imports third-party libraries only,
and a fork drops any module of this project before running the command line afresh. It is keyed
on the Python, its library folders (their modification times: an install changes them) and the
environment, less the variables read per call (DVC_*, MNIST_*): a change to any starts
another. It leaves after `MNIST_PIPELINE_WARM` seconds unused (default 600); `off` runs every
command in a process of its own. Linux only (a fork without exec is unsafe with macOS's system
libraries, and the fork's end is watched through a pidfd); elsewhere every command runs as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

# The stage commands DVC runs; `compare`, `tune` (Ray starts processes of its own) and `--help`
# run where they are called.
COMMANDS = frozenset({"train", "evaluate", "export", "report", "sync"})
# What those commands import: the heavy part of their start-up. Never this project's modules.
PRELOAD = (
    "torch",
    "torch._dynamo",  # torch.optim's methods import it on first call
    "torch.export._trace",  # mlflow.pytorch.log_model: with inductor, sympy, networkx
    "torch._export.passes.replace_autocast_with_hop_pass",
    "torch._functorch.aot_autograd",
    "torch._inductor.ir",
    "torch.fx.experimental.proxy_tensor",
    "sympy.combinatorics",
    "sympy.tensor.tensor",
    "torch.onnx",
    "torchvision",
    "torchsummary",
    "numpy",
    "pandas",
    "pyarrow.pandas_compat",
    "tabulate",
    "pydantic",
    "pydantic.dataclasses",
    "ruamel.yaml",
    "tqdm",
    "matplotlib.pyplot",
    "PIL.PngImagePlugin",
    "git",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "onnxruntime.tools.symbolic_shape_infer",
    "mlflow",
    "mlflow.pytorch",
    "mlflow.onnx",
    "mlflow.pyfunc.scoring_server",
    "mlflow.system_metrics.system_metrics_monitor",
    "mlflow.types.responses",
    "mlflow.models.display_utils",
    "mlflow.pyfunc.utils.environment",
    "mlflow.tracing.export",
    "mlflow.tracing.processor.otel",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "alembic.config",
)
PER_CALL = ("DVC_", "MNIST_")  # read when a command runs (DVC's, this project's), not on import
PER_CALL_NAMES = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})
DEFAULT_IDLE_S = 600.0
SETTING = "MNIST_PIPELINE_WARM"
LENGTH = struct.Struct("!I")


def entry() -> None:
    """`mnist-pipeline`: in the warm process if one is ready (else start one), else here."""
    code = delegate(sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        os._exit(code)
    from mnist_pipeline.cli import entry as run_here

    run_here()


def idle_seconds(environ=os.environ) -> float | None:
    """`MNIST_PIPELINE_WARM`: how long a warm process waits unused; None: off."""
    text = environ.get(SETTING, "").strip().lower()
    if not text:
        return DEFAULT_IDLE_S
    if text in ("off", "0", "no", "false"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(
            f"{SETTING}={environ[SETTING]!r}: set it to `off` or to the seconds a warm process "
            f"waits unused (default {DEFAULT_IDLE_S:.0f})"
        )
    return seconds


def delegate(argv: list[str]) -> int | None:
    """Run `argv` in the warm process and return its exit code; None: run it here."""
    try:
        idle = idle_seconds()
    except ValueError as err:
        print(f"mnist-pipeline: error: {err}", file=sys.stderr)
        return 2
    command = next((a for a in argv if not a.startswith("-")), None)
    linux = sys.platform == "linux" and hasattr(os, "pidfd_open")
    if idle is None or command not in COMMANDS or "--params" in argv or not linux:
        return None  # --params: its value may be the command's name; rare, so run here
    folder = runtime_folder()
    if folder is None:
        return None
    name = key(os.environ)
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(folder / f"{name}.sock"))
    except OSError:
        conn.close()
        start(folder, name, idle)
        return None
    with conn:
        return _run_there(conn, argv)


def runtime_folder() -> Path | None:
    """A folder only this user can enter: $XDG_RUNTIME_DIR/mnist-pipeline, else one in /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / f"mnist-pipeline-{os.getuid()}"
    if len(str(folder)) > 70:  # a socket's path holds at most 107 bytes
        folder = Path(tempfile.gettempdir()) / f"mnist-pipeline-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # someone else's, or open to others: never connect to it
    return folder


def key(environ) -> str:
    """What a warm process must share with a command for the command to run in it."""
    stable = {k: v for k, v in environ.items() if not k.startswith(PER_CALL)}
    stable = {k: v for k, v in stable.items() if k not in PER_CALL_NAMES}
    folders = []
    for entry_ in sys.path[1:]:  # [0] is the script's folder: set per call
        with contextlib.suppress(OSError):
            folders.append((entry_, os.stat(entry_).st_mtime_ns))
    own = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    text = json.dumps([sys.executable, sys.version, sorted(stable.items()), folders, own])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def start(folder: Path, name: str, idle: float) -> None:
    """Start a warm process in the background, unless one is starting or running."""
    try:
        with open(folder / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
    except OSError:
        return  # held: a warm process is starting (it binds its socket once it has loaded)
    with open(folder / f"{name}.log", "w") as log:  # its own errors, if any
        subprocess.Popen(
            [sys.executable, "-m", "mnist_pipeline.warm", str(folder), name, repr(idle)],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in DVC's process group, nor the terminal's
        )


# --- the client side: hand the command over, pass signals on, return its exit code --------------


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(conn, [LENGTH.pack(len(data))], fds)
    else:
        conn.sendall(LENGTH.pack(len(data)))
    conn.sendall(data)


def _receive(conn: socket.socket, fds: int = 0) -> tuple[dict | None, list[int]]:
    head, got, _, _ = socket.recv_fds(conn, LENGTH.size, fds) if fds else (conn.recv(4), [], 0, 0)
    if len(head) < LENGTH.size:
        return None, got
    (size,) = LENGTH.unpack(head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None, got
        data += chunk
    return json.loads(data), got


def _standard_fds() -> tuple[list[int], list[int]]:
    """fds 0, 1 and 2, each /dev/null where closed; and the ones opened for that."""
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            opened.append(os.open(os.devnull, os.O_RDWR))
            fds.append(opened[-1])
    return fds, opened


def _run_there(conn: socket.socket, argv: list[str]) -> int | None:
    """The command's exit code; None if the warm process went away before starting it (it was
    leaving, unused): then nothing ran, and the caller runs it here."""
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "argv": [sys.argv[0], *argv],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": sys.path,
        "umask": umask,
    }
    pid, pending = None, []

    def forward(signum, frame):  # Ctrl-C, SIGTERM, ...: to the process running the command
        if pid is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {signum: signal.signal(signum, forward) for signum in signals}
    fds, opened = _standard_fds()
    try:
        _send(conn, request, fds)
        started, _ = _receive(conn)
    except OSError:
        started = None
    finally:
        for fd in opened:
            os.close(fd)
    if started is None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return 128 + pending[0] if pending else None
    pid = started["pid"]
    for signum in pending:
        os.kill(pid, signum)
    if os.environ.get("MNIST_PIPELINE_LOG", "").upper() == "DEBUG":
        print(f"mnist-pipeline: runs in process {pid}, a fork of the warm one", file=sys.stderr)
    try:
        ended, _ = _receive(conn)
    except OSError:
        ended = None
    if ended is None:
        print(f"mnist-pipeline: lost the warm process running it (pid {pid})", file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(ended["status"])
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


# --- the warm process ----------------------------------------------------------------------------


def serve(folder: Path, name: str, idle: float) -> dict | None:
    """Load, listen, fork per command. Returns in a fork that is to run a command (its request);
    in the warm process itself, returns None when it has waited `idle` seconds unused."""
    lock = open(folder / f"{name}.lock", "a")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None  # another one holds it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # as the command line sets it
    os.environ.setdefault("MPLBACKEND", "Agg")
    for module in PRELOAD:
        try:
            __import__(module)
        except Exception as err:  # a library missing or broken: the fork imports it
            print(f"{module}: {err}", file=sys.stderr, flush=True)
    os.environ.pop("MPLBACKEND", None)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return None  # a fork cannot use CUDA set up before it: every command runs on its own
    # The loaded libraries' objects out of the collector's sight: a full collection in a fork
    # would walk (and, touching each, copy) all of them: 1.4 s here (the gc.freeze docs).
    gc.collect()
    gc.freeze()
    address = folder / f"{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        address.unlink()  # a warm process that died left it (this one holds the lock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(address))
    listener.listen(16)
    warm_pid = os.getpid()
    (folder / f"{name}.pid").write_text(f"{warm_pid}\n")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the per-command forks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # leave no socket behind
    try:
        while select.select([listener], [], [], idle)[0]:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                lock.close()
                return _handle(conn)
            conn.close()
    finally:
        if os.getpid() == warm_pid:  # not in a fork returning to run its command
            for leftover in (address, folder / f"{name}.pid"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
    return None


def _handle(conn: socket.socket) -> dict:
    """In a fork per command: fork the command's process, report its pid and its exit status.
    Returns only in that process. The client gone (Ctrl-C'd, killed): SIGTERM to the command."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError):  # only this user (the folder is theirs too)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            os._exit(1)
    request, fds = _receive(conn, fds=3)
    if request is None or len(fds) != 3:
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become(request, fds)
        return request
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):
        _send(conn, {"pid": pid})
    _watch(conn, pid)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        _send(conn, {"status": status})
    os._exit(0)


def _watch(conn: socket.socket, pid: int) -> None:
    """Until process `pid` ends; SIGTERM to it if the client goes first (Ctrl-C'd, killed)."""
    try:
        ended = os.pidfd_open(pid)  # readable when the process ends
    except OSError:  # a kernel before 5.3
        return
    watched = [ended, conn]
    while ended not in select.select(watched, [], [])[0]:
        try:
            gone = conn.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            watched.remove(conn)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    os.close(ended)


def _become(request: dict, fds: list[int]) -> None:
    """This fork takes on the client's standard streams, folder, environment and arguments."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.path[:] = request["path"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    sys.stdin = sys.__stdin__ = open(0, encoding=encoding, closefd=False)  # noqa: SIM115
    for fd, name in ((1, "stdout"), (2, "stderr")):
        line = fd == 2 or os.isatty(fd)
        stream = open(fd, "w", encoding=encoding, errors=errors, closefd=False)  # noqa: SIM115
        stream.reconfigure(line_buffering=line, errors="backslashreplace" if fd == 2 else errors)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    if "numpy" in sys.modules:  # a fresh process seeds it from the OS; each fork does likewise
        sys.modules["numpy"].random.seed()


def _run_command() -> None:
    """The command line, with this project's modules loaded from disk afresh."""
    ours = [m for m in sys.modules if m == "mnist_pipeline" or m.startswith("mnist_pipeline.")]
    for module in ours:
        del sys.modules[module]
    from mnist_pipeline.cli import entry as run_here

    run_here()


if __name__ == "__main__":
    if serve(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])) is not None:
        _run_command()
    sys.exit(0)
