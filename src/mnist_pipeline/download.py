"""The download stage: fetch the four IDX files from a mirror (params.yaml's, or MNIST_MIRROR).

Not torchvision's: it checks the .gz files' MD5s, which a re-compressing mirror fails. Here the
content's MD5 and IDX header are checked, and each file is written atomically."""

import gzip
import hashlib
import http.client
import io
import os
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm
from tqdm.utils import CallbackIOWrapper

from mnist_pipeline import dataset
from mnist_pipeline.config import DataConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import atomic_path
from mnist_pipeline.paths import data_dir

MIRROR_ENV = "MNIST_MIRROR"


class MirrorFailure(Exception):
    """This mirror could not provide a valid copy of this file (the message says why)."""


def _local_folder(mirror: str) -> Path | None:
    """The folder a mirror names (a path or a file: URL), or None for a remote URL."""
    if mirror.startswith("file:"):
        # url2pathname undoes the percent-encoding (a space is %20); urlsplit drops `localhost`
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(mirror).path))
    return None if "://" in mirror else Path(mirror).expanduser()


def _open_source(mirror: str, name: str) -> tuple[BinaryIO, int | None]:
    folder = _local_folder(mirror)
    if folder is None:
        url = mirror.rstrip("/") + "/" + name
        request = urllib.request.Request(url, headers={"User-Agent": "mnist-pipeline"})
        try:
            response = urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as err:
            raise MirrorFailure(f"HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise MirrorFailure(f"unreachable ({reason})") from None
        except (http.client.HTTPException, ValueError) as err:  # a bad URL, a reply not HTTP
            raise MirrorFailure(f"bad URL or reply ({type(err).__name__}: {err})") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length and length.isdigit() else None
    path = folder / name
    if not folder.is_dir():
        # absolute: a relative MNIST_MIRROR is read from the working directory (under DVC: the root)
        raise MirrorFailure(f"no such folder ({folder.resolve()})")
    if not path.is_file():
        raise MirrorFailure("file not found")
    return path.open("rb"), path.stat().st_size


def _content(raw: BinaryIO, progress: Callable[[int], None]) -> Iterator[bytes]:
    """A gzip stream's content (every member), chunk by chunk, or a plain stream as is; refuses
    corrupt or truncated gzip and HTML error pages."""
    buffered = io.BufferedReader(raw, dataset.CHUNK)
    head = buffered.peek(dataset.CHUNK)  # a whole buffer: error pages may open with blanks
    stream = CallbackIOWrapper(progress, buffered, "read")  # each read's length to the bar
    if not head:
        raise MirrorFailure("served an empty file")
    if head[:2] != b"\x1f\x8b":  # not gzip
        if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
            raise MirrorFailure("served an HTML page, not the data")
        yield from iter(lambda: stream.read(dataset.CHUNK), b"")
        return
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as content:
            yield from iter(lambda: content.read(dataset.CHUNK), b"")
    except EOFError:
        raise MirrorFailure("truncated gzip file") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise MirrorFailure(f"corrupt gzip data ({err})") from None


def _fetch_one(mirror: str, name: str, expected_md5: str, target: Path) -> None:
    try:
        stream, length = _open_source(mirror, name + ".gz")
        bar = tqdm(total=length, unit="B", unit_scale=True, desc=name, leave=False, disable=None)
        with stream, bar, atomic_path(target) as tmp:
            digest = hashlib.md5()
            with tmp.open("wb") as out:
                for chunk in _content(stream, bar.update):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected_md5:
                raise MirrorFailure(
                    f"content MD5 {digest.hexdigest()} is not the expected {expected_md5} "
                    "(corrupt file or wrong data set)"
                )
            dataset.check_idx_file(tmp, name)
    except dataset.BadIdx as err:
        raise MirrorFailure(str(err)) from None
    except (OSError, http.client.HTTPException) as err:  # IncompleteRead: a chunked reply cut off
        raise MirrorFailure(f"read failed ({type(err).__name__}: {err})") from None


def mirrors_to_try(data: DataConfig) -> tuple[str, ...]:
    override = os.environ.get(MIRROR_ENV)
    return (override,) if override else data.dataset_mirrors


def how_to_fix(data: DataConfig) -> str:
    """What would work (never the setting that just failed): a mirror of one's own (README)."""
    files = " ".join(f"{name}.gz" for name in dataset.FILES)
    source = data.dataset_mirrors[0] if data.dataset_mirrors else "a public mirror"
    hint = (
        f"To work offline, fetch {files} from {source} on a machine with internet into a "
        f"folder and set {MIRROR_ENV} to that folder (or to any URL serving them)"
    )
    if os.environ.get(MIRROR_ENV) and data.dataset_mirrors:
        hint += f"; or unset {MIRROR_ENV} to use the mirrors in params.yaml"
    return hint


def download(data: DataConfig, root: Path, log: Callable[[str], None] = print) -> Path:
    """Make data/<dataset>/ hold the four verified IDX files; on failure, remove what it made."""
    folder = data_dir(root, data.dataset)
    made = [p for p in (folder, *folder.parents) if p.is_relative_to(root) and not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _download_into(folder, data, root, log)
    except BaseException:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty: valid files fetched before the failure stay
                break
        raise
    return folder


def _download_into(folder: Path, data: DataConfig, root: Path, log: Callable[[str], None]) -> None:
    for stale in folder.glob(".*.tmp"):  # a process killed mid-write left it
        stale.unlink(missing_ok=True)
    checksums = dataset.expected_checksums(data.dataset)
    missing = [n for n in dataset.FILES if not _is_valid(folder / n, checksums[n])]
    where = dataset.shown_path(folder, root)
    if not missing:
        log(f"{where}: all {len(dataset.FILES)} files present and valid; nothing to do")
        return
    mirrors = mirrors_to_try(data)
    if not mirrors:
        raise PipelineError(
            f"no mirror configured for {data.dataset}: add URLs under data.mirrors.{data.dataset} "
            f"in params.yaml or set {MIRROR_ENV} to a folder or URL holding the four .gz files"
        )
    for name in missing:
        tried = []
        for mirror in mirrors:
            try:
                _fetch_one(mirror, name, checksums[name], folder / name)
            except MirrorFailure as failure:
                tried.append(f"{mirror}: {failure}")
                continue
            log(f"{name}: downloaded from {mirror}, MD5 verified")
            break
        else:
            raise PipelineError(
                f"could not get a valid {name}.gz for {data.dataset}; tried {'; '.join(tried)}. "
                + how_to_fix(data)
            )
    log(f"{where}: {len(dataset.FILES)} files ready")


def _is_valid(path: Path, md5: str) -> bool:
    return path.is_file() and dataset.file_md5(path) == md5
