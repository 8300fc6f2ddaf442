"""Atomic writes: a reader sees the old file or the new one, never half of one."""

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnist_pipeline.errors import PipelineError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it over `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_atomic(target: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)`, then move tmp over `target`; a failing write is one PipelineError naming it."""
    try:
        with atomic_path(target) as tmp:
            write(tmp)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        fix = ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "; free some disk space and run it again"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"; check that {target.parent} is writable"
        raise PipelineError(
            f"could not write {target} ({reason}); what was there before is unchanged{fix}"
        ) from err


def write_text_atomic(target: Path, text: str) -> None:
    write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2) + "\n")
