"""The `mnist-pipeline` entry point: a stage command runs in a fork of a warm process (its side is
`warm_process`), one that has already imported torch, MLflow, ONNX Runtime and the rest, instead
of importing them again.

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
import hashlib
import json
import os
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
    own = hashlib.sha256()  # the two sides of the protocol
    for side in ("warm.py", "warm_process.py"):
        own.update((Path(__file__).parent / side).read_bytes())
    text = json.dumps(
        [sys.executable, sys.version, sorted(stable.items()), folders, own.hexdigest()]
    )
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
            [sys.executable, "-m", "mnist_pipeline.warm_process", str(folder), name, repr(idle)],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in DVC's process group, nor the terminal's
        )


# --- the wire (both sides), and the client: hand the command over, pass signals on ---------------


def send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(conn, [LENGTH.pack(len(data))], fds)
    else:
        conn.sendall(LENGTH.pack(len(data)))
    conn.sendall(data)


def receive(conn: socket.socket, fds: int = 0) -> tuple[dict | None, list[int]]:
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
        send(conn, request, fds)
        started, _ = receive(conn)
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
        ended, _ = receive(conn)
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
