"""Ctrl-C that always stops a command: SIGINT is remembered as well as raised.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is, and some places lose it:
a `__del__` method, a weakref finalizer or any callback the garbage collector runs at that moment
(a collection after torch.compile runs many; the interpreter prints
"Exception ignored in ..." and goes on), a library that catches every exception and raises its
own (a loader's error instead of the interrupt). While a command runs (`sigint_remembered`), the
handler here notes each SIGINT; inside a finalizer it does not raise there but sends the signal
again a moment later, so that the interrupt lands in ordinary code. `stop_if_interrupted()` raises
KeyboardInterrupt at the command's own checkpoints (after loading, at every event) for one that
was lost all the same, and `cli.common.run_command` ends with exit status 130 whenever one came.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from contextlib import contextmanager

__all__ = ["interrupted", "sigint_remembered", "stop_if_interrupted"]

_RETRY_S = 0.02  # how soon a SIGINT that came inside a finalizer is sent again


class _Handler:
    def __init__(self) -> None:
        self.seen = False
        self.retry: threading.Timer | None = None

    def __call__(self, signum, frame) -> None:
        self.seen = True
        if _in_finalizer(frame):  # raising here would be printed and lost
            self.retry = threading.Timer(_RETRY_S, self._again)
            self.retry.daemon = True
            self.retry.start()
            return
        raise KeyboardInterrupt

    def _again(self) -> None:
        if signal.getsignal(signal.SIGINT) is self:  # the command still runs
            os.kill(os.getpid(), signal.SIGINT)


def _in_finalizer(frame) -> bool:
    if _collecting[0]:  # a finalizer the garbage collector runs may have any name
        return True
    while frame is not None:
        code = frame.f_code
        if (
            code is _gc_phase.__code__
            or code.co_name == "__del__"
            or (code.co_name in ("__call__", "_exitfunc") and code.co_filename.endswith("weakref.py"))
        ):
            return True
        frame = frame.f_back
    return False


_handler = _Handler()
_collecting = [False]  # the garbage collector is running (and with it, finalizers)


def _gc_phase(phase: str, info: dict) -> None:
    _collecting[0] = phase == "start"


@contextmanager
def sigint_remembered():
    """SIGINT handled as the module says while the block runs (in the main thread only; elsewhere
    the block runs as it is); the previous handler comes back after."""
    _handler.seen = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    gc.callbacks.append(_gc_phase)
    try:
        yield
    finally:
        gc.callbacks.remove(_gc_phase)
        _collecting[0] = False
        signal.signal(signal.SIGINT, previous)
        if _handler.retry is not None:
            _handler.retry.cancel()
            _handler.retry = None


def interrupted() -> bool:
    """Whether a SIGINT came while the command ran, even one that some code swallowed."""
    return _handler.seen


def stop_if_interrupted() -> None:
    """KeyboardInterrupt if a SIGINT came and was lost on its way."""
    if _handler.seen:
        raise KeyboardInterrupt
