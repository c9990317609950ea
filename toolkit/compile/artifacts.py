"""Compiled-model artifacts: export per preset, manifest with checksums and kernel launch table, format
checks.

`export_library` turns a Relax executable into the preset's file: `.tar` of objects (iOS/Android/Web, static
linking), `.so` (CUDA with an nvcc fatbin inside, or the host CPU), `.dylib` (macOS, cross-linked with
ld64.lld).
`check_object_format` reads the ELF / Mach-O / wasm headers of what was written to prove it is object code for
the preset's host triple, not just a file with the right name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..targets import Preset
from .objfile import ObjectHeader, read_header

MANIFEST = "manifest.json"
# host triple prefix -> (object format, CPU name as the header reader reports it)
TRIPLE_FORMATS = {
    "arm64-apple": ("macho", "arm64"),
    "aarch64-apple": ("macho", "arm64"),
    "x86_64-apple": ("macho", "x86_64"),
    "aarch64-": ("elf", "aarch64"),
    "x86_64-": ("elf", "x86_64"),
    "wasm32-": ("wasm", "wasm32"),
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    out_dir: str | Path,
    preset: Preset,
    quantization: str,
    config: Any,
    kernels: list[dict],
    files: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Write `manifest.json`: preset, TVM version, quantization, model config, kernels, sha256 of every file.

    `files` are paths relative to `out_dir` (default: every file in it except the manifest). The manifest is
    written to a temporary name and renamed, so a present manifest always describes complete files.
    """
    import tvm

    out_dir = Path(out_dir)
    if files is None:
        files = sorted(
            str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST
        )
    manifest = dict(extra or {})
    manifest.update(
        {
            "preset": preset.spec,  # `host:CPU` for a pinned CPU: load_preset reads it back
            "target": preset.target_dict,
            "tvm_version": tvm.__version__,
            "quantization": quantization,
            "model_config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
            "kernels": kernels,
            "files": {rel: sha256_file(out_dir / rel) for rel in files},
        }
    )
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def verify_manifest(out_dir: str | Path) -> dict:
    """Check every file listed in the manifest against its sha256; UserError naming the first problems."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise UserError("no manifest.json: not a folder written by `phi3 compile`", out_dir)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt manifest ({e})", path) from None
    problems = []
    for rel, digest in sorted(manifest.get("files", {}).items()):
        f = out_dir / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    if problems:
        raise UserError("artifact check failed: " + "; ".join(problems), out_dir)
    return manifest


def kernel_launch_table(scheduled_mod, target) -> list[dict]:
    """[{func, name, params (kernel order), launch {tag: extent expr}}] for every device kernel of a scheduled
    TIR module (read from the lowered TIR; see compile/kernel_info.py)."""
    from .kernel_info import describe

    table = []
    for func, info in sorted(describe(scheduled_mod, target).items()):
        for k in info.kernels:
            table.append(
                {
                    "func": func,
                    "name": k.name,
                    "params": [p.name for p in k.params],
                    "launch": dict(k.launch),
                }
            )
    return table


def vm_function_table(executable) -> dict[str, int]:
    """{Relax VM function: number of inputs} of an executable, read from its bytecode listing (works for
    any target: the executable needs no loading)."""
    import re

    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r'ib\.function\("([^"]+)", num_inputs=(\d+)\)', executable.as_python())
    }


# -- export -----------------------------------------------------------------------------------------------
def export_library(executable, path: str | Path, preset: Preset) -> dict:
    """Write the preset's library file; returns build notes (e.g. fatbin sizes for CUDA)."""
    import tvm

    path = Path(path)
    if path.suffix != preset.output:
        raise ValueError(f"{path.name}: preset {preset.name} writes {preset.output}")
    if preset.output == ".tar":
        executable.export_library(str(path), fcompile=tvm.support.tar.tar)
        return {}
    if preset.output == ".dylib":
        executable.export_library(str(path), fcompile=_macos_dylib_linker(preset))
        return {}
    if preset.kind == "cuda":
        from .cuda_aot import export_cuda_library

        return export_cuda_library(executable, path, preset)
    if preset.kind == "llvm":
        from .parallel_codegen import export_shared

        export_shared(executable, path)
        return {}
    executable.export_library(str(path))
    return {}


def _macos_dylib_linker(preset: Preset):
    """fcompile for a Mach-O .dylib on Linux: clang + ld64.lld, TVM runtime symbols resolved at load time."""
    clang = shutil.which("clang-15") or shutil.which("clang")
    lld = shutil.which("ld64.lld-15") or shutil.which("ld64.lld")
    if clang is None or lld is None:
        raise UserError(
            "linking a macOS .dylib here needs clang and ld64.lld (Debian: apt-get install clang-15 lld-15)"
        )
    triple = preset.host_triple

    def link(output: str, objects: list[str], **_kwargs) -> None:
        cmd = [
            clang,
            "-target",
            triple,
            "-dynamiclib",
            f"--ld-path={lld}",
            "-nostdlib",
            "-Wl,-undefined,dynamic_lookup",
            "-Wl,-platform_version,macos,11.0,11.0",
            "-o",
            output,
            *objects,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dylib link failed: {' '.join(cmd)}\n{proc.stderr}")

    link.output_format = "dylib"
    return link


# -- format checks ----------------------------------------------------------------------------------------
def expected_format(preset: Preset) -> tuple[str, str]:
    triple = preset.host_triple or ""
    for prefix, fmt in TRIPLE_FORMATS.items():
        if triple.startswith(prefix):
            return fmt
    raise ValueError(f"no known object format for host triple {triple!r}")


def library_objects(path: str | Path) -> list[tuple[str, ObjectHeader]]:
    """(member name, header) of every object in a .tar, or of the single .so / .dylib file."""
    path = Path(path)
    if path.suffix == ".tar":
        out = []
        with tarfile.open(path) as tar:  # TVM's tar is gzip-compressed despite the name; tarfile detects it
            for member in tar.getmembers():
                if member.isfile():
                    out.append((member.name, read_header(tar.extractfile(member).read(64))))
        return out
    with open(path, "rb") as f:
        return [(path.name, read_header(f.read(64)))]


def check_object_format(path: str | Path, preset: Preset) -> list[tuple[str, ObjectHeader]]:
    """Raise UserError unless every object in the library is code for the preset's host triple."""
    fmt, arch = expected_format(preset)
    kind = {".tar": "relocatable", ".so": "shared", ".dylib": "shared"}[Path(path).suffix]
    if fmt == "wasm":
        kind = "module"
    objects = library_objects(path)
    wrong = [
        f"{name}: {h.format}/{h.arch}/{h.kind}"
        for name, h in objects
        if (h.format, h.arch, h.kind) != (fmt, arch, kind)
    ]
    if not objects or wrong:
        raise UserError(
            f"expected {fmt}/{arch}/{kind} objects for {preset.name}, found "
            + (", ".join(wrong) or "no objects"),
            path,
        )
    return objects
