"""Ctrl-C and SIGTERM during a training, acted on between two steps, never inside a library call.

Raised where it landed, the exception could start inside MLflow's or SQLAlchemy's code with a lock
held, and the run's clean-up hung. So the handler only notes it for `check()`; a second one acts
at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM as an exception: the run ends KILLED and no checkpoint is written."""


class _Received:
    signum: int | None = None


def _interruption(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check() -> None:
    if _Received.signum is not None:
        raise _interruption(_Received.signum)


def received() -> bool:
    return _Received.signum is not None


@contextmanager
def between_steps() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait for `check()` (in the main thread only)."""

    def handler(signum, frame):
        if _Received.signum is not None:
            raise _interruption(signum)
        _Received.signum = signum

    _Received.signum = None
    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _Received.signum = None
