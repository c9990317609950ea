"""Vulkan backend for the apache-tvm wheel, which ships no SPIR-V code generator.

Importing this package registers `target.build.vulkan` (unless a TVM build with its own Vulkan codegen is
loaded), after which `tvm.compile(..., target={"kind": "vulkan", ...})` and `relax.build` produce a
host library
that imports a module of kind "vulkan" in the exact byte format of TVM's Vulkan runtime.
"""

from __future__ import annotations

import tvm

from .build import VulkanBuild, build_of, build_vulkan, compile_device_module, vulkan_imports
from .codegen_glsl import UnsupportedConstruct, generate_glsl
from .module_format import decode_module, encode_module
from .spirv import SpirvError

_OURS = False


def register(force: bool = False) -> bool:
    """Register our `target.build.vulkan`. Returns True when ours is the active one."""
    global _OURS
    existing = tvm.get_global_func("target.build.vulkan", allow_missing=True)
    if existing is not None and not _OURS and not force:
        return False
    tvm.register_global_func("target.build.vulkan", build_vulkan, override=True)
    _OURS = True
    return True


register()

__all__ = [
    "SpirvError",
    "UnsupportedConstruct",
    "VulkanBuild",
    "build_of",
    "build_vulkan",
    "compile_device_module",
    "decode_module",
    "encode_module",
    "generate_glsl",
    "register",
    "vulkan_imports",
]
