"""Where the toolkit keeps what it builds for the user: one cache root for every kind of entry.

Under it: `lib/` (JIT-compiled libraries), `weights/` (converted weights), `package-lib/`, `locks/`,
`gguf/` and `wheels/` (benchmark references). PHI3_TOOLKIT_CACHE moves all of it (the tests give each
session its own). Imports nothing heavy: the lock files are needed before TVM is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path


def _cache_variable() -> str:
    """PHI3_TOOLKIT_CACHE, "" when unset or blank (`PHI3_TOOLKIT_CACHE= phi3 ...` means the default, not the
    current folder)."""
    return os.environ.get("PHI3_TOOLKIT_CACHE", "").strip()


def cache_root() -> Path:
    """$PHI3_TOOLKIT_CACHE, default ~/.cache/phi3-toolkit (read on every call: tests change it)."""
    return Path(_cache_variable() or "~/.cache/phi3-toolkit").expanduser()


def cache_note(filename: str | os.PathLike | None) -> str:
    """For an OS error on `filename`: where that path comes from when it is in (or is) the cache root, since
    the user never named it; else ""."""
    if not filename:
        return ""
    root = cache_root()
    try:
        Path(os.path.abspath(filename)).relative_to(os.path.abspath(root))
    except ValueError:
        return ""
    if variable := _cache_variable():
        return f" (the toolkit's cache: PHI3_TOOLKIT_CACHE={variable})"
    return f" (the toolkit's cache, {root}: set PHI3_TOOLKIT_CACHE to use another folder)"
