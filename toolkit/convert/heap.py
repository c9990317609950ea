"""The allocator setting for a process whose whole job is one conversion (`phi3 convert`, a first run's
conversion process).

Each tensor passes through fresh float32 arrays of up to a few hundred MB. glibc serves every allocation above
its mmap threshold (at most 32 MB) with a fresh mapping and unmaps it on free, so the kernel zero-fills every
page of every such array again: most of a Phi-3-mini conversion's system time. With one arena and no mmap'd
chunks, freed arrays stay in the heap (trimmed only beyond 2 GB free) and the next tensor reuses their pages.
Not for a library caller's process, whose other threads would share one arena, nor for GPTQ, whose peak
memory is its limit (freed pages kept in the heap raised it by ~0.2 GB at Phi-3-mini width).
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_UP_TO = 2**31 - 1  # mallopt takes an int


def reuse_freed_memory() -> bool:
    """Switch this process's allocator as above; False where it is not glibc's (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not libc.gnu_get_libc_version:  # musl has a mallopt that does nothing
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    return all(mallopt(param, value) == 1 for param, value in settings)
