"""Stage 1, `mnist-pipeline download`: fetch the four IDX files, verified; and the IDX loader.

    MNIST_MIRROR=../shared/data/mnist mnist-pipeline download

A file is accepted only if its *uncompressed* content has the canonical MD5 (mirrors re-compress,
so the .gz bytes may differ). Files are written atomically: data/ holds valid files or none.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from mnist_pipeline.config import DataConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import atomic_path
from mnist_pipeline.paths import data_dir

if TYPE_CHECKING:  # the download stage never imports torch
    import torch

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Canonical MD5 of the uncompressed content.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRROR_ENV = "MNIST_MIRROR"
# A JSON file {file name: md5} replacing the canonical table: for tests on tiny data sets and for
# private mirrors of derived data. Unset in normal use.
CHECKSUMS_ENV = "MNIST_CHECKSUMS_FILE"
TIMEOUT_S = 30
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
    return CHECKSUMS[dataset]


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_checksum(md5s: dict[str, str]) -> str:
    """One checksum for the data set: the MD5 of its files' MD5s, in a fixed order."""
    return hashlib.md5("".join(md5s[name] for name in FILES).encode()).hexdigest()


# --- download ---------------------------------------------------------------------------------


class MirrorFailure(Exception):
    """This mirror could not provide a valid copy of this file (the message says why)."""


def _local_folder(mirror: str) -> Path | None:
    """The folder a mirror names (a path or a file: URL), or None for a remote URL."""
    if mirror.startswith("file:"):
        # url2pathname undoes the percent-encoding (Path.as_uri() writes a space as %20);
        # urlsplit drops a `localhost` host.
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(mirror).path))
    if "://" in mirror:
        return None
    return Path(mirror).expanduser()


def _open_source(mirror: str, name: str) -> tuple[BinaryIO, int | None]:
    """Open `<mirror>/<name>` (a URL or a local folder); return the stream and its length."""
    folder = _local_folder(mirror)
    if folder is None:
        url = mirror.rstrip("/") + "/" + name
        request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline"})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as err:
            raise MirrorFailure(f"HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise MirrorFailure(f"unreachable ({reason})") from None
        except (http.client.HTTPException, ValueError) as err:
            # a malformed URL (`http://host:port-typo/`) or a reply that is not HTTP
            raise MirrorFailure(f"bad URL or reply ({type(err).__name__}: {err})") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None
    path = folder / name
    if not folder.is_dir():
        raise MirrorFailure("no such folder")
    if not path.is_file():
        raise MirrorFailure("file not found")
    return path.open("rb"), path.stat().st_size


def _decompressed_chunks(raw: BinaryIO, progress: Callable[[int], None]) -> Iterable[bytes]:
    """The content of a gzip stream, chunk by chunk; a stream that is not gzip passes as is.

    Errors on truncated or corrupt gzip data and on HTML error pages served in place of data.
    """

    def read() -> bytes:
        data = raw.read(CHUNK)
        progress(len(data))
        return data

    # Sniff a whole first chunk, not two bytes: error pages may open with blank lines.
    chunk = read()
    if not chunk:
        raise MirrorFailure("served an empty file")
    if chunk[:2] != b"\x1f\x8b":
        if chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
            raise MirrorFailure("served an HTML page, not the data")
        while chunk:
            yield chunk
            chunk = read()
        return
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        while chunk:
            yield decompressor.decompress(chunk)
            if decompressor.eof and decompressor.unused_data:
                # Concatenated gzip members are valid gzip (gunzip reads them all); the
                # content goes on in the next member.
                chunk = decompressor.unused_data
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                chunk = read()
        yield decompressor.flush()
    except zlib.error as err:
        raise MirrorFailure(f"corrupt gzip data ({err})") from None
    if not decompressor.eof:
        raise MirrorFailure("truncated gzip file")


def _fetch_one(mirror: str, name: str, expected_md5: str, target: Path, show_bar: bool) -> None:
    """Download `name` from `mirror` into `target`, atomically, or raise MirrorFailure."""
    bar = None
    try:
        stream, length = _open_source(mirror, name + ".gz")
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=length, unit="B", unit_scale=True, desc=name, leave=False)
        with stream, atomic_path(target) as tmp:
            digest = hashlib.md5()
            with tmp.open("wb") as out:
                for chunk in _decompressed_chunks(stream, bar.update if bar else lambda n: None):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected_md5:
                raise MirrorFailure(
                    f"content MD5 {digest.hexdigest()} is not the expected {expected_md5} "
                    "(corrupt file or wrong data set)"
                )
            _check_idx_header(tmp, name)
    except (OSError, http.client.HTTPException) as err:
        # HTTPException: IncompleteRead when a chunked reply is cut off
        raise MirrorFailure(f"read failed ({type(err).__name__}: {err})") from None
    finally:
        if bar:
            bar.close()


def mirrors_to_try(data: DataConfig) -> tuple[str, ...]:
    """MNIST_MIRROR alone when set (it takes precedence), else the params.yaml mirrors."""
    if override := os.environ.get(MIRROR_ENV):
        return (override,)
    return data.dataset_mirrors


