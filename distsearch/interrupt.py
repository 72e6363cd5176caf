"""Ctrl-C and SIGTERM that are never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. If
that is a finaliser or a weakref callback (matplotlib's transform clean-up, during garbage
collection), the exception is printed as "Exception ignored" and dropped, and a search would
run on to its end as if nobody had pressed Ctrl-C (seen on CI). `signals_recorded()` makes the
handler also remember the signal; the long loops call `raise_if_interrupted()` between steps,
which raises it again.

With `sigterm=True` (search, train) SIGTERM, a cluster's preemption or `kill`, takes the same
path as `Terminated`: the lease is released and the resume hint printed, instead of a silent
death whose lease other hosts honour for a minute.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pending: int | None = None  # the signal recorded, until the context ends


class Terminated(KeyboardInterrupt):
    """SIGTERM inside `signals_recorded(sigterm=True)`."""


def _raise(signum: int) -> None:
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = signum
    _raise(signum)


@contextmanager
def signals_recorded(sigterm: bool = False) -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt as usual and is also recorded; with `sigterm`,
    SIGTERM raises Terminated. Only signals with Python's default handling and only on the main
    thread (SIGINT ignored, as under nohup, stays ignored); elsewhere nothing changes."""
    global _pending
    wanted = []
    if threading.current_thread() is threading.main_thread():
        wanted += [signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []
        wanted += [signal.SIGTERM] if sigterm and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else []
    kept = {s: signal.signal(s, _on_signal) for s in wanted}
    hook = sys.unraisablehook
    _pending = None
    if wanted:  # a dropped interrupt is raised again: no "Exception ignored" traceback for it
        sys.unraisablehook = lambda u: None if issubclass(u.exc_type, KeyboardInterrupt) else hook(u)
    try:
        yield
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _pending = None


def raise_if_interrupted() -> None:
    """Raise the recorded signal's exception if it was swallowed on its way."""
    if _pending is not None:
        _raise(_pending)
