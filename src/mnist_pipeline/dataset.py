"""The data set on disk: the four IDX files, their checksums, and loading them into tensors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.paths import DATA_FILES, data_dir

if TYPE_CHECKING:
    import torch

FILES = DATA_FILES
# The canonical MD5s of the uncompressed files, in the order of FILES.
CHECKSUMS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "6bbc9ace898e44ae57da46a324031adb",
        "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea",
        "27ae3e4e09519cfbb04c329615203637",
    ),
    "fashion-mnist": (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}
# A JSON file {file name: md5} replacing that table: tests' tiny data sets, private mirrors.
CHECKSUMS_ENV = "MNIST_CHECKSUMS_FILE"
CHUNK = 1 << 20


def expected_checksums(dataset: str) -> dict[str, str]:
    if path := os.environ.get(CHECKSUMS_ENV):
        try:
            table = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise PipelineError(
                f"{CHECKSUMS_ENV}={path}: cannot read a JSON table: {err}"
            ) from None
        if not isinstance(table, dict) or not all(isinstance(table.get(n), str) for n in FILES):
            raise PipelineError(
                f"{CHECKSUMS_ENV}={path}: expected a JSON object mapping each of "
                f"{', '.join(FILES)} to its MD5"
            )
        return {name: table[name] for name in FILES}
    return dict(zip(FILES, CHECKSUMS[dataset], strict=True))


def file_md5(path: Path) -> str:
    digest = hashlib.md5()  # hashlib.file_digest needs Python 3.11
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_checksum(md5s: dict[str, str]) -> str:
    """One checksum for the data set: the MD5 of its files' MD5s, in a fixed order."""
    return hashlib.md5("".join(md5s[name] for name in FILES).encode()).hexdigest()


def shown_path(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# IDX, read here: torchvision's reader asserts rather than says what is wrong, and needs torch.
IDX_UBYTE = 0x08
_MAX_HEADER = 4 + 4 * 255  # the rank is one byte
_FIX = "re-run `mnist-pipeline download`"


class BadIdx(Exception):
    """A malformed IDX file: the loader adds how to fix it, the download names the mirror."""


def _parse_header(header: bytes, name: str) -> tuple[int, ...]:
    """The dimensions in an IDX header (`header` may run on into the data)."""
    if len(header) < 4 or header[0:2] != b"\x00\x00" or header[2] != IDX_UBYTE:
        raise BadIdx(f"{name}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        raise BadIdx(f"{name}: IDX header is truncated")
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _check_size(dims: tuple[int, ...], size: int, name: str) -> None:
    expected = math.prod(dims)  # exact: numpy's int64 product can overflow on a garbage header
    held = size - (4 + 4 * len(dims))
    if held != expected:
        raise BadIdx(
            f"{name}: holds {held} bytes of data, its IDX header promises {expected} "
            f"(shape {dims}); the file is truncated or corrupt"
        )


def check_idx_file(path: Path, name: str) -> None:
    """Magic, rank (the `idx3` in the name) and size: what a custom MD5 table cannot vouch for."""
    with path.open("rb") as f:
        header = f.read(_MAX_HEADER)
    dims = _parse_header(header, name)
    if (rank := re.search(r"-idx(\d)-", name)) and len(dims) != int(rank[1]):
        raise BadIdx(f"{name}: IDX header has rank {len(dims)}, expected {rank[1]}")
    _check_size(dims, path.stat().st_size, name)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor, its magic and size checked."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing; {_FIX}")
    data = path.read_bytes()
    try:
        dims = _parse_header(data[:_MAX_HEADER], str(path))  # not [:16]: any rank is valid IDX
        _check_size(dims, len(data), str(path))
    except BadIdx as err:
        raise PipelineError(f"{err}; {_FIX}") from None
    import torch  # here alone: `download` uses this module without torch

    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
    return torch.from_numpy(array.copy())


@dataclass(frozen=True)
class Dataset:
    """A data set in memory: uint8 images (N, 28, 28) and int64 labels (N,)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    checksum: str


def load_dataset(root: Path, dataset: str, verify: bool = True) -> Dataset:
    """Load data/<dataset>/ into tensors, checking shapes, counts and (verify) the MD5s."""
    folder = data_dir(root, dataset)
    fix = "run `mnist-pipeline download` (or `dvc repro download`)"
    where = shown_path(folder, root)
    if not folder.is_dir() or not any((folder / n).exists() for n in FILES):
        raise PipelineError(f"{where}: no data; {fix}")
    md5s = {}
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise PipelineError(f"{shown_path(path, root)}: missing; {fix}")
        md5s[name] = file_md5(path)
    if verify:
        expected = expected_checksums(dataset)
        for name in FILES:
            if md5s[name] != expected[name]:
                raise PipelineError(
                    f"{shown_path(folder / name, root)}: content does not match its checksum "
                    f"(corrupt or truncated); {fix}, which replaces it"
                )
    train_x, train_y, test_x, test_y = (read_idx(folder / name) for name in FILES)
    for split, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or y.dim() != 1:
            raise PipelineError(f"{where}: {split} files have unexpected shapes; {fix}")
        if len(x) != len(y):
            raise PipelineError(f"{where}: {split} has {len(x)} images but {len(y)} labels; {fix}")
        if len(y) and int(y.max()) > 9:
            raise PipelineError(f"{where}: {split} labels outside 0-9; {fix}")
    return Dataset(dataset, train_x, train_y.long(), test_x, test_y.long(), data_checksum(md5s))
