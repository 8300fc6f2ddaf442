"""What a host measures of a checkpoint's three forms: latency, throughput, ONNX accuracy.

PyTorch on the device, the ONNX forms on the CPU; their accuracy under this host's kernels, and
int8's one image at a time too (it scales activations per batch). MLflow only."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from mnist_pipeline import host
from mnist_pipeline.export import ort_runner

FORMS = ("torch", "onnx", "int8")
CALLS = {1: 200, 256: 20}  # timed calls per batch size, after WARMUP: well under a second
WARMUP = {1: 20, 256: 2}
Runner = Callable[[Any], Any]


def measure(
    served: torch.nn.Module, onnx_models: dict[str, bytes], x, y, device, *, latency: bool = True
) -> dict:
    """{form: figures}. One ONNX session at a time: ORT's threads spin on, slowing the next."""
    figures = {"torch": _timings(_torch_runner(served.to(device), device), x) if latency else {}}
    images = x.numpy()
    for form, model in onnx_models.items():
        run = ort_runner(model)
        per_batch = form == "int8"  # an fp32 form scores an image alike in any batch
        figures[form] = (_timings(run, images) if latency else {}) | _accuracy(
            run, images, y, one_by_one=per_batch
        )
    return figures


def conditions(device) -> dict[str, Any]:
    return {
        "host": host.host_label(),
        "device": str(device),
        "cpu": host.cpu_tags(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_provider": "CPUExecutionProvider",
        "calls": {f"batch_{k}": v for k, v in CALLS.items()},
        "warmup_calls": {f"batch_{k}": v for k, v in WARMUP.items()},
    }


def _torch_runner(served: torch.nn.Module, device) -> Runner:
    def run(batch: torch.Tensor):
        with torch.inference_mode():
            out = served(batch.to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

    return run


def _timings(run: Runner, x) -> dict[str, float]:
    """Latency at batch 1 (median, p95, ms) and throughput at batch 256 (median call)."""
    figures = {}
    for size, calls in CALLS.items():
        index = np.arange(size * (WARMUP[size] + calls)) % len(x)
        batches = [x[index[i : i + size]] for i in range(0, len(index), size)]
        seconds = []
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            run(batch)
            if i >= WARMUP[size]:
                seconds.append(time.perf_counter() - start)
        if size == 1:
            figures["latency_b1_ms"] = statistics.median(seconds) * 1e3
            figures["latency_b1_p95_ms"] = statistics.quantiles(seconds, n=20)[-1] * 1e3
        else:
            figures[f"throughput_b{size}"] = size / statistics.median(seconds)
    return figures


def _accuracy(run: Runner, x: np.ndarray, y: np.ndarray, one_by_one: bool) -> dict[str, float]:
    figures = {"accuracy": float((run(x).argmax(1) == y).mean())}
    if one_by_one:
        right = sum(int(run(x[i : i + 1]).argmax(1)[0] == y[i]) for i in range(len(y)))
        figures["accuracy_b1"] = right / len(y)
    return figures
