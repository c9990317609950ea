"""Ctrl-C as one line, wherever it lands.

TVM's FFI hands a KeyboardInterrupt raised inside a Python callback (TVMScript parsing, passes written in
Python) back as a bare RuntimeError, so the exception that reaches the top does not say the user pressed
Ctrl-C, and code that tries a schedule and takes any error for "does not apply" may swallow it and go on.
While `watching`, a SIGINT handler notes that it fired, then raises KeyboardInterrupt as Python's own does;
the command's end asks whether it fired.

Between the command's end and the process's (joining threads, exit-time cleanup) a KeyboardInterrupt would
print "Exception ignored" and a traceback and still exit 0: `exiting` lets that cleanup finish, then exits
130 with one line; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_fired = False
_fired_exiting = False


def _on_sigint(signum, frame) -> None:
    global _fired
    _fired = True
    signal.default_int_handler(signum, frame)


@contextmanager
def watching() -> Iterator[None]:
    """Note SIGINT while the block runs (in the main thread, where handlers are set, over Python's default
    handler; anywhere else the block just runs)."""
    global _fired
    _fired = False  # also where no handler is set: an earlier block's Ctrl-C is not this one's
    previous = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is not signal.default_int_handler
    ):
        yield
        return
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


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more to say on it
            pass


def _stop_now() -> None:
    _flush()
    os.write(2, b"error: interrupted\n")
    os._exit(130)


def quiet_teardown() -> None:
    """An interrupted command has said its one line: what the process's exit prints after it goes nowhere.
    Objects that Ctrl-C left half-built are destroyed then, and TVM's destructors log warnings of their own
    ("BlockBuilder destroyed with remaining blocks!") straight to fd 2. The real program only (`cli.run`)."""
    _flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _on_sigint_exiting(signum, frame) -> None:
    global _fired_exiting
    if _fired_exiting:
        _stop_now()
    _fired_exiting = True


def exiting() -> None:
    """The command is over: from here a Ctrl-C is noted, not raised (main thread only, over Python's default
    handler: a process started with SIGINT ignored keeps ignoring it)."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _on_sigint_exiting)


# registered at import, before the libraries a command loads: atexit runs it after their cleanup
@atexit.register
def _exit_interrupted() -> None:
    if _fired_exiting:
        _stop_now()
