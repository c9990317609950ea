"""Row-blocked numpy work on a thread per CPU: numpy leaves the GIL inside its loops, so disjoint row
blocks of one tensor (dequantizing a GGUF tensor, quantizing or clip-searching a weight) run side by side."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def parallel_row_blocks(
    fn: Callable[[int], None], n_rows: int, block_rows: int, start: int = 0, max_threads: int = 8
) -> None:
    """fn(r0) for r0 in range(start, n_rows, block_rows), in threads; the blocks must be disjoint. The
    first block's exception is raised here."""
    starts = range(start, n_rows, block_rows)
    workers = min(len(starts), os.cpu_count() or 1, max_threads)
    if workers <= 1:
        for r0 in starts:
            fn(r0)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, starts))  # list(): re-raises the first exception of a block
