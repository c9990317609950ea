"""CUDA without a GPU: compile every kernel with nvcc for each preset arch and read what a fatbin holds.

ptxas (`-Xptxas -v`) names every entry function it compiles for the real arch, so the check proves each
`__global__` kernel of the generated source became SASS for that arch, not just that nvcc exited 0.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from ..compile.cuda_aot import nvcc_compile
from ..targets import Preset

_GLOBAL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
FATBIN_MAGIC = 0xBA55ED50


@dataclass
class CudaCompileReport:
    preset: str
    arch: str
    kernels: list[str]
    compiled: list[str]
    missing: list[str] = field(default_factory=list)
    cubin_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and bool(self.kernels)


def kernel_names(cuda_source: str) -> list[str]:
    return sorted(set(_GLOBAL.findall(cuda_source)))


def compile_kernels(cuda_source: str, preset: Preset) -> CudaCompileReport:
    """nvcc -cubin for the preset's arch with ptxas verbose output; report which kernels were compiled."""
    import time

    start = time.perf_counter()
    cubin, log = nvcc_compile(cuda_source, preset, "cubin", extra=["-Xptxas", "-v"])
    expected = kernel_names(cuda_source)
    arch = preset.cuda_arch or "?"
    compiled = sorted({name for name, sm in _PTXAS_ENTRY.findall(log) if sm == arch})
    return CudaCompileReport(
        preset.name,
        arch,
        expected,
        compiled,
        sorted(set(expected) - set(compiled)),
        len(cubin),
        round(time.perf_counter() - start, 2),
    )


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, arch) of each image in an nvcc fatbin: kind "ptx" or "elf" (SASS), arch e.g. 80.

    Header layout as written by nvcc's fatbinary: <u32 magic 0xBA55ED50><u16 version><u16 header size>
    <u64 payload size>, then per image <u16 kind><u16><u32 header size><u64 size>...<u32 arch at +28>.
    """
    magic, _version, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a CUDA fatbin")
    entries, off = [], header
    while off < header + size:
        kind, _pad, entry_header, entry_size = struct.unpack_from("<HHIQ", data, off)
        (arch,) = struct.unpack_from("<I", data, off + 28)
        entries.append(({1: "ptx", 2: "elf"}.get(kind, f"kind{kind}"), arch))
        off += entry_header + entry_size
    return entries
