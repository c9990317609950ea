"""Facts about this machine's CPU, read once from /proc/cpuinfo (Linux; empty elsewhere).

The one parser for the tuned-records fingerprint (`compile.tuned_records`), the benchmark report
(`bench.harness`) and the llama.cpp wheel cache key (`bench.llama_cpp`). x86 names the fields "model name" /
"flags", ARM "Model" / "Features"; the first occurrence wins (every core repeats them).
"""

from __future__ import annotations

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
