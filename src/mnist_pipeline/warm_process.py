"""The warm process: it loads the stage commands' libraries once, then forks a process per
command that `mnist_pipeline.warm` (the `mnist-pipeline` script) hands it over its socket.

It imports third-party libraries only (never this project's code, which each fork loads from
disk), freezes them out of the garbage collector's sight, and leaves after its idle time.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

from mnist_pipeline.warm import receive, send

# What the stage commands import: the heavy part of their start-up. Never this project's modules.
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
    request, fds = receive(conn, fds=3)
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
        send(conn, {"pid": pid})
    _watch(conn, pid)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        send(conn, {"status": status})
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
