"""Model weights on the host in transparent huge pages (Linux).

Decode reads every weight once per token, in long runs. On 4 KiB pages the CPU's prefetchers stop at each
page boundary and each page costs a TLB walk; on 2 MiB pages the same GEMVs read faster (Phi-3-mini
shapes, Sapphire Rapids VM, 2 threads: shared/notes and the closing notes give the figures). Linux backs
memory with huge pages only where asked (`madvise(MADV_HUGEPAGE)`, THP mode "madvise", the common
default) or everywhere ("always"), and only for 2 MiB-aligned ranges touched after the advice. TVM's
loader has already filled the weights by the time we get them, so each large one is copied once into a
fresh 2 MiB-aligned anonymous mapping advised before the copy, then handed to TVM without a copy
(DLPack). The old tensor is released before the next copy, and its pages returned to the system at the
end: peak memory is the weights plus one tensor.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import numpy as np
import tvm

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
KDL_CPU = 1


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where there is none."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), None)


def _huge_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on a 2 MiB-aligned anonymous mapping advised to use huge pages; the array
    keeps the mapping alive."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    start = -(-addr // HUGE_PAGE) * HUGE_PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size - (start - addr)), MADV_HUGEPAGE)  # advice only
    flat = np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=start - addr)
    return flat.view(dtype).reshape(shape)


def in_huge_pages(params: list, device, min_bytes: int = HUGE_PAGE) -> list:
    """`params` with each host tensor of at least `min_bytes` moved into huge pages, in place (the list is
    returned). Other devices, other systems, THP off, and dtypes numpy can't view are left as they are."""
    if device.dlpack_device_type() != KDL_CPU or not sys.platform.startswith("linux"):
        return params
    if thp_mode() not in ("always", "madvise"):
        return params
    for i in range(len(params)):
        params[i] = _moved(params[i], min_bytes)
    # the old copies went back to the C heap (glibc keeps freed chunks below its mmap threshold, up to
    # 32 MiB each, in the process): hand those pages back to the system, or RSS holds the weights twice
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries differ
    if trim is not None:
        trim(0)
    return params


def _moved(t, min_bytes: int):
    """`t` copied into huge pages, or `t` itself (too small, or a dtype numpy can't view)."""
    try:
        src = np.from_dlpack(t)
    except (TypeError, ValueError, BufferError, RuntimeError):  # e.g. bfloat16
        return t
    if src.nbytes < min_bytes:
        return t
    dst = _huge_array(src.shape, src.dtype)
    np.copyto(dst, src)
    return tvm.runtime.from_dlpack(dst)
