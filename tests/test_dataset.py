"""Stage 1: the download and the IDX loader.

Mirrors are real: an HTTP server on 127.0.0.1 that can 404, serve an HTML page with status 200, a
truncated or corrupt .gz, or the gzip of the wrong content; a local folder; a file:// URL. The data
is conftest's tiny data set, so nothing here needs the network or the real files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import yaml

from mnist_pipeline.cli import main
from mnist_pipeline.config import DataConfig, load_params
from mnist_pipeline.dataset import FILES, data_checksum, file_md5, load_dataset, read_idx
from mnist_pipeline.download import download, mirrors_to_try
from mnist_pipeline.errors import PipelineError
from tests.helpers import write_idx

if TYPE_CHECKING:  # conftest is pytest's to import: its fixtures give these tests their data
    from tests.conftest import Mirror

REDOWNLOAD = "mnist-pipeline download"  # every loader error points the user at the fix


# --- a real HTTP mirror on 127.0.0.1 -------------------------------------------------------------


@dataclass
class Reply:
    body: bytes
    status: int = 200
    content_type: str = "application/gzip"
    length: int | None = None  # Content-Length to announce (default: the body's)
    chunked: bool = False  # send as one chunk announcing `length`, then hang up mid-chunk


@dataclass
class HttpMirror:
    """The server's URL, what it serves (path -> Reply; anything else 404s) and the paths asked."""

    url: str
    routes: dict[str, Reply] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def serve(self, prefix: str, files: dict[str, bytes | Reply]) -> str:
        """Serve `files` (name -> .gz bytes) under /<prefix>/; return that mirror's URL."""
        for name, body in files.items():
            self.routes[f"/{prefix}/{name}"] = body if isinstance(body, Reply) else Reply(body)
        return f"{self.url}/{prefix}/"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: HttpMirror


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append(self.path)
        reply = state.routes.get(self.path)
        if reply is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        length = len(reply.body) if reply.length is None else reply.length
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{length:x}\r\n".encode() + reply.body)
        else:
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(reply.body)
        self.close_connection = True  # a short body ends with the connection, as on a real drop

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean


@pytest.fixture
def http_mirror() -> Iterator[HttpMirror]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = HttpMirror(url=f"http://127.0.0.1:{server.server_address[1]}")
    # A short poll interval: shutdown() waits up to one interval, after every test.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server.state
    server.shutdown()
    server.server_close()
    thread.join()


def gz_files(mirror: Mirror) -> dict[str, bytes]:
    return {f"{name}.gz": (mirror.folder / f"{name}.gz").read_bytes() for name in FILES}


def expected_md5s(mirror: Mirror) -> dict[str, str]:
    return json.loads(mirror.checksums.read_text())


def set_params(root: Path, dataset: str = "mnist", mirrors: list[str] | None = None) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["dataset"] = dataset
    if mirrors is not None:
        params["data"]["mirrors"] = {dataset: mirrors}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def leftovers(root: Path) -> list[str]:
    """Every file under data/ (temporary files included, they start with a dot)."""
    data = root / "data"
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idx_header(*dims: int, magic: bytes = b"\x00\x00\x08") -> bytes:
    return magic + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


# --- good downloads ------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_download_over_http(
    tiny_env, tiny_mirror, http_mirror, monkeypatch, capsys, dataset, slash
):
    url = http_mirror.serve("good", gz_files(tiny_mirror)).rstrip("/") + slash
    monkeypatch.setenv("MNIST_MIRROR", url)
    set_params(tiny_env, dataset)

    assert main(["download"]) == 0

    folder = tiny_env / "data" / dataset
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)
    assert leftovers(tiny_env) == sorted(f"{dataset}/{n}" for n in FILES)
    assert sorted(http_mirror.requests) == sorted(f"/good/{n}.gz" for n in FILES)
    out = capsys.readouterr()
    assert out.err == ""
    assert "MD5 verified" in out.out


