"""Helpers the tests share: writers of small IDX data sets (the format `dataset.read_idx` reads)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from mnist_pipeline.dataset import IDX_UBYTE


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with path.open("wb") as f:
        f.write(header)
        f.write(array.tobytes())


def gzip_file(src: Path, dst: Path) -> None:
    with src.open("rb") as f_in, gzip.open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
