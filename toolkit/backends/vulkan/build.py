"""`target.build.vulkan`: device IRModule -> GLSL -> SPIR-V -> a "vulkan" runtime module.

TVM's build (tvm/tirx/build.py) looks the code generator up as the global function `target.build.<kind>`, so a
Python-registered function is used by `tvm.compile` and `relax.build` exactly like the C++ one that the wheel
lacks. It returns a Module of kind "vulkan" whose bytes are what TVM's Vulkan runtime loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tvm
from tvm import tirx

from . import module_format as mf
from .codegen_glsl import BufferParam, KernelGLSL, UnsupportedConstruct, generate_glsl
from .spirv import compile_glsl


@dataclass
class CompiledKernel:
    glsl: KernelGLSL
    spirv: bytes
    info: mf.FunctionInfo

    @property
    def name(self) -> str:
        return self.glsl.name

    @property
    def flag(self) -> int:
        return self.glsl.shader_flag

    def grid(self, scalars: dict[str, int]) -> tuple[int, int, int]:
        """Workgroup counts (blockIdx.x/y/z extents) for the given scalar arguments, as the host code of the
        compiled library computes them before it calls the kernel."""
        dims = []
        for axis in "xyz":
            ext = self.glsl.grid_extents.get(f"blockIdx.{axis}")
            dims.append(1 if ext is None else int(evaluate_int(ext, scalars)))
        return tuple(dims)


@dataclass
class VulkanBuild:
    kernels: dict[str, CompiledKernel]
    blob: bytes
    compile_seconds: float

    def decoded(self) -> mf.VulkanModuleData:
        return mf.decode_module(self.blob)


def function_info(kernel: KernelGLSL) -> mf.FunctionInfo:
    """What TVM's ExtractFuncInfo (src/target/build_common.h) records for a kernel."""
    arg_types = [
        mf.DLType(3, 64, 1) if isinstance(p, BufferParam) else mf.DLType.parse(p.dtype) for p in kernel.params
    ]
    return mf.FunctionInfo(kernel.name, arg_types, list(kernel.launch_param_tags), [0] * len(arg_types))


def compile_device_module(mod: tvm.IRModule, target: tvm.target.Target) -> VulkanBuild:
    start = time.perf_counter()
    funcs = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            raise UnsupportedConstruct(f"{gv.name_hint}: only PrimFuncs can be compiled for Vulkan")
        funcs.append(func)
    kernels = [generate_glsl(f, target) for f in funcs]
    workers = max(1, min(len(kernels), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # glslang runs as a subprocess per kernel
        spirvs = list(pool.map(lambda k: compile_glsl(k.source, k.name), kernels))
    compiled = {}
    for k, spv in zip(kernels, spirvs, strict=False):
        compiled[k.name] = CompiledKernel(k, spv, function_info(k))
    data = mf.VulkanModuleData(
        mf.FORMAT,
        {name: c.info for name, c in compiled.items()},
        {name: mf.SPIRVShader(c.flag, c.spirv) for name, c in compiled.items()},
    )
    return VulkanBuild(compiled, mf.encode_module(data), time.perf_counter() - start)


_BUILDS: dict[str, VulkanBuild] = {}
_LOCK = threading.Lock()


def _key(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def build_vulkan(mod: tvm.IRModule, target: tvm.target.Target):
    """The registered `target.build.vulkan`."""
    from .runtime_module import make_module

    build = compile_device_module(mod, target)
    with _LOCK:
        _BUILDS[_key(build.blob)] = build
    sources = {
        "glsl": "\n".join(f"// ---- {n}\n{c.glsl.source}" for n, c in build.kernels.items()),
        "func_info": json.dumps(
            {
                n: {
                    "arg_types": [str(t) for t in c.info.arg_types],
                    "launch_param_tags": c.info.launch_param_tags,
                    "workgroup_size": list(c.glsl.workgroup_size),
                    "use_ubo": c.glsl.use_ubo,
                }
                for n, c in build.kernels.items()
            }
        ),
    }
    return make_module(build.blob, sources)


def build_of(module) -> VulkanBuild:
    """The VulkanBuild behind a "vulkan" module produced by build_vulkan in this process."""
    from .runtime_module import save_to_bytes

    blob = save_to_bytes(module)
    with _LOCK:
        found = _BUILDS.get(_key(blob))
    if found is None:
        raise KeyError("this vulkan module was not built in this process")
    return found


def vulkan_imports(runtime_module) -> list:
    """Every imported module of kind "vulkan" below a compiled library (tvm.compile / relax.build result)."""
    out, stack = [], [runtime_module]
    while stack:
        m = stack.pop()
        if m.kind == "vulkan":
            out.append(m)
        stack.extend(m.imports)
    return out


# ---- evaluation of launch extents (integer TIR over the scalar arguments) ----------------------------------


def evaluate_int(e, env: dict[str, int]) -> int:
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        if e.name not in env:
            raise KeyError(f"launch extent needs the value of {e.name}")
        return int(env[e.name])
    k = type(e).__name__
    if k == "Cast":
        return evaluate_int(e.value, env)
    a = evaluate_int(e.a, env) if hasattr(e, "a") else None
    b = evaluate_int(e.b, env) if hasattr(e, "b") else None
    ops = {
        "Add": lambda: a + b,
        "Sub": lambda: a - b,
        "Mul": lambda: a * b,
        "FloorDiv": lambda: a // b,
        "FloorMod": lambda: a % b,
        "Div": lambda: int(a / b),
        "Mod": lambda: a - int(a / b) * b,
        "Min": lambda: min(a, b),
        "Max": lambda: max(a, b),
        "RShift": lambda: a >> b,
        "LShift": lambda: a << b,
    }
    if k in ops:
        return ops[k]()
    if k == "Select":
        return evaluate_int(e.true_value if evaluate_int(e.condition, env) else e.false_value, env)
    for cmp, fn in (
        ("LT", int.__lt__),
        ("LE", int.__le__),
        ("GT", int.__gt__),
        ("GE", int.__ge__),
        ("EQ", int.__eq__),
        ("NE", int.__ne__),
    ):
        if k == cmp:
            return int(fn(a, b))
    raise UnsupportedConstruct(f"launch extent expression {k}")
