"""Ctrl-C as one line, wherever it lands.

TVM's FFI hands a KeyboardInterrupt raised inside a Python callback (TVMScript parsing, passes written in
Python) back as a bare RuntimeError, so the exception that reaches the top does not say the user pressed
Ctrl-C, and code that tries a schedule and takes any error for "does not apply" may swallow it and go on.
While `watching`, a SIGINT handler notes that it fired, then raises KeyboardInterrupt as Python's own does;
the command's end asks whether it fired.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_fired = False


def _on_sigint(signum, frame) -> None:
    global _fired
    _fired = True
    signal.default_int_handler(signum, frame)


@contextmanager
def watching() -> Iterator[None]:
    """Note SIGINT while the block runs (in the main thread, where handlers are set, over Python's default
    handler; anywhere else the block just runs)."""
    global _fired
    previous = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is not signal.default_int_handler
    ):
        yield
        return
    _fired = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def handled() -> None:
    """The caller dealt with the Ctrl-C (a chat stops its reply, goes on): the command does not end on it."""
    global _fired
    _fired = False


def fired() -> bool:
    """Whether SIGINT arrived in the current (or last) `watching` block."""
    return _fired


def interrupted(error: BaseException) -> bool:
    """Whether `error` is the user's Ctrl-C: a KeyboardInterrupt, or any error raised after SIGINT fired."""
    return isinstance(error, KeyboardInterrupt) or _fired
