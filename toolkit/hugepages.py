"""Memory on transparent huge pages (Linux): a host model's weights, and what the bandwidth probe and the
tuner read in their place.

Decode reads every weight once per token, in long runs. On 4 KiB pages the CPU's prefetchers stop at each
page boundary and each page costs a TLB walk; on 2 MiB pages the same GEMVs read faster (Phi-3-mini
shapes, Sapphire Rapids VM, 2 threads: shared/notes and the closing notes give the figures). Linux backs
memory with huge pages only where asked (`madvise(MADV_HUGEPAGE)`, THP mode "madvise", the common
default) or everywhere ("always"), and only for 2 MiB-aligned ranges touched after the advice. So the
weights go into one 2 MiB-aligned anonymous mapping advised before it is written (all weights in one,
small ones too), and are handed to TVM without a copy (DLPack): a weights folder's shards are read
straight into it (`huge_arrays`, runtime/weights.py); tensors already loaded are copied into it
(`in_huge_pages`), each old one released before the next copy and the freed pages returned to the system
every TRIM_BYTES, so that peak memory is the weights plus about that much.

Writing faults the huge pages in, and the kernel has to assemble each one (compaction, zeroing): most of
the time goes there, not into the bytes themselves. A large tensor is written by one thread per CPU, each
its own run of whole huge pages, so the faults are taken in parallel.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tvm

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
KDL_CPU = 1
ALIGN = 256  # bytes between tensors in the shared mapping (TVM's kernels assume 64)
TRIM_BYTES = 128 << 20  # old copies freed between two returns of heap pages: the peak above the weights
PARALLEL_BYTES = 4 * HUGE_PAGE  # smaller tensors are copied by the calling thread alone


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where there is none."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), None)


def huge_pages_available() -> bool:
    """Whether this system backs advised anonymous memory with huge pages (Linux, THP not "never")."""
    return sys.platform.startswith("linux") and thp_mode() in ("always", "madvise")


def huge_region(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of `nbytes` on a 2 MiB-aligned anonymous mapping advised to use huge
    pages; the array keeps the mapping alive."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    start = -(-addr // HUGE_PAGE) * HUGE_PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size - (start - addr)), MADV_HUGEPAGE)  # advice only
    return np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=start - addr)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def in_huge_pages(params: list, device) -> list:
    """`params` with every host tensor numpy can view moved into one mapping on huge pages, in place (the
    list is returned), one after another at ALIGN-byte offsets: the small ones too (a tensor under 2 MiB
    on its own would leave most of its huge page empty, and on 4 KiB pages a GEMV's scale stream costs a
    TLB walk per page). Other devices, other systems, THP off, and dtypes numpy can't view (e.g. bfloat16)
    are left as they are."""
    if device.dlpack_device_type() != KDL_CPU or not huge_pages_available():
        return params
    sizes = [_nbytes(t) for t in params]
    total = sum(_aligned(n) for n in sizes if n)
    if not total:
        return params
    # the old copies go back to the C heap, and glibc keeps freed chunks below its mmap threshold (up to 32
    # MiB each, i.e. nearly every weight) in the process: unless handed back to the system as we go, RSS
    # peaks at the weights twice, just before the end
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries differ
    region, at, freed = huge_region(total), 0, 0
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        for i, n in enumerate(sizes):
            if not n:
                continue
            src = np.from_dlpack(params[i])
            dst = region[at : at + n].view(src.dtype).reshape(src.shape)
            _copy(dst, src, region.ctypes.data + at, pool, workers if n >= PARALLEL_BYTES else 1)
            del src
            params[i] = tvm.runtime.from_dlpack(dst)  # the old tensor goes now
            at += _aligned(n)
            freed += n
            if trim is not None and freed >= TRIM_BYTES:
                trim(0)
                freed = 0
    if trim is not None:
        trim(0)
    return params


def huge_arrays(specs: list[tuple[tuple[int, ...], np.dtype]], fill: Callable[[int, int, np.ndarray], None]):
    """Arrays of the (shape, dtype) `specs`, one after another in one mapping on huge pages (ALIGN bytes
    apart, as `in_huge_pages` places them), their bytes written by `fill(i, start, dst)`: dst is bytes
    start .. start + dst.size of array i as uint8. The calls run on one thread per CPU, a large array's
    split among them in runs of whole pages (`copy_runs`); fill must release the GIL to gain from that
    (a file read, a numpy copy)."""
    sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs]
    region = huge_region(max(1, sum(_aligned(n) for n in sizes)))
    workers, at, arrays, jobs = os.cpu_count() or 1, 0, [], []
    for i, ((shape, dtype), n) in enumerate(zip(specs, sizes, strict=True)):
        raw = region[at : at + n]
        runs = copy_runs(region.ctypes.data + at, n, workers) if n >= PARALLEL_BYTES else [(0, n)]
        jobs += [(i, a, raw[a:b]) for a, b in runs if b > a]
        arrays.append(raw.view(dtype).reshape(shape))
        at += _aligned(n)
    pool = ThreadPoolExecutor(workers)
    try:
        list(pool.map(lambda job: fill(*job), jobs))
    finally:  # an error or a Ctrl-C: the runs not started are dropped, not read
        pool.shutdown(cancel_futures=True)
    return arrays


def _copy(dst: np.ndarray, src: np.ndarray, address: int, pool: ThreadPoolExecutor, runs: int) -> None:
    """dst[...] = src on the pool's threads, in `copy_runs(address, dst.nbytes, runs)`; numpy releases the
    GIL while it copies."""
    if runs <= 1:
        np.copyto(dst, src)
        return
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    list(pool.map(lambda r: np.copyto(d[r[0] : r[1]], s[r[0] : r[1]]), copy_runs(address, d.size, runs)))


def copy_runs(address: int, nbytes: int, runs: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges that cover nbytes at `address`, about `runs` of them (one more for a head
    before the first huge-page boundary), every cut on a huge-page boundary: no two share a page."""
    first = min(-(-address // HUGE_PAGE) * HUGE_PAGE - address, nbytes)  # bytes before the first boundary
    per = max(1, -(-(nbytes - first) // HUGE_PAGE // runs)) * HUGE_PAGE
    cuts = ([0] if first else []) + list(range(first, nbytes, per)) + [nbytes]
    return list(zip(cuts, cuts[1:]))


def _nbytes(t) -> int:
    """Bytes of host tensor `t` as numpy views it; 0 where numpy can't (e.g. bfloat16) or it is empty."""
    try:
        return int(np.from_dlpack(t).nbytes)
    except (TypeError, ValueError, BufferError, RuntimeError):
        return 0
