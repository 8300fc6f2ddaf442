"""Ctrl-C and SIGTERM during a training, acted on between two steps, never inside a library call.

Raised inside MLflow's or SQLAlchemy's code with a lock held, it hung the run's clean-up: so the
handler notes it for `check()`; a second one acts at once."""

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
