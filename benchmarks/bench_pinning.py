"""What pinning the libraries' CPU code paths costs in epoch time, and what it does to the bytes.

    MNIST_MIRROR=../shared/data/mnist python benchmarks/bench_pinning.py --rounds 2

The kernels torch (ATen), oneDNN and MKL run are chosen per instruction set: AVX-512 on one CPU,
AVX2 on another, and the weights a recipe trains to differ in their last bits. Each of them can
be held to one code path with an environment variable, read when the library starts:

- `avx2`: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
- `compatible`: ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE

For each variant, this trains the params.yaml recipe (the project's own loop, full data, in a
process of its own per training so that each starts from torch's defaults) unpinned and with each
pin, alternating, `--rounds` times; prints the median epoch time of each mode, its ratio to the
unpinned one, and an MD5 of the trained weights (the same MD5 on two machines: the same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = {
    "unpinned": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "compatible": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
    },
}
ONE_TRAINING = """
import hashlib, json, sys, time
from pathlib import Path
import torch
from mnist_pipeline import loop
from mnist_pipeline.config import load_params
from mnist_pipeline.dataset import load_dataset
root, variant = Path(sys.argv[1]), sys.argv[2]
params = load_params(root / "params.yaml")
data = load_dataset(root, params.data.dataset)
recipe = params.recipe(variant)
setup = loop.set_up(variant, recipe, params.train, data, torch.device("cpu"))
fitted = loop.fit(setup, recipe=recipe, keep="last", on_epoch=lambda r, e: None, label=variant)
state = fitted.kept_state
md5 = hashlib.md5(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
seconds = [row["time/epoch_seconds"] for row in fitted.history]
print(json.dumps({"epoch_s": seconds, "md5": md5, "isa": torch.backends.cpu.get_cpu_capability()}))
"""


def train(root: Path, variant: str, pins: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINS["avx2"]} | pins
    env["PYTHONPATH"] = str(REPO / "src")
    proc = subprocess.run(
        [sys.executable, "-c", ONE_TRAINING, str(root), variant],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="ffn1_relu,ffn3_relu,mlp_relu_dropout,mlp512_relu")
    parser.add_argument("--modes", default="unpinned,avx2,compatible")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        subprocess.run(
            [sys.executable, "-m", "mnist_pipeline", "download"],
            cwd=root,
            env=os.environ | {"PYTHONPATH": str(REPO / "src"), "MNIST_PIPELINE_ROOT": tmp},
            check=True,
            capture_output=True,
        )
        print("| variant | mode | median s/epoch | time / unpinned | weights MD5 | ATen path |")
        print("|---|---|---:|---:|---|---|")
        for variant in args.variants.split(","):
            found: dict[str, list[dict]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode in modes:  # alternating: the machine's drift hits every mode alike
                    found[mode].append(train(root, variant, PINS[mode]))
            base = statistics.median(s for r in found[modes[0]] for s in r["epoch_s"][1:])
            for mode in modes:
                median = statistics.median(s for r in found[mode] for s in r["epoch_s"][1:])
                md5s = {r["md5"][:10] for r in found[mode]}
                print(
                    f"| {variant} | {mode} | {median:.3f} | {median / base:.2f}x "
                    f"| {', '.join(sorted(md5s))} | {found[mode][0]['isa']} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