def download(data: DataConfig, root: Path, log: Callable[[str], None] = print) -> Path:
    """Make data/<dataset>/ hold the four verified IDX files; return that folder."""
    folder = data_dir(root, data.dataset)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    checksums = expected_checksums(data.dataset)
    missing = [n for n in FILES if not _is_valid(folder / n, checksums[n])]
    if not missing:
        log(f"{_rel(folder, root)}: all {len(FILES)} files present and valid; nothing to do")
        return folder

    mirrors = mirrors_to_try(data)
    if not mirrors:
        raise PipelineError(
            f"no mirror configured for {data.dataset}: add URLs under data.mirrors.{data.dataset} "
            f"in params.yaml or set {MIRROR_ENV} to a folder or URL holding the four .gz files"
        )
    show_bar = sys.stderr.isatty()
    for name in missing:
        tried = []
        for mirror in mirrors:
            try:
                _fetch_one(mirror, name, checksums[name], folder / name, show_bar)
            except MirrorFailure as failure:
                tried.append(f"{mirror}: {failure}")
                continue
            log(f"{name}: downloaded from {mirror}, MD5 verified")
            break
        else:
            raise PipelineError(
                f"could not get a valid {name}.gz for {data.dataset}; tried "
                + "; ".join(tried)
                + f". Set {MIRROR_ENV} to a folder or URL holding the four .gz files "
                f"(e.g. {MIRROR_ENV}=../shared/data/{data.dataset})"
            )
    log(f"{_rel(folder, root)}: {len(FILES)} files ready")
    return folder


def _is_valid(path: Path, md5: str) -> bool:
    return path.is_file() and file_md5(path) == md5


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --- IDX loading ------------------------------------------------------------------------------

_IDX_UBYTE = 0x08
_MAX_HEADER = 4 + 4 * 255  # the rank is one byte
_FIX = "re-run `mnist-pipeline download`"


class _BadIdx(Exception):
    """A malformed IDX file; the loader adds how to fix it, the download names the mirror."""


def _parse_header(header: bytes, name: str) -> tuple[int, ...]:
    """The dimensions in an IDX header (`header` may run on into the data)."""
    if len(header) < 4 or header[0:2] != b"\x00\x00" or header[2] != _IDX_UBYTE:
        raise _BadIdx(f"{name}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        raise _BadIdx(f"{name}: IDX header is truncated")
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _check_size(dims: tuple[int, ...], size: int, name: str) -> None:
    """The file holds exactly the header and the items its dimensions promise."""
    expected = math.prod(dims)  # exact: numpy's int64 product can overflow on a garbage header
    held = size - (4 + 4 * len(dims))
    if held != expected:
        raise _BadIdx(
            f"{name}: holds {held} bytes of data, its IDX header promises {expected} "
            f"(shape {dims}); the file is truncated or corrupt"
        )


def _check_idx_header(path: Path, name: str) -> None:
    """Magic, rank (the `idx3` in the name) and size: what a custom MD5 table cannot vouch for."""
    with path.open("rb") as f:
        header = f.read(_MAX_HEADER)
    try:
        dims = _parse_header(header, name)
        if (rank := re.search(r"-idx(\d)-", name)) and len(dims) != int(rank[1]):
            raise _BadIdx(f"{name}: IDX header has rank {len(dims)}, expected {rank[1]}")
        _check_size(dims, path.stat().st_size, name)
    except _BadIdx as err:
        raise MirrorFailure(str(err)) from None


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes into a uint8 tensor, checking magic and size."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing; {_FIX}")
    data = path.read_bytes()
    try:
        dims = _parse_header(data[:_MAX_HEADER], str(path))  # not [:16]: any rank is valid IDX
        _check_size(dims, len(data), str(path))
    except _BadIdx as err:
        raise PipelineError(f"{err}; {_FIX}") from None
    import torch

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
    if not folder.is_dir() or not any((folder / n).exists() for n in FILES):
        raise PipelineError(f"{_rel(folder, root)}: no data; {fix}")
    md5s = {}
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise PipelineError(f"{_rel(path, root)}: missing; {fix}")
        md5s[name] = file_md5(path)
    if verify:
        expected = expected_checksums(dataset)
        for name in FILES:
            if md5s[name] != expected[name]:
                raise PipelineError(
                    f"{_rel(folder / name, root)}: content does not match its checksum "
                    f"(corrupt or truncated); {fix}, which replaces it"
                )
    tensors = {name: read_idx(folder / name) for name in FILES}
    train_x, train_y = tensors[FILES[0]], tensors[FILES[1]]
    test_x, test_y = tensors[FILES[2]], tensors[FILES[3]]
    for split, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or y.dim() != 1:
            raise PipelineError(
                f"{_rel(folder, root)}: {split} files have unexpected shapes; {fix}"
            )
        if len(x) != len(y):
            raise PipelineError(
                f"{_rel(folder, root)}: {split} has {len(x)} images but {len(y)} labels; {fix}"
            )
        if len(y) and int(y.max()) > 9:
            raise PipelineError(f"{_rel(folder, root)}: {split} labels outside 0-9; {fix}")
    return Dataset(
        name=dataset,
        train_images=train_x,
        train_labels=train_y.long(),
        test_images=test_x,
        test_labels=test_y.long(),
        checksum=data_checksum(md5s),
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (used by tests and tools that build small data sets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with path.open("wb") as f:
        f.write(header)
        f.write(array.tobytes())


def gzip_file(src: Path, dst: Path) -> None:
    with src.open("rb") as f_in, gzip.open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
