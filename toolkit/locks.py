"""One writer per output: a file lock keyed by the output's real path, and cleanup of what dead writers left.

Two processes preparing the same model (a cache entry, a convert folder) used to race or fail; now the second
waits for the first (with a message, and a timeout), then finds the finished output. Lock files live in the
cache folder, never next to the user's output.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .paths import cache_root

# a compile of a real model takes minutes; PHI3_TOOLKIT_LOCK_TIMEOUT lowers it
DEFAULT_TIMEOUT_S = 3600.0


def default_timeout_s() -> float:
    """PHI3_TOOLKIT_LOCK_TIMEOUT (seconds; unset or blank: DEFAULT_TIMEOUT_S), read when a lock is taken: a
    bad value is then one line of the command, not a traceback at import."""
    raw = os.environ.get("PHI3_TOOLKIT_LOCK_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"PHI3_TOOLKIT_LOCK_TIMEOUT={raw!r} is not a number of seconds >= 0")
    return value


_LOCKS: dict[str, FileLock] = {}


def _lock_file(target: Path) -> Path:
    key = hashlib.sha256(os.path.realpath(target).encode()).hexdigest()[:24]
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


def _temp_pid(target: Path, name: str) -> int | None:
    """The writer pid in a temp name we (or an older toolkit) derive from `target`, else None."""
    t = re.escape(target.name)
    for pat in (rf"{t}\.(?:tmp|old)-(\d+)", rf"\.tmp-(\d+)-{t}", rf"\.{t}\.partial-(\d+)"):
        m = re.fullmatch(pat, name)
        if m:
            return int(m.group(1))
    return None


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove temp siblings of `target` left by other writers. Called with the lock held: every writer of
    `target` holds it while writing, so a temp of another pid is stale even if that pid was reused."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        pid = _temp_pid(target, p.name)
        if pid is None or pid == os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
            missing_ok=True
        )
        removed.append(p)
    return removed


@contextmanager
def output_lock(target: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Lock `target`: wait for another writer (message on stderr); UserError on timeout."""
    target = Path(target).expanduser()
    timeout = default_timeout_s() if timeout is None else timeout
    lock_path = str(_lock_file(target))
    # one FileLock object per file: it counts nested acquisitions (the JIT cache locks a folder, then convert
    # locks it again); two objects on one file would deadlock this process against itself. Thread-local
    # counts: another thread of this process (a first run's weight conversion) waits like another process.
    lock = _LOCKS.setdefault(lock_path, FileLock(lock_path, thread_local=True))
    if lock.is_locked:
        with lock:
            yield
        return
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(
            f"{target}: another phi3 process is writing it; waiting (up to {timeout:.0f} s)", file=sys.stderr
        )
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise UserError(
                f"another phi3 process is still writing it after {timeout:.0f} s; try again later", target
            ) from None
    try:
        clean_stale_temps(target)
        yield
    finally:
        lock.release()