def test_404_mirror_then_a_good_one(tiny_env, tiny_mirror, http_mirror, monkeypatch):
    monkeypatch.delenv("MNIST_MIRROR")
    good = http_mirror.serve("good", gz_files(tiny_mirror))
    set_params(tiny_env, mirrors=[f"{http_mirror.url}/gone/", good])

    assert main(["download"]) == 0

    folder = tiny_env / "data" / "mnist"
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)
    # Each file: the first mirror (404), then the second.
    assert http_mirror.requests == [p for n in FILES for p in (f"/gone/{n}.gz", f"/good/{n}.gz")]


def _recompressed(raw: bytes, how: str) -> bytes:
    if how == "level 1":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if how == "two gzip members":  # valid gzip (RFC 1952 allows it); `gunzip` reads both
        half = len(raw) // 2
        return gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    return raw  # a mirror serving the file uncompressed


@pytest.mark.parametrize("how", ["level 1", "two gzip members", "uncompressed"])
def test_content_is_checked_not_the_gz_bytes(tiny_env, tiny_mirror, http_mirror, monkeypatch, how):
    files = {f"{n}.gz": _recompressed((tiny_mirror.raw / n).read_bytes(), how) for n in FILES}
    monkeypatch.setenv("MNIST_MIRROR", http_mirror.serve("re", files))

    assert main(["download"]) == 0

    folder = tiny_env / "data" / "mnist"
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)


@pytest.mark.parametrize(
    "form", ["folder", "folder with a space", "file:// URL", "file://localhost"]
)
def test_local_mirrors(tiny_env, tiny_mirror, tmp_path, monkeypatch, form):
    folder = tiny_mirror.folder
    if form != "folder":
        folder = tmp_path / "my mirror"
        folder.mkdir()
        for name, body in gz_files(tiny_mirror).items():
            (folder / name).write_bytes(body)
    mirror = {
        "file:// URL": folder.as_uri(),  # percent-encoded: file:///.../my%20mirror
        "file://localhost": "file://localhost" + folder.as_uri().removeprefix("file://"),
    }.get(form, str(folder))
    monkeypatch.setenv("MNIST_MIRROR", mirror)

    assert main(["download"]) == 0

    folder = tiny_env / "data" / "mnist"
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)


def test_mnist_mirror_takes_precedence(tiny_env, tiny_mirror, http_mirror, monkeypatch):
    set_params(tiny_env, mirrors=[http_mirror.serve("params", gz_files(tiny_mirror))])
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror.folder))

    assert main(["download"]) == 0
    assert http_mirror.requests == []  # the params.yaml mirror was never asked

    data = DataConfig(dataset="mnist", mirrors={"mnist": ("a", "b")})
    assert mirrors_to_try(data) == (str(tiny_mirror.folder),)
    monkeypatch.setenv("MNIST_MIRROR", "")  # set but empty: as if unset
    assert mirrors_to_try(data) == ("a", "b")


