"""Kernel names, parameter order, dtypes and launch extents, read from TVM's lowered TIR (never written by
hand).

`SplitHostDevice` sorts a kernel's parameters (buffers first, then scalars, each by name), so the order in the
generated WGSL / OpenCL / CUDA differs from the PrimFunc's. The host function launches each kernel with
`T.call_ffi_kernel("<name>", <args in kernel order>, <launch extents>, launch_params=[tags])`; that call,
found by walking the host IR, is the single source of truth here. Extents are kept as printed expressions (the
manifest's kernel table records them; `eval_extent` binds the shape variables). CSE is disabled while lowering
so that dynamic-shape kernels take only the shape variables as scalars, not host-computed temporaries
(shared/notes/gpu-apis-on-cpu.md 1). Used by the manifest (compile/artifacts.py) and the kernel verifiers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.target import Target

NO_CSE = {"tirx.disable_cse_tir": True}


@dataclass(frozen=True)
class KernelParam:
    name: str  # kernel parameter name, e.g. "x_ptr" or "n"
    is_buffer: bool
    dtype: str  # element dtype for buffers, value dtype for scalars
    source: str  # the host PrimFunc buffer (for buffers) or the host expression (for scalars)


@dataclass(frozen=True)
class KernelLaunch:
    """One device kernel launch inside a PrimFunc."""

    func: str  # host PrimFunc name
    name: str  # device kernel name
    params: tuple[KernelParam, ...]
    launch: tuple[tuple[str, str], ...]  # (tag, extent expression in the PrimFunc's shape variables)
    dyn_shared_bytes: str | None = None

    def extents(self, shape_values: dict[str, int]) -> dict[str, int]:
        """Launch extents with the shape variables bound, e.g. {'blockIdx.x': 16, 'threadIdx.x': 64}."""
        return {tag: eval_extent(expr, shape_values) for tag, expr in self.launch}

    def grid(self, shape_values: dict[str, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        ext = self.extents(shape_values)
        grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
        block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
        return grid, block  # type: ignore[return-value]


@dataclass(frozen=True)
class FuncParam:
    name: str
    dtype: str
    shape: tuple[str, ...] | None  # dims as expressions (ints or shape variable names); None for a scalar

    def concrete_shape(self, shape_values: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_extent(d, shape_values) for d in self.shape)


@dataclass(frozen=True)
class FuncInfo:
    """A scheduled PrimFunc: its buffer params (PrimFunc order), shape variables and kernel launches in
    order."""

    name: str
    params: tuple[FuncParam, ...]
    shape_vars: tuple[str, ...]
    kernels: tuple[KernelLaunch, ...]
    offset_vars: tuple[str, ...] = ()  # symbolic buffer elem_offsets: 0 for the freshly allocated arrays here


def lower_for_device(mod: tvm.IRModule, target: Target) -> tuple[tvm.IRModule, dict[Target, tvm.IRModule]]:
    """Run the first half of tvm.tirx.build: TIR pipeline, host/device split, device finalisation."""
    from tvm.tirx.build import split_host_device_mods

    host = target.host or Target("llvm")
    with tvm.transform.PassContext(config=NO_CSE):
        mod = tirx.transform.BindTarget(Target(target, host))(mod)
        pipeline, _finalize_host, finalize_device = tirx.get_default_tir_pipeline(target)
        host_mod, device_mods = split_host_device_mods(pipeline(mod))
        device_mods = {t: finalize_device()(m) for t, m in device_mods.items()}
    return host_mod, device_mods


def describe(mod: tvm.IRModule, target: Target) -> dict[str, FuncInfo]:
    """FuncInfo for every PrimFunc of a scheduled TIR module (only PrimFuncs; Relax functions are ignored)."""
    prim = with_global_symbols(mod)
    buffers = {gv.name_hint: _func_params(f) for gv, f in prim.functions_items()}
    host_mod, device_mods = lower_for_device(prim, target)
    kernel_params: dict[str, list[tuple[str, str | None, str]]] = {}
    for dev in device_mods.values():
        for gv, f in dev.functions_items():
            kernel_params[gv.name_hint] = [_param_type(p) for p in f.params]
    infos = {}
    for gv, f in host_mod.functions_items():
        name = gv.name_hint
        if name not in buffers:
            continue  # host helpers created by the split
        params, shape_vars, offset_vars = buffers[name]
        launches = tuple(_launches(name, f, kernel_params))
        infos[name] = FuncInfo(name, params, shape_vars, launches, offset_vars)
    return infos


def with_global_symbols(mod: tvm.IRModule) -> tvm.IRModule:
    """The module's PrimFuncs, each exported under its GlobalVar name.

    Relax-fused PrimFuncs are private until relax.build's AttachGlobalSymbol; without a symbol the TIR
    pipeline
    skips MakePackedAPI for them and later passes reject the function.
    """
    funcs = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            funcs[gv] = (
                f if f.attrs and "global_symbol" in f.attrs else f.with_attr("global_symbol", gv.name_hint)
            )
    return tvm.IRModule(funcs)


def _func_params(f: tirx.PrimFunc) -> tuple[tuple[FuncParam, ...], tuple[str, ...], tuple[str, ...]]:
    params, shape_vars, offset_vars = [], [], []
    for p in f.params:
        if "Buffer" not in type(p.ty).__name__ and "T.Buffer" not in str(p.ty):
            params.append(
                FuncParam(p.name, str(p.ty).removeprefix("T."), None)
            )  # scalar parameter (e.g. a layer id or flag)
            continue
        shape = p.shape
        offset = getattr(p, "elem_offset", None)
        if isinstance(offset, tirx.Var) and offset.name not in offset_vars:
            offset_vars.append(offset.name)
        dims = []
        for d in shape:
            if isinstance(d, tirx.Var):
                if d.name not in shape_vars:
                    shape_vars.append(d.name)
                dims.append(d.name)
            elif isinstance(d, tirx.IntImm):
                dims.append(str(int(d)))
            else:
                dims.append(str(d))
        params.append(FuncParam(p.name, str(p.dtype), tuple(dims)))
    return tuple(params), tuple(shape_vars), tuple(offset_vars)


def _param_type(p) -> tuple[str, str | None, str]:
    """(name, element dtype for buffer params or None, scalar dtype for scalar params)."""
    if isinstance(p.ty, tvm.ir.PointerType):  # device kernels take buffers as typed pointers
        return p.name, str(p.ty.element_type.dtype), ""
    return p.name, None, str(p.ty.dtype)  # a PrimType


def ffi_kernel_calls(func: tirx.PrimFunc) -> list:
    """The `T.call_ffi_kernel` calls of a lowered host function, in program order."""
    calls = []

    def visit(call) -> None:
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "tirx.call_ffi_kernel":
            calls.append(call)

    tvm_ffi.structural_walk(func.body, (tvm.ir.Call, visit), order="pre")
    return calls


def _launches(func: str, host: tirx.PrimFunc, kernel_params: dict[str, list[tuple[str, str | None, str]]]):
    for call in ffi_kernel_calls(host):
        kname = str(call.args[0].value)
        if kname not in kernel_params:
            continue
        args = [str(a) for a in call.args[1:]]
        tags = [str(t) for t in call.attrs.launch_params]
        kparams = kernel_params[kname]
        params = []
        for (pname, elem_dtype, scalar_dtype), arg in zip(kparams, args, strict=False):
            if elem_dtype is not None:
                # host arg "<buffer>.data", kernel param "<buffer>_ptr": the buffer name is the param name
                params.append(KernelParam(pname, True, elem_dtype, pname.removesuffix("_ptr")))
            else:
                params.append(KernelParam(pname, False, scalar_dtype, arg))
        extents = args[len(kparams) :]
        dyn = None
        launch = []
        for tag, expr in zip(tags, extents, strict=True):
            if tag == "tirx.use_dyn_shared_memory":
                dyn = expr
            else:
                launch.append((tag, expr))
        yield KernelLaunch(func, kname, tuple(params), tuple(launch), dyn)


class _TNamespace:
    """Just enough of TVMScript's `T.` to evaluate integer launch extents."""

    int8 = int16 = int32 = int64 = uint32 = uint64 = staticmethod(int)
    min = staticmethod(min)
    max = staticmethod(max)

    @staticmethod
    def Cast(_dtype, v):  # noqa: N802 - TVMScript spelling
        return int(v)

    @staticmethod
    def truncdiv(a, b):
        return int(a / b)

    @staticmethod
    def floordiv(a, b):
        return a // b

    @staticmethod
    def floormod(a, b):
        return a % b

    @staticmethod
    def Select(c, a, b):  # noqa: N802
        return a if c else b

    if_then_else = Select


def eval_extent(expr: str, shape_values: dict[str, int]) -> int:
    """Evaluate an integer TIR expression printed by TVMScript (e.g. '(n + T.int64(31)) // T.int64(32)')."""
    namespace = {"T": _TNamespace, "math": math, **shape_values}
    return int(eval(expr, {"__builtins__": {}}, namespace))  # noqa: S307 - TVM's own printed integer expressions
