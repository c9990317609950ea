"""Facts about this machine's CPU, read once from /proc/cpuinfo and its cache sizes from sysfs (Linux; empty
elsewhere).

The one parser for the tuned-records fingerprint (`compile.tuned_records`), the benchmark report
(`bench.harness`) and the llama.cpp wheel cache key (`bench.llama_cpp`). x86 names the fields "model name" /
"flags", ARM "Model" / "Features"; the first occurrence wins (every core repeats them).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@cache
def _fields() -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return found
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in found:
            found[key] = value.strip()
    return found


def cpu_model() -> str:
    """The CPU's model name ("" when /proc/cpuinfo has none)."""
    f = _fields()
    return f.get("model name") or f.get("Model") or ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features`); empty when unknown."""
    f = _fields()
    return frozenset((f.get("flags") or f.get("Features") or "").split())


def cpu_name() -> str:
    """The model name, else what `platform` says (for reports: never empty where the OS knows anything)."""
    return cpu_model() or platform.processor()


# The flags (as /proc/cpuinfo spells them) of the vector extensions the host kernels choose paths by: what
# a tuned record's speed depends on, and what a benchmark table must name beside its numbers
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)


def isa_flags() -> list[str]:
    """This CPU's ISA_FLAGS, sorted."""
    return sorted(f for f in cpu_flags() if f in ISA_FLAGS)


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@cache
def last_level_cache_bytes() -> int:
    """Size of the largest cache level cpu0 sees (Linux sysfs: `index*/level` and `size`, e.g. "480M"),
    0 where unknown. On a VM this is what the hypervisor reports, shared with its neighbours."""
    best_level, best = 0, 0
    for index in sorted(CPU_CACHES.glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except ValueError:
            continue
        if level > best_level or level == best_level and size > best:
            best_level, best = level, size
    return best


def uncached_bytes(floor: int) -> int:
    """Bytes to cycle through so that none of them is still cached when its turn comes again: `floor`, or
    twice the last-level cache where that is more (a VM may report hundreds of MiB)."""
    return max(floor, 2 * last_level_cache_bytes())


# Linux's arch_prctl request for the AMX tile data state (x86-64 syscall 158; granted from Linux 5.16)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def amx_tiles_granted() -> bool | None:
    """Ask the OS for this process's AMX tile registers, as the AMX kernels do on each call: whether it
    granted them; None where there is no way to ask (not Linux on x86-64)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