def test_stale_temporary_files_are_cleaned(tiny_env):
    folder = tiny_env / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / ".train-images-idx3-ubyte.abc123.tmp").write_bytes(b"half a file")

    assert main(["download"]) == 0
    assert leftovers(tiny_env) == sorted(f"mnist/{n}" for n in FILES)


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_env, capsys):
    assert main(["download"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert len(out.out.splitlines()) <= len(FILES) + 1
    assert "\r" not in out.out


def test_progress_bar_on_a_terminal(tiny_env, monkeypatch):
    class Terminal:
        def __init__(self) -> None:
            self.text: list[str] = []

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> int:
            self.text.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["download"]) == 0
    assert "train-images-idx3-ubyte" in "".join(terminal.text)


# --- bad mirrors ---------------------------------------------------------------------------------

BROKEN = "train-images-idx3-ubyte"


def _flipped(data: bytes, index: int, mask: int) -> bytes:
    body = bytearray(data)
    body[index] ^= mask
    return bytes(body)


PAGE = "<!DOCTYPE html><html><body><h1>Service unavailable</h1></body></html>"
# Each bad reply for BROKEN.gz, built from (raw bytes, gzip bytes, the other file's raw bytes),
# and a phrase the error must contain. None: the file is absent (a 404).
BAD_REPLIES = [
    pytest.param(lambda raw, gz, other: None, "HTTP 404", id="404"),
    pytest.param(
        lambda raw, gz, other: Reply(
            b"Internal Server Error", status=500, content_type="text/plain"
        ),
        "HTTP 500",
        id="500",
    ),
    pytest.param(lambda raw, gz, other: Reply(gz[: len(gz) // 2]), "truncated", id="truncated .gz"),
    pytest.param(  # promises the whole file, sends half
        lambda raw, gz, other: Reply(gz[: len(gz) // 2], length=len(gz)),
        "truncated",
        id="connection dropped",
    ),
    pytest.param(
        lambda raw, gz, other: Reply(gz[: len(gz) // 2], length=len(gz), chunked=True),
        "read failed",
        id="chunked, dropped",
    ),
    pytest.param(
        lambda raw, gz, other: Reply(_flipped(gz, len(gz) // 2, 0xFF)),
        "corrupt gzip",
        id="corrupt .gz",
    ),
    # valid gzip of other data: another file, or this one with one byte changed
    pytest.param(lambda raw, gz, other: Reply(gzip.compress(other)), "MD5", id="wrong content"),
    pytest.param(
        lambda raw, gz, other: Reply(gzip.compress(_flipped(raw, -1, 1))), "MD5", id="one byte off"
    ),
    pytest.param(lambda raw, gz, other: Reply(b""), "empty", id="empty"),
    pytest.param(  # with status 200, as captive portals and some CDNs do
        lambda raw, gz, other: Reply(PAGE.encode(), status=200, content_type="text/html"),
        "HTML",
        id="HTML page",
    ),
    pytest.param(
        lambda raw, gz, other: Reply(f"\r\n\r\n  {PAGE}".encode(), content_type="text/html"),
        "HTML",
        id="HTML page after blank lines",
    ),
]
BY_ID = {case.id: case.values[0] for case in BAD_REPLIES}


def serving_broken(mirror: Mirror, reply) -> dict[str, bytes | Reply]:
    """The tiny mirror's files with BROKEN.gz replaced by `reply(raw, gz, other)` (or absent)."""
    files: dict[str, bytes | Reply] = dict(gz_files(mirror))
    gz = files.pop(f"{BROKEN}.gz")
    built = reply((mirror.raw / BROKEN).read_bytes(), gz, (mirror.raw / FILES[2]).read_bytes())
    if built is not None:
        files[f"{BROKEN}.gz"] = built
    return files


@pytest.mark.parametrize(("reply", "reason"), BAD_REPLIES)
def test_a_bad_mirror_is_rejected_with_a_reason(
    tiny_env, tiny_mirror, http_mirror, monkeypatch, reply, reason
):
    files = serving_broken(tiny_mirror, reply)
    url = http_mirror.serve("bad", files)
    monkeypatch.setenv("MNIST_MIRROR", url)

    with pytest.raises(PipelineError) as err:
        download(DataConfig("mnist", {}), tiny_env, log=lambda line: None)

    message = str(err.value)
    assert "\n" not in message
    assert f"{BROKEN}.gz" in message and url in message and reason in message
    assert "MNIST_MIRROR" in message
    assert leftovers(tiny_env) == []  # nothing half-written, no temporary file


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\x00\x00\x0d\x03", id="float IDX"),  # the type byte: 0x0d is float
        pytest.param(b"PK\x03\x04", id="not IDX"),
        pytest.param(idx_header(600 * 28 * 28), id="rank 1 in an idx3 file"),
        pytest.param(idx_header(600, 28, 27), id="dims do not match the size"),
    ],
)
def test_malformed_idx_header_is_rejected(
    tiny_env, tiny_mirror, http_mirror, monkeypatch, tmp_path, header
):
    # The MD5 table is made for the malformed content, so only the header check can catch it.
    raw = (tiny_mirror.raw / BROKEN).read_bytes()
    bad = header + raw[len(header) :]
    checksums = expected_md5s(tiny_mirror) | {BROKEN: hashlib.md5(bad).hexdigest()}
    (tmp_path / "md5.json").write_text(json.dumps(checksums))
    monkeypatch.setenv("MNIST_CHECKSUMS_FILE", str(tmp_path / "md5.json"))
    files = gz_files(tiny_mirror) | {f"{BROKEN}.gz": gzip.compress(bad)}
    monkeypatch.setenv("MNIST_MIRROR", http_mirror.serve("bad", files))

    with pytest.raises(PipelineError, match=f"{BROKEN}.gz.*IDX"):
        download(DataConfig("mnist", {}), tiny_env, log=lambda line: None)
    assert leftovers(tiny_env) == []


def test_every_mirror_fails_one_line_no_traceback(
    tiny_env, tiny_mirror, http_mirror, monkeypatch, capsys, tmp_path
):
    monkeypatch.delenv("MNIST_MIRROR")
    gz = (tiny_mirror.folder / f"{BROKEN}.gz").read_bytes()
    mirrors = [
        f"{http_mirror.url}/gone/",  # 404
        http_mirror.serve("cut", {f"{BROKEN}.gz": gz[:100]}),  # truncated
        http_mirror.serve("html", {f"{BROKEN}.gz": Reply(b"<html>oops</html>")}),
        f"http://127.0.0.1:{closed_port()}/",  # nobody listening
        "http://127.0.0.1:notaport/",  # a typo in params.yaml
        str(tmp_path / "no-such-folder"),
    ]
    set_params(tiny_env, mirrors=mirrors)

    code = main(["download"])

    err = capsys.readouterr().err
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert f"{BROKEN}.gz" in err and "MNIST_MIRROR" in err
    for mirror in mirrors:
        assert mirror in err
    assert leftovers(tiny_env) == []


@pytest.mark.parametrize("kind", ["404", "wrong content", "HTML page"])
def test_failed_redownload_leaves_existing_data_untouched(
    tiny_data, tiny_mirror, http_mirror, monkeypatch, capsys, kind
):
    folder = tiny_data / "data" / "mnist"
    (folder / BROKEN).write_bytes((folder / BROKEN).read_bytes()[:1000])  # so it is re-fetched
    before = snapshot(folder)
    files = serving_broken(tiny_mirror, BY_ID[kind])
    monkeypatch.setenv("MNIST_MIRROR", http_mirror.serve("bad", files))

    assert main(["download"]) == 1

    assert snapshot(folder) == before  # same bytes, same mtimes, no new or temporary file
    assert http_mirror.requests == [f"/bad/{BROKEN}.gz"]  # the valid files were not fetched
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_valid_data_means_nothing_to_do(tiny_data, http_mirror, monkeypatch, capsys):
    folder = tiny_data / "data" / "mnist"
    before = snapshot(folder)
    monkeypatch.setenv("MNIST_MIRROR", f"{http_mirror.url}/gone/")  # would fail if asked

    assert main(["download"]) == 0

    assert http_mirror.requests == []
    assert snapshot(folder) == before
    assert "nothing to do" in capsys.readouterr().out


def test_canonical_checksums_reject_other_data(tiny_env, monkeypatch):
    monkeypatch.delenv("MNIST_CHECKSUMS_FILE")  # the real MNIST table: tiny data is not MNIST
    with pytest.raises(PipelineError, match="6bbc9ace898e44ae57da46a324031adb"):
        download(DataConfig("mnist", {}), tiny_env, log=lambda line: None)
    assert leftovers(tiny_env) == []


@pytest.mark.parametrize("text", ["not json", "[]", '{"train-images-idx3-ubyte": "abc"}'])
def test_bad_checksums_file_is_a_clear_error(tiny_env, tmp_path, monkeypatch, text):
    (tmp_path / "md5.json").write_text(text)
    monkeypatch.setenv("MNIST_CHECKSUMS_FILE", str(tmp_path / "md5.json"))
    with pytest.raises(PipelineError, match="MNIST_CHECKSUMS_FILE"):
        download(DataConfig("mnist", {}), tiny_env, log=lambda line: None)


def test_a_failed_first_download_leaves_no_folder(tiny_env, tmp_path, monkeypatch, capsys):
    """A mirror path that does not exist (a README path copied into another layout): the error
    says where it looked and suggests something else; data/ is as it was, with no empty folder."""
    missing = tmp_path / "shared" / "data" / "fashion-mnist"
    monkeypatch.setenv("MNIST_MIRROR", str(missing))
    set_params(tiny_env, dataset="fashion-mnist")

    assert main(["download"]) == 1

    assert not (tiny_env / "data").exists()
    err = capsys.readouterr().err
    assert f"no such folder ({missing})" in err
    assert err.count(str(missing)) == 2  # where it looked; never suggested back
    public = yaml.safe_load((tiny_env / "params.yaml").read_text())["data"]["mirrors"]
    assert f"from {public['fashion-mnist'][0]} on a machine with internet" in err
    assert "or unset MNIST_MIRROR" in err


def test_the_error_suggests_a_mirror_that_works(
    tiny_env, tiny_mirror, http_mirror, monkeypatch, tmp_path
):
    """Follow the error's advice to the letter: fetch the named files from the named source into
    a folder, point MNIST_MIRROR at it, and the download succeeds."""
    source = http_mirror.serve("public", gz_files(tiny_mirror))
    set_params(tiny_env, mirrors=[source])
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_env / "not-here"))
    with pytest.raises(PipelineError) as err:
        download(load_params(tiny_env / "params.yaml").data, tiny_env, log=lambda line: None)

    advice = str(err.value).split(". To work offline, ")[1]
    names = advice.split("fetch ")[1].split(" from ")[0].split()
    url = advice.split(" from ")[1].split(" on a machine")[0]
    assert url == source and len(names) == len(FILES)
    own = tmp_path / "my-mirror"
    own.mkdir()
    for name in names:
        with urllib.request.urlopen(url + name, timeout=10) as reply:
            (own / name).write_bytes(reply.read())
    monkeypatch.setenv("MNIST_MIRROR", str(own))

    assert main(["download"]) == 0
    folder = tiny_env / "data" / "mnist"
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)


def test_cli_end_to_end_in_a_subprocess(tiny_env, tiny_mirror, tmp_path):
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for name, body in gz_files(tiny_mirror).items():
        (bad / name).write_bytes(body[: len(body) // 2] if name == f"{BROKEN}.gz" else body)
    env = dict(os.environ, MNIST_MIRROR=str(bad))

    def run() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mnist_pipeline", "download"]
        return subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    failed = run()
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("mnist-pipeline download: error: ")
    assert f"{BROKEN}.gz" in failed.stderr and str(bad) in failed.stderr
    assert "MNIST_MIRROR" in failed.stderr

    env["MNIST_MIRROR"] = str(tiny_mirror.folder)
    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    folder = tiny_env / "data" / "mnist"
    assert {n: file_md5(folder / n) for n in FILES} == expected_md5s(tiny_mirror)


# --- the IDX loader ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 28, 28), (7,), (2, 3, 4, 5), (3, 0, 28)])
def test_read_idx_round_trip(tmp_path, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    write_idx(tmp_path / "a.idx", array)
    tensor = read_idx(tmp_path / "a.idx")
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == shape
    assert np.array_equal(tensor.numpy(), array)


def _idx_cases() -> list:
    good = idx_header(2, 28, 28)
    pixels = bytes(2 * 28 * 28)
    return [
        pytest.param(b"", "magic number", id="empty"),
        pytest.param(b"\x00\x00", "magic number", id="two bytes"),
        pytest.param(
            idx_header(2, 28, 28, magic=b"\x00\x00\x0d") + pixels * 4, "magic number", id="float"
        ),
        pytest.param(
            idx_header(2, 28, 28, magic=b"\x01\x00\x08") + pixels, "magic number", id="bad magic"
        ),
        pytest.param(good[:10], "header is truncated", id="header cut"),
        pytest.param(good + pixels[:-1], "truncated or corrupt", id="data cut"),
        pytest.param(good + pixels + b"\x00", "truncated or corrupt", id="extra byte"),
        pytest.param(
            idx_header(2**32 - 1, 2**32 - 1, 2**32 - 1), "truncated or corrupt", id="huge"
        ),
    ]


@pytest.mark.parametrize(("content", "phrase"), _idx_cases())
def test_read_idx_rejects_malformed_files(tmp_path, content, phrase):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        read_idx(path)
    assert phrase in str(err.value)
    assert str(path) in str(err.value) and REDOWNLOAD in str(err.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(PipelineError, match=f"missing.*{REDOWNLOAD}"):
        read_idx(tmp_path / "nope")


def test_load_dataset(tiny_data, tiny_mirror):
    data = load_dataset(tiny_data, "mnist")
    assert data.train_images.shape == (600, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (200, 28, 28)
    assert data.train_labels.shape == (600,) and data.train_labels.dtype == torch.int64
    assert int(data.train_labels.max()) <= 9
    assert data.checksum == data_checksum(expected_md5s(tiny_mirror))


def _rewrite(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        write_idx(folder / name, make(read_idx(folder / name).numpy()))

    return mutate


def _labels_ten(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[3] = 10
    return labels


LOADER_CASES = [
    pytest.param(shutil.rmtree, "no data", id="no folder"),
    pytest.param(lambda f: (f / FILES[3]).unlink(), "missing", id="file missing"),
    pytest.param(
        lambda f: (f / FILES[0]).write_bytes(b"\x00\x00\x0d\x03" + bytes(12)),
        "magic number",
        id="bad magic",
    ),
    pytest.param(
        lambda f: (f / FILES[2]).write_bytes((f / FILES[2]).read_bytes()[:-5]),
        "truncated or corrupt",
        id="truncated",
    ),
    pytest.param(_rewrite(FILES[0], lambda x: x[:, :27, :]), "unexpected shapes", id="27x28"),
    pytest.param(
        _rewrite(FILES[0], lambda x: x.reshape(600, -1)), "unexpected shapes", id="rank 2"
    ),
    pytest.param(
        _rewrite(FILES[1], lambda y: y.reshape(-1, 1)), "unexpected shapes", id="labels 2D"
    ),
    pytest.param(_rewrite(FILES[1], lambda y: y[:-1]), "600 images but 599 labels", id="counts"),
    pytest.param(_rewrite(FILES[3], lambda y: y[:-1]), "200 images but 199 labels", id="t10k"),
    pytest.param(_rewrite(FILES[3], _labels_ten), "labels outside 0-9", id="label 10"),
]


@pytest.mark.parametrize(("mutate", "phrase"), LOADER_CASES)
def test_load_dataset_rejects_bad_data(tiny_data, mutate, phrase):
    mutate(tiny_data / "data" / "mnist")
    with pytest.raises(PipelineError) as err:
        load_dataset(tiny_data, "mnist", verify=False)
    assert phrase in str(err.value) and REDOWNLOAD in str(err.value)


def test_load_dataset_verifies_checksums(tiny_data):
    folder = tiny_data / "data" / "mnist"
    labels = read_idx(folder / FILES[1]).numpy().copy()
    labels[0] = (labels[0] + 1) % 10  # still a well-formed file: only the MD5 can tell
    write_idx(folder / FILES[1], labels)
    with pytest.raises(PipelineError, match=f"{FILES[1]}: content does not match its checksum"):
        load_dataset(tiny_data, "mnist")
    assert load_dataset(tiny_data, "mnist", verify=False).train_labels[0] == int(labels[0])
