"""`convert.heap.reuse_freed_memory`: a process that converts keeps the pages of a freed tensor for the next
one instead of returning them to the kernel (which would zero-fill fresh ones for every tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import os, sys
import numpy as np
from toolkit.convert.heap import reuse_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
base = rss()
np.ones(64 << 20, np.uint8)  # touched, then freed at once, as a converted tensor's float32 copy is
kept = rss() - base
np.ones(64 << 20, np.uint8)
grown = rss() - base - kept
print(kept >> 20, grown >> 20)
"""


def _mib(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    kept, grown = map(int, out.stdout.split())
    return kept, grown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_pages_are_kept_for_the_next_one():
    kept, _ = _mib("default")
    assert kept < 8  # glibc unmapped the 64 MiB array on free
    kept, grown = _mib("reuse")
    assert kept >= 60 and grown < 4  # kept, and the next array of that size took the same pages
