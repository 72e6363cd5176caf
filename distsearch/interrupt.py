"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. If
that is a finaliser or a weakref callback (matplotlib's transform clean-up, during garbage
collection), the exception is printed as "Exception ignored" and dropped, and a search would
run on to its end as if nobody had pressed Ctrl-C (seen on CI). `sigint_recorded()` makes the
handler also remember the signal; the long loops call `raise_if_interrupted()` between steps,
which raises it again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pending = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def sigint_recorded() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt as usual and is also recorded. Only where Python's
    own handler is in place (main thread, SIGINT not ignored); elsewhere nothing changes."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _pending = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pending = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a recorded Ctrl-C was swallowed on its way."""
    if _pending:
        raise KeyboardInterrupt
