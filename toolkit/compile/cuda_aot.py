"""Ship compiled CUDA: replace the CUDA source inside a built module with an nvcc fatbin (cubin + PTX).

TVM 0.27's CUDA codegen stores CUDA C source (module fmt "cuda"); its runtime compiles that at load time
through
`tvm_callback_cuda_compile` (NVRTC from the `cuda-bindings` package, or nvcc), so the user's machine would
need a
CUDA compiler. The build-time callback is not called by the codegen in this version, so instead the export
rewrites the serialized module: the library blob's "cuda" entry is (fmt, function-info map, data), and the
runtime
hands any fmt other than "cuda" straight to cuModuleLoadData, which accepts a fatbin. The fatbin holds SASS
for
the preset's arch (runs without JIT) and PTX for the same compute capability (JIT on newer GPUs).

Layout (tvm-ffi src/ffi/extra/library_module.cc, checked against the bytes TVM writes):
  blob  = <u64 nbytes> <u64-vector import-tree indptr> <u64-vector child indices> {<str kind> [<bytes
  payload>]}*
  cuda  = <str fmt> <u64 nfunc> {<str name> <FunctionInfo>}* <bytes data>
  str/bytes = <u64 length> <raw>; the "_lib" kind has no payload.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError
from ..targets import Preset

# The same code-generation flags TVM's nvcc path uses (tvm/support/nvcc.py `_compile_cuda_nvcc`)
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin") or None)


def gencode_flags(preset: Preset) -> list[str]:
    if not preset.cuda_gencode:
        raise UserError(f"preset {preset.name} lists no cuda.gencode entries", preset.path)
    return [flag for code in preset.cuda_gencode for flag in ("-gencode", code)]


def nvcc_compile(
    source: str,
    preset: Preset,
    fmt: str = "fatbin",
    extra: list[str] | None = None,
) -> tuple[bytes, str]:
    """Compile CUDA source with nvcc for the preset's gencode list; returns (binary, nvcc/ptxas output)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise UserError("nvcc not found on PATH: it is needed to compile CUDA kernels ahead of time")
    if fmt == "cubin":  # a cubin holds one SASS arch only: the first gencode's real arch
        arch = re.search(r"code=(sm_\w+)", preset.cuda_gencode[0]).group(1)
        arch_flags = ["-arch", arch]
    else:
        arch_flags = gencode_flags(preset)
    with tempfile.TemporaryDirectory(prefix="phi3-nvcc-") as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, f"kernels.{fmt}")
        src.write_text(source)
        cmd = [nvcc, f"--{fmt}", *arch_flags, *NVCC_FLAGS, *(extra or []), "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd[:4])} ...):\n{proc.stdout}{proc.stderr}")
        return out.read_bytes(), proc.stdout + proc.stderr


# -- serialized module blob ---------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def str(self) -> bytes:
        return self.raw(self.u64())


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _str(b: bytes) -> bytes:
    return _u64(len(b)) + b


def parse_library_bin(blob: bytes) -> tuple[list[int], list[int], list[tuple[bytes, bytes | None]]]:
    """(indptr, child indices, [(kind, payload or None for "_lib")]) of a library blob."""
    r = _Reader(blob, 8)
    indptr = [r.u64() for _ in range(r.u64())]
    children = [r.u64() for _ in range(r.u64())]
    entries = []
    for _ in range(len(indptr) - 1):
        kind = r.str()
        entries.append((kind, None if kind == b"_lib" else r.str()))
    return indptr, children, entries


def pack_library_bin(
    indptr: list[int], children: list[int], entries: list[tuple[bytes, bytes | None]]
) -> bytes:
    body = (
        _u64(len(indptr)) + b"".join(map(_u64, indptr)) + _u64(len(children)) + b"".join(map(_u64, children))
    )
    for kind, payload in entries:
        body += _str(kind) + (b"" if payload is None else _str(payload))
    return _u64(len(body)) + body


def split_cuda_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(fmt, raw function-info section, data) of a serialized CUDA module."""
    r = _Reader(payload)
    fmt = r.str()
    start = r.pos
    for _ in range(r.u64()):
        r.str()  # map key
        r.str()  # FunctionInfo.name
        r.raw(4 * r.u64())  # arg_types: DLDataType (code u8, bits u8, lanes u16)
        for _ in range(r.u64()):  # launch_param_tags
            r.str()
        r.raw(4 * r.u64())  # arg_extra_tags (int32 each)
    fmap = payload[start : r.pos]
    data = r.str()
    if r.pos != len(payload):
        raise ValueError("unexpected CUDA module layout (trailing bytes): TVM serialization changed")
    return fmt, fmap, data


def compile_library_bin(blob: bytes, preset: Preset) -> tuple[bytes, dict]:
    """Rewrite every "cuda" entry of a library blob from source to an nvcc fatbin; returns (blob, info)."""
    indptr, children, entries = parse_library_bin(blob)
    info = {"cuda_modules": 0, "fatbin_bytes": 0, "gencode": list(preset.cuda_gencode)}
    new_entries = []
    for kind, payload in entries:
        if kind == b"cuda":
            fmt, fmap, data = split_cuda_payload(payload)
            if fmt == b"cuda":
                fatbin, _log = nvcc_compile(data.decode(), preset, "fatbin")
                payload = _str(b"fatbin") + fmap + _str(fatbin)
                info["cuda_modules"] += 1
                info["fatbin_bytes"] += len(fatbin)
        new_entries.append((kind, payload))
    return pack_library_bin(indptr, children, new_entries), info


def cuda_module_formats(blob: bytes) -> list[tuple[str, bytes]]:
    """(fmt, data) of every CUDA module in a library blob."""
    out = []
    for kind, payload in parse_library_bin(blob)[2]:
        if kind == b"cuda":
            fmt, _fmap, data = split_cuda_payload(payload)
            out.append((fmt.decode(), data))
    return out


def export_cuda_library(executable, path: str | Path, preset: Preset) -> dict:
    """Export a CUDA build as a .so whose CUDA module holds a fatbin instead of source; returns build info."""
    import tvm
    from tvm.runtime import _ffi_api

    module = executable.mod if hasattr(executable, "mod") else executable
    info: dict = {}

    def pack_imports(mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        new_blob, stats = compile_library_bin(blob, preset)
        info.update(stats)
        c_source = _ffi_api.ModulePackImportsToC(mod, is_system_lib, symbol_prefix)
        out = os.path.join(workspace_dir, f"{symbol_prefix}devc.c")
        with open(out, "w") as f:
            f.write(_replace_c_array(c_source, new_blob))
        return out

    # Executable.export_library does not forward fpack_imports; the runtime module's does
    module.export_library(str(path), fpack_imports=pack_imports)
    return info


def _replace_c_array(c_source: str, blob: bytes) -> str:
    """Swap the byte array TVM's ModulePackImportsToC wrote for `blob`, keeping its
    declarations/registration."""
    m = re.search(r"(__tvm_ffi__library_bin\[)(\d+)(\] = \{)(.*?)(\n\};)", c_source, re.S)
    if m is None:
        raise ValueError("unexpected ModulePackImportsToC output: no library_bin array")
    rows = ",\n".join(
        "  " + ",".join(f"0x{b:02x}" for b in blob[i : i + 20]) for i in range(0, len(blob), 20)
    )
    return (
        c_source[: m.start()]
        + f"{m.group(1)}{len(blob)}{m.group(3)}\n{rows},{m.group(5)}"
        + c_source[m.end() :]
    )
