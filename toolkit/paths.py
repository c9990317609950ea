"""Where the toolkit keeps what it builds for the user: one cache root for every kind of entry.

Under it: `lib/` (JIT-compiled libraries), `weights/` (converted weights), `package-lib/`, `locks/`,
`gguf/` and `wheels/` (benchmark references). PHI3_TOOLKIT_CACHE moves all of it (the tests give each
session its own). Imports nothing heavy: the lock files are needed before TVM is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PHI3_TOOLKIT_CACHE, default ~/.cache/phi3-toolkit (read on every call: tests change it)."""
    return Path(os.environ.get("PHI3_TOOLKIT_CACHE", "~/.cache/phi3-toolkit")).expanduser()
