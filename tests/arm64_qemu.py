"""Run TVM host kernels built for arm64 on this (x86) machine: the kernel's object file is linked with a
small C harness (`arm64_harness.c`) by the Debian cross compiler and run under qemu-user, which emulates
the CPU named by `cpu` (qemu enforces its features: `sdot` on a CPU without DotProd is SIGILL).

Needs `aarch64-linux-gnu-gcc` (Debian gcc-aarch64-linux-gnu + libc6-dev-arm64-cross) and
`qemu-aarch64-static` or `qemu-aarch64` (qemu-user-static / qemu-user); `missing()` names what is absent."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm_ffi

HARNESS = Path(__file__).with_name("arm64_harness.c")
CC = "aarch64-linux-gnu-gcc"
QEMU = next((q for q in ("qemu-aarch64-static", "qemu-aarch64") if shutil.which(q)), None)
_DTYPES = {  # numpy dtype -> DLPack (code, bits): 0 int, 1 uint, 2 float
    np.dtype(np.int8): (0, 8),
    np.dtype(np.int32): (0, 32),
    np.dtype(np.uint8): (1, 8),
    np.dtype(np.uint32): (1, 32),
    np.dtype(np.float16): (2, 16),
    np.dtype(np.float32): (2, 32),
}


def missing() -> str | None:
    """Why arm64 kernels can't run here (None: they can)."""
    absent = [t for t, ok in ((CC, shutil.which(CC)), ("qemu-aarch64(-static)", QEMU)) if not ok]
    if absent:
        return (
            f"no {' / '.join(absent)} to run arm64 code under qemu-user "
            "(apt-get install qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
        )
    return None


def _includes() -> list[str]:
    root = Path(tvm_ffi.__file__).parent
    return [f"-I{root / 'include'}"]


def link(obj: Path, exe: Path) -> None:
    """Link a kernel object (`__tvm_ffi_main`, aarch64 ELF) with the harness into a static executable."""
    subprocess.run(
        [CC, "-O1", "-static", *_includes(), str(HARNESS), str(obj), "-lm", "-o", str(exe)],
        check=True,
        capture_output=True,
        text=True,
    )


def run(exe: Path, arrays: list[np.ndarray], cpu: str) -> list[np.ndarray]:
    """Call the kernel with `arrays` (inputs and outputs, in parameter order) on qemu's `cpu`; returns
    every array as the kernel left it. A kernel error or a CPU fault raises CalledProcessError."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.bin", Path(d) / "out.bin"
        blob = [b"TVMA", struct.pack("<I", len(arrays))]
        for a in arrays:
            a = np.ascontiguousarray(a)
            code, bits = _DTYPES[a.dtype]
            blob += [struct.pack("<BBHi", code, bits, 1, a.ndim), struct.pack(f"<{a.ndim}q", *a.shape)]
            blob.append(a.tobytes())
        src.write_bytes(b"".join(blob))
        subprocess.run(
            [QEMU, "-cpu", cpu, str(exe), str(src), str(dst)], check=True, capture_output=True, timeout=300
        )
        raw, out, pos = dst.read_bytes(), [], 0
        for a in arrays:
            out.append(np.frombuffer(raw[pos : pos + a.nbytes], a.dtype).reshape(a.shape).copy())
            pos += a.nbytes
        assert pos == len(raw), (pos, len(raw))
        return out
