"""GLSL -> SPIR-V with glslangValidator, then spirv-val on every module (Debian glslang-tools,
spirv-tools)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Vulkan 1.1 is what the presets promise (Android 9+ and every desktop driver of the last years) and what
# lavapipe offers; SPIR-V 1.3 is its native version.
TARGET_ENV = "vulkan1.1"


class SpirvError(RuntimeError):
    """glslangValidator rejected the generated GLSL, or spirv-val rejected the SPIR-V."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SpirvError(f"{name} not found on PATH (install Debian glslang-tools / spirv-tools)")
    return path


def compile_glsl(source: str, entry_point: str, target_env: str = TARGET_ENV) -> bytes:
    """Compile one compute shader; the SPIR-V entry point is renamed from main() to `entry_point`
    because TVM's Vulkan runtime creates the pipeline with pName = kernel name."""
    with tempfile.TemporaryDirectory(prefix="tvm_vk_") as tmp:
        src = Path(tmp) / "kernel.comp"
        out = Path(tmp) / "kernel.spv"
        src.write_text(source)
        cmd = [
            _tool("glslangValidator"),
            "-V",
            "--target-env",
            target_env,
            "-S",
            "comp",
            "-e",
            entry_point,
            "--source-entrypoint",
            "main",
            "-o",
            str(out),
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            log = (proc.stdout + proc.stderr).replace(str(src), "kernel.comp")
            raise SpirvError(
                f"glslangValidator failed for {entry_point}:\n{log}\n--- GLSL ---\n{_numbered(source)}"
            )
        spv = out.read_bytes()
    validate(spv, entry_point, target_env)
    return spv


def validate(spv: bytes, what: str = "module", target_env: str = TARGET_ENV) -> None:
    with tempfile.TemporaryDirectory(prefix="tvm_vk_") as tmp:
        path = Path(tmp) / "kernel.spv"
        path.write_bytes(spv)
        proc = subprocess.run(
            [_tool("spirv-val"), "--target-env", target_env, str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SpirvError(f"spirv-val rejected {what}: {(proc.stdout + proc.stderr).strip()}")


def disassemble(spv: bytes) -> str:
    with tempfile.TemporaryDirectory(prefix="tvm_vk_") as tmp:
        path = Path(tmp) / "kernel.spv"
        path.write_bytes(spv)
        proc = subprocess.run([_tool("spirv-dis"), str(path)], capture_output=True, text=True, check=True)
        return proc.stdout


def _numbered(source: str) -> str:
    return "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(source.splitlines()))
