"""Each variant's int8 accuracy on the full test set on three x86 CPUs: this one, and two that
QEMU emulates (Debian's qemu-user): an Intel Haswell (AVX2, no VNNI) and an AMD EPYC-Rome (AVX2,
no VNNI), for the project's int8 model (7-bit weights) and for 8-bit weights.

    python benchmarks/int8_cpus.py          # after `dvc repro`: reads exports/<variant>/model.onnx

On a CPU without VNNI, ONNX Runtime's u8s8 kernels add two uint8 x int8 products in int16
(VPMADDUBSW), which 8-bit weights can overflow; QEMU runs the same kernels the real CPU would
(its CPUID says which), so the emulated CPUs give the real CPUs' answers, slowly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from mnist_pipeline.config import load_params
from mnist_pipeline.export import _gemm_as_matmul
from mnist_pipeline.paths import DATA_FILES, PARAMS_FILE, pipeline_outputs, project_root

CPUS = {"this CPU": [], "Haswell (QEMU)": ["qemu-x86_64", "-cpu", "Haswell"]}
CPUS["EPYC-Rome (QEMU)"] = ["qemu-x86_64", "-cpu", "EPYC-Rome"]
ACCURACY = """
import json, sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1]); y = np.load(sys.argv[2]); found = {}
for path in sys.argv[3:]:
    net = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    found[path] = float((net.run(None, {"images": x})[0].argmax(1) == y).mean())
print(json.dumps(found))
"""


def eight_bit(fp32: Path, target: Path) -> None:
    """The int8 model with 8-bit weights: the project's quantisation without `reduce_range`."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp32.onnx"
        quant_pre_process(_gemm_as_matmul(onnx.load(fp32)), source, skip_optimization=True)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)


def main() -> int:
    import numpy as np

    from mnist_pipeline.dataset import read_idx

    root = project_root()
    params = load_params(root / PARAMS_FILE)
    data = root / "data" / params.data.dataset
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x = read_idx(data / DATA_FILES[2]).numpy().astype(np.float32)[:, None] / 255
        np.save(folder / "x.npy", x)
        np.save(folder / "y.npy", read_idx(data / DATA_FILES[3]).numpy())
        models = {}
        for variant in params.variants:
            outputs = pipeline_outputs(root, variant)
            eight_bit(outputs.onnx, folder / f"{variant}.8bit.onnx")
            models[variant] = {
                "fp32": str(outputs.onnx),
                "int8, 7-bit weights": str(outputs.int8),
                "int8, 8-bit weights": str(folder / f"{variant}.8bit.onnx"),
            }
        paths = [p for forms in models.values() for p in forms.values()]
        found = {}
        for cpu, prefix in CPUS.items():
            command = [*prefix, sys.executable, "-c", ACCURACY, str(folder / "x.npy")]
            out = subprocess.run(
                [*command, str(folder / "y.npy"), *paths], capture_output=True, text=True
            )
            found[cpu] = json.loads(out.stdout.strip().splitlines()[-1])
    forms = ("int8, 7-bit weights", "int8, 8-bit weights")
    print("| variant | fp32 | " + " | ".join(f"{f}, {cpu}" for f in forms for cpu in CPUS) + " |")
    print("|---|---:|" + "---:|" * (len(forms) * len(CPUS)))
    for variant, paths_of in models.items():
        fp32 = found["this CPU"][paths_of["fp32"]]
        cells = []
        for form in forms:
            for cpu in CPUS:
                accuracy = found[cpu][paths_of[form]]
                cells.append(f"{accuracy:.2%} ({(accuracy - fp32) * 100:+.2f})")
        print(f"| `{variant}` | {fp32:.2%} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
