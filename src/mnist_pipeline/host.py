"""What machine this is and which code it runs: host, CPU, GPU, library versions, git state."""

import os
import platform
import socket
import subprocess
from pathlib import Path

HOST_ENV = "MNIST_PIPELINE_HOST"  # a label that tells hosts (or containers on one host) apart
# The CPU flags (/proc/cpuinfo's) that decide the libraries' kernels: speed, and int8's rounding.
ISA_FLAGS = dict(
    avx2="avx2", avx512="avx512f", vnni="avx512_vnni", avx_vnni="avx_vnni", amx="amx_int8"
)
# Settings that pin the libraries' CPU code paths (README "Reproducible bytes"), recorded when set.
ISA_PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def host_label() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def run_name(variant: str) -> str:
    """`ffn3_relu@gpu-box`: two hosts' runs of one variant are told apart in every UI list."""
    return f"{variant}@{host_label()}"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    lines = (line.partition(":") for line in text.split("\n\n", 1)[0].splitlines())
    return {key.strip(): value.strip() for key, _, value in lines}


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_tags() -> dict[str, str]:
    flags = set(_cpuinfo().get("flags", "").split())
    tags = {"cpu.model": cpu_model()}
    tags |= {f"cpu.{name}": "yes" if flag in flags else "no" for name, flag in ISA_FLAGS.items()}
    pins = [f"{name}={os.environ[name]}" for name in ISA_PINS if os.environ.get(name)]
    tags["cpu.isa_pinned"] = " ".join(pins) or "no"
    return tags


def machine_tags(device=None) -> dict[str, str]:
    """The machine a run ran on (on a cluster: its node); with a `torch.device`, the device too."""
    import torch  # here: `sync`'s no-op path does without torch

    tags = {"host": host_label(), "hostname": socket.gethostname(), **cpu_tags()}
    tags |= {"torch.version": torch.__version__, "cuda.version": torch.version.cuda or "none"}
    tags["platform"] = platform.platform()
    if device is not None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        name = "Apple MPS" if device.type == "mps" else name
        tags |= {"device": device.type, "device.name": name}
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            tags["device.compute_capability"] = f"{major}.{minor}"
    return tags


def git_commit(root: Path) -> str:
    """HEAD's commit, `-dirty` when the code in src/ has uncommitted changes."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")
