"""GLSL 450 compute-shader generator for lowered device TIR (tvm.tirx), following TVM's Vulkan ABI.

The apache-tvm wheel has no SPIR-V code generator, so this module emits GLSL that glslangValidator turns into
SPIR-V. The shader interface copies what TVM's own SPIR-V codegen
(src/backend/vulkan/codegen/codegen_spirv.cc)
produces, so TVM's Vulkan runtime can launch it:
  * one storage buffer per pointer parameter, descriptor set 0, binding i in parameter order;
  * scalar parameters in a push-constant block, one 8-byte slot each (ArgUnion64), or in a uniform buffer
  at the
    binding after the last storage buffer when #scalars * 8 > 128 bytes (kMaxPushConstantsBytes);
  * the entry point is named after the kernel's global_symbol; the workgroup size is fixed in the shader.

Every value is emitted lane by lane: a TIR vector of N lanes becomes N scalar GLSL expressions. That
handles any
lane count (float16x8, vector-typed local/shared buffers, Ramp/Broadcast/Shuffle) uniformly; the driver's
compiler re-vectorises. Anything outside the supported subset raises UnsupportedConstruct naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

# TVM runtime constants (src/backend/vulkan/runtime/vulkan_common.h).
MAX_PUSH_CONSTANT_BYTES = 128
ARG_SLOT_BYTES = 8  # sizeof(ArgUnion64): every scalar argument occupies one 64-bit slot
FLAG_USE_UBO = 1 << 0  # ShaderMetaDataFlagMask::kUseUBO


class UnsupportedConstruct(Exception):
    """The device TIR uses something this generator cannot express (raised at compile time)."""


@dataclass
class ScalarParam:
    name: str
    dtype: str


@dataclass
class BufferParam:
    name: str
    dtype: str
    written: bool


@dataclass
class KernelGLSL:
    """One generated kernel and the facts the runtime / launcher need about it."""

    name: str
    source: str
    params: list  # BufferParam | ScalarParam in TIR parameter order
    launch_param_tags: list[str]
    workgroup_size: tuple[int, int, int]
    grid_extents: dict  # "blockIdx.x" -> tirx expression over the scalar params
    use_ubo: bool
    shared_bytes: int

    @property
    def shader_flag(self) -> int:
        return FLAG_USE_UBO if self.use_ubo else 0


#
# ----------------------------------------------------------------------------------------------------
# types

_SCALAR_GLSL = {
    "float32": "float",
    "float16": "float16_t",
    "float64": "double",
    "int32": "int",
    "uint32": "uint",
    "int64": "int64_t",
    "uint64": "uint64_t",
    "int16": "int16_t",
    "uint16": "uint16_t",
    "int8": "int8_t",
    "uint8": "uint8_t",
    "bool": "bool",
}

_GLSL_RESERVED = set(
    """
attribute const uniform varying buffer shared coherent volatile restrict readonly writeonly atomic_uint layout
centroid flat smooth noperspective patch sample break continue do for while switch case default if else
subroutine
in out inout float double int void bool true false invariant precise discard return mat2 mat3 mat4 dmat2 dmat3
dmat4 vec2 vec3 vec4 ivec2 ivec3 ivec4 bvec2 bvec3 bvec4 dvec2 dvec3 dvec4 uint uvec2 uvec3 uvec4 lowp mediump
highp precision sampler1D sampler2D sampler3D image1D image2D struct common partition active asm class
union enum
typedef template this resource goto inline noinline public static extern external interface long short
half fixed
unsigned superp input output filter sizeof cast namespace using main demote
""".split()
)


def _dtype_of(expr) -> str:
    ty = expr.ty
    if isinstance(ty, tvm.ir.PrimType):
        return str(ty.dtype)
    raise UnsupportedConstruct(f"expression without a primitive type: {type(expr).__name__} {ty}")


def _split_dtype(dtype: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z]+[0-9]*)(?:x([0-9]+))?", dtype)
    if not m:
        raise UnsupportedConstruct(f"data type {dtype!r}")
    return m.group(1), int(m.group(2) or 1)


def _glsl_scalar(base: str) -> str:
    if base not in _SCALAR_GLSL:
        raise UnsupportedConstruct(f"data type {base!r} (no GLSL/SPIR-V equivalent in this backend)")
    return _SCALAR_GLSL[base]


def _is_float(base: str) -> bool:
    return base.startswith("float")


def _is_signed_int(base: str) -> bool:
    return base.startswith("int")


def _is_uint(base: str) -> bool:
    return base.startswith("uint")


#
# ----------------------------------------------------------------------------------------------------
# literals


def _float_literal(value: float, base: str) -> str:
    if math.isnan(value) or math.isinf(value):
        bits = {"nan": 0x7FC00000, "inf": 0x7F800000, "-inf": 0xFF800000}[
            "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        ]
        f32 = f"uintBitsToFloat({bits:#x}u)"
        return {"float32": f32, "float16": f"float16_t({f32})", "float64": f"double({f32})"}[base]
    if base == "float64":
        return f"{value!r}lf" if ("e" in repr(value) or "." in repr(value)) else f"{value!r}.0lf"
    # float32 literal: the shortest repr of the float32-rounded value, exact after parsing
    f32 = float(np.float32(value))
    text = repr(f32)
    if "e" not in text and "." not in text:
        text += ".0"
    if base == "float16":
        return f"float16_t({text})"
    return text


def _int_literal(value: int, base: str) -> str:
    if base == "int32":
        return str(value) if value >= 0 else (f"({value})" if value > -(2**31) else "(-2147483647 - 1)")
    if base == "uint32":
        return f"{value % (1 << 32)}u"
    if base == "int64":
        return f"{value}l" if value >= 0 else f"({value}l)"
    if base == "uint64":
        return f"{value % (1 << 64)}ul"
    if base == "bool":
        return "true" if value else "false"
    return f"{_glsl_scalar(base)}({value})"


#
# ----------------------------------------------------------------------------------------------------
# storage model


@dataclass
class _Storage:
    """A flat array of scalars in GLSL: a storage-buffer param, a shared array or a local array."""

    glsl_name: str
    base: str  # scalar element dtype of the array
    scope: str  # "global" | "shared" | "local"


@dataclass
class _View:
    """A TIR buffer: a typed window onto a storage (element = `lanes` consecutive scalars)."""

    storage: _Storage
    lanes: int
    elem_offset: object  # tirx expression or None


_MATH_UNARY = {
    "exp": "exp",
    "exp2": "exp2",
    "log": "log",
    "log2": "log2",
    "sqrt": "sqrt",
    "rsqrt": "inversesqrt",
    "tanh": "tanh",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "fabs": "abs",
    "floor": "floor",
    "ceil": "ceil",
    "trunc": "trunc",
    "round": "roundEven",
    "nearbyint": "roundEven",
    "asin": "asin",
    "acos": "acos",
    "atan": "atan",
    "sinh": "sinh",
    "cosh": "cosh",
    "asinh": "asinh",
    "acosh": "acosh",
    "atanh": "atanh",
}
# C names that TVM's default intrinsic lowering emits through call_pure_extern
_EXTERN_ALIASES = {
    "expf": "exp",
    "__expf": "exp",
    "exp2f": "exp2",
    "logf": "log",
    "__logf": "log",
    "log2f": "log2",
    "sqrtf": "sqrt",
    "rsqrtf": "rsqrt",
    "tanhf": "tanh",
    "sinf": "sin",
    "cosf": "cos",
    "tanf": "tan",
    "fabsf": "fabs",
    "floorf": "floor",
    "ceilf": "ceil",
    "truncf": "trunc",
    "roundf": "round",
    "powf": "pow",
    "__powf": "pow",
    "fmaxf": "max",
    "fminf": "min",
    "fmodf": "fmod",
    "exp10f": "exp10",
    "log10f": "log10",
    "erff": "erf",
    "asinf": "asin",
    "acosf": "acos",
    "atanf": "atan",
    "sinhf": "sinh",
    "coshf": "cosh",
    "atan2f": "atan2",
    "hexp": "exp",
    "hexp2": "exp2",
    "hlog": "log",
    "hlog2": "log2",
    "hsqrt": "sqrt",
    "hrsqrt": "rsqrt",
    "htanh": "tanh",
    "hsin": "sin",
    "hcos": "cos",
}
_IGNORED_ATTRS = {
    "pragma_vectorize",
    "pragma_unroll",
    "pragma_auto_unroll_max_step",
    "pragma_unroll_explicit",
    "reduce_scope",
    "storage_alignment",
    "volatile_scope",
    "pragma_import_c",
    "compute_scope",
    "pragma_loop_partition_hint",
    "thread_extent_hint",
    "device_scope",
}


class _Emitter:
    def __init__(self, func: tirx.PrimFunc, name: str, target: tvm.target.Target):
        self.func = func
        self.name = name
        self.target = target
        self.lines: list[str] = []
        self.indent = 1
        self.names: dict = {}  # tirx Var (by handle) -> list of lane strings (scalars: 1 lane)
        self.used_names: set[str] = set()
        self.views: dict = {}  # buffer var or data var -> _View / _Storage
        self.storages: dict = {}  # data var -> _Storage
        self.shared_decls: list[str] = []
        self.shared_bytes = 0
        self.workgroup = {"x": None, "y": None, "z": None}
        self.grid: dict = {}
        self.helpers: set[str] = set()
        self.features: set[str] = set()
        self.prelude: list[str] | None = None
        self.cond_depth = 0
        self.tmp_counter = 0
        self.written: set = set()
        self.max_shared = int(target.attrs.get("max_shared_memory_per_block", 32768))

    # -- names ----------------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", hint) or "v"
        base = re.sub(r"_+", "_", base)
        if base[0].isdigit() or base in _GLSL_RESERVED or base.startswith("gl_"):
            base = "t_" + base
        name, i = base, 0
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def line(self, text: str) -> None:
        self.lines.append("  " * self.indent + text)

    def note_type(self, base: str) -> None:
        if base in ("float16", "int8", "uint8", "int16", "uint16", "int64", "uint64"):
            self.features.add(base)
        if base == "float64":
            raise UnsupportedConstruct("float64 arithmetic (Vulkan presets here do not enable shaderFloat64)")

    def glsl_type(self, base: str) -> str:
        self.note_type(base)
        return _glsl_scalar(base)

    # -- entry --------------------------------------------------------------------------------------------
    def run(self) -> KernelGLSL:
        f = self.func
        if not f.attrs.get("tirx.noalias", False):
            raise UnsupportedConstruct(
                "kernel without tirx.noalias (the Vulkan ABI assumes restricted pointers)"
            )
        params: list = []
        buffer_decls: list[str] = []
        binding = 0
        scalars: list[tuple[str, str, object]] = []
        self.used_names.update(["main", "tvm_pc", "tvm_ubo"])
        # find stores first so read-only buffers can be declared readonly
        self._collect_written(f.body)
        for p in f.params:
            ty = p.ty
            if isinstance(ty, tvm.ir.PointerType):
                elem = ty.element_type
                if not isinstance(elem, tvm.ir.PrimType):
                    raise UnsupportedConstruct(f"pointer parameter {p.name} to non-primitive type {elem}")
                base, lanes = _split_dtype(str(elem.dtype))
                if base == "bool":
                    raise UnsupportedConstruct(f"bool buffer parameter {p.name}")
                gname = self.fresh(p.name)
                storage = _Storage(gname, base, "global")
                self._bind_storage(p, storage, lanes)
                written = p in self.written
                access = "restrict" if written else "restrict readonly"
                buffer_decls.append(
                    f"layout(std430, set = 0, binding = {binding}) {access} buffer {gname}_block "
                    f"{{ {self.glsl_type(base)} {gname}[]; }};"
                )
                if base in ("float16", "int16", "uint16"):
                    self.features.add("storage16")
                if base in ("int8", "uint8"):
                    self.features.add("storage8")
                binding += 1
                params.append(BufferParam(p.name, str(elem.dtype), written))
            elif isinstance(ty, tvm.ir.PrimType):
                dtype = str(ty.dtype)
                base, lanes = _split_dtype(dtype)
                if lanes != 1 or base not in ("int32", "uint32", "int64", "uint64", "float32"):
                    raise UnsupportedConstruct(
                        f"scalar parameter {p.name} of type {dtype} (TVM packs scalars as 32/64-bit slots)"
                    )
                scalars.append((p.name, dtype, p))
                params.append(ScalarParam(p.name, dtype))
            else:
                raise UnsupportedConstruct(f"parameter {p.name} of type {ty}")

        use_ubo = len(scalars) * ARG_SLOT_BYTES > MAX_PUSH_CONSTANT_BYTES
        scalar_block: list[str] = []
        if scalars:
            members = []
            for i, (pname, dtype, var) in enumerate(scalars):
                gname = self.fresh(pname)
                members.append(f"layout(offset = {i * ARG_SLOT_BYTES}) {self.glsl_type(dtype)} {gname};")
                self.names[var] = [f"{'tvm_ubo' if use_ubo else 'tvm_pc'}.{gname}"]
            if use_ubo:
                scalar_block.append(
                    f"layout(std140, set = 0, binding = {binding}) uniform TVMScalarArgs "
                    f"{{ {' '.join(members)} }} tvm_ubo;"
                )
            else:
                scalar_block.append(
                    f"layout(push_constant) uniform TVMPushConstants {{ {' '.join(members)} }} tvm_pc;"
                )

        self.visit_stmt(f.body)

        wg = tuple(self.workgroup[a] or 1 for a in "xyz")
        if wg[0] * wg[1] * wg[2] > int(self.target.attrs.get("max_num_threads", 256)):
            raise UnsupportedConstruct(f"workgroup of {wg} threads exceeds max_num_threads of the target")
        if self.shared_bytes > self.max_shared:
            raise UnsupportedConstruct(
                f"{self.shared_bytes} bytes of shared memory (target allows {self.max_shared})"
            )
        head = ["#version 450"]
        if self.features & {"float16", "int8", "uint8", "int16", "uint16", "int64", "uint64"}:
            head.append("#extension GL_EXT_shader_explicit_arithmetic_types : require")
        if "storage16" in self.features:
            head.append("#extension GL_EXT_shader_16bit_storage : require")
        if "storage8" in self.features:
            head.append("#extension GL_EXT_shader_8bit_storage : require")
        head.append(f"layout(local_size_x = {wg[0]}, local_size_y = {wg[1]}, local_size_z = {wg[2]}) in;")
        head += buffer_decls + scalar_block + self.shared_decls
        head += [_HELPERS[h] for h in sorted(self.helpers)]
        src = "\n".join(head + ["void main() {"] + self.lines + ["}", ""])
        tags = [str(t) for t in f.attrs.get("tirx.kernel_launch_params", [])]
        for t in tags:
            if not (t.startswith("blockIdx.") or t.startswith("threadIdx.")):
                raise UnsupportedConstruct(f"launch parameter {t!r} (e.g. dynamic shared memory) on Vulkan")
        return KernelGLSL(self.name, src, params, tags, wg, dict(self.grid), use_ubo, self.shared_bytes)

    def _bind_storage(self, var, storage: _Storage, lanes: int) -> None:
        self.storages[var] = storage
        self.views[var] = _View(storage, lanes, None)

    def _collect_written(self, stmt) -> None:
        # Stores name the buffer; map them back to the data var after DeclBuffer is seen.
        stack = [stmt]
        decl_data = {}
        stores = []
        while stack:
            s = stack.pop()
            if s is None:
                continue
            if isinstance(s, tirx.SeqStmt):
                stack.extend(list(s.seq))
            elif isinstance(s, tirx.DeclBuffer):
                decl_data[s.buffer] = s.data
            elif isinstance(s, tirx.BufferStore):
                stores.append(s.buffer)
            elif isinstance(s, tirx.IfThenElse):
                stack += [s.then_case, s.else_case]
            elif isinstance(s, (tirx.AttrStmt, tirx.For, tirx.While)):
                stack.append(s.body)
            elif getattr(s, "body", None) is not None:
                stack.append(s.body)
        for b in stores:
            d = decl_data.get(b)
            while d is not None:
                if isinstance(d, tvm.ir.expr.Call) and d.op.name == "tirx.buffer_data":
                    d = d.args[0]
                self.written.add(d)
                d = decl_data.get(d)
            self.written.add(b)

    # -- statements ---------------------------------------------------------------------------------------
    def visit_stmt(self, s) -> None:
        if s is None:
            return
        k = type(s).__name__
        handler = getattr(self, "stmt_" + k, None)
        if handler is None:
            raise UnsupportedConstruct(f"statement {k}")
        handler(s)

    def with_prelude(self, fn):
        saved = self.prelude
        self.prelude = []
        out = fn()
        pre = self.prelude
        self.prelude = saved
        for p in pre:
            self.line(p)
        return out

    def stmt_SeqStmt(self, s) -> None:
        for x in s.seq:
            self.visit_stmt(x)

    def stmt_DeclBuffer(self, s) -> None:
        buf, data = s.buffer, s.data
        if isinstance(data, tvm.ir.expr.Call) and data.op.name == "tirx.buffer_data":
            data = data.args[0]
        src = self.views.get(data)
        if src is None:
            raise UnsupportedConstruct(f"buffer {buf.name} declared over unknown data {data}")
        base, lanes = _split_dtype(str(buf.dtype))
        if base != src.storage.base:
            raise UnsupportedConstruct(
                f"buffer {buf.name} reinterprets {src.storage.base} storage as {base} (bit-cast views)"
            )
        offset = None
        eo = buf.elem_offset
        if eo is not None and not (isinstance(eo, tirx.IntImm) and eo.value == 0):
            offset = eo
        if src.elem_offset is not None or src.lanes != 1 and offset is not None:
            raise UnsupportedConstruct(f"nested offset view {buf.name}")
        if src.lanes != 1 and src.lanes != lanes:
            raise UnsupportedConstruct(f"buffer {buf.name} changes vector width of its storage")
        self.views[buf] = _View(src.storage, lanes, offset)

    def stmt_AllocBuffer(self, s) -> None:
        buf = s.buffer
        scope = buf.scope()
        base, lanes = _split_dtype(str(buf.dtype))
        n = 1
        for d in buf.shape:
            if not isinstance(d, tirx.IntImm):
                raise UnsupportedConstruct(f"allocation {buf.name} with symbolic size {list(buf.shape)}")
            n *= int(d.value)
        count = n * lanes
        gtype = self.glsl_type(base) if base != "bool" else "bool"
        if scope in ("shared", "shared.dyn"):
            gname = self.fresh(buf.name)
            self.shared_decls.append(f"shared {gtype} {gname}[{count}];")
            self.shared_bytes += count * max(1, _bits(base) // 8)
            storage = _Storage(gname, base, "shared")
        elif scope == "local":
            gname = self.fresh(buf.name)
            self.line(f"{gtype} {gname}[{count}];")
            storage = _Storage(gname, base, "local")
        else:
            raise UnsupportedConstruct(f"allocation {buf.name} in storage scope {scope!r}")
        self.storages[buf.data] = storage
        self.views[buf.data] = _View(storage, lanes, None)
        self.views[buf] = _View(storage, lanes, None)

    def stmt_AttrStmt(self, s) -> None:
        key = s.attr_key
        if key == "thread_extent":
            iv = s.node
            tag = iv.thread_tag
            ext = s.value
            m = re.fullmatch(r"(threadIdx|blockIdx)\.([xyz])", tag)
            if not m:
                raise UnsupportedConstruct(f"thread binding {tag!r}")
            var = iv.var
            gname = self.fresh(var.name)
            dt = _dtype_of(var)
            if m.group(1) == "threadIdx":
                if not isinstance(ext, tirx.IntImm):
                    raise UnsupportedConstruct(f"symbolic thread extent {tag} = {ext}")
                prev = self.workgroup[m.group(2)]
                if prev is not None and prev != int(ext.value):
                    raise UnsupportedConstruct(f"{tag} launched with two different extents")
                self.workgroup[m.group(2)] = int(ext.value)
                src = f"gl_LocalInvocationID.{m.group(2)}"
            else:
                prev = self.grid.get(tag)
                if prev is not None and not tvm.ir.structural_equal(prev, ext):
                    raise UnsupportedConstruct(f"{tag} launched with two different extents")
                self.grid[tag] = ext
                src = f"gl_WorkGroupID.{m.group(2)}"
            self.line(f"const {self.glsl_type(dt)} {gname} = {self.glsl_type(dt)}({src});")
            self.names[var] = [gname]
            self.visit_stmt(s.body)
            return
        if key in _IGNORED_ATTRS or key.startswith("pragma_"):
            self.visit_stmt(s.body)
            return
        raise UnsupportedConstruct(f"attribute statement {key!r}")

    def stmt_Bind(self, s) -> None:
        var, value = s.var, s.value
        dt = _dtype_of(var)
        base, lanes = _split_dtype(dt)
        vals = self.with_prelude(lambda: self.expr(value))
        names = []
        for i, v in enumerate(vals):
            gname = self.fresh(var.name if lanes == 1 else f"{var.name}_l{i}")
            self.line(f"{self.glsl_type(base)} {gname} = {v};")
            names.append(gname)
        self.names[var] = names

    def stmt_LetStmt(self, s) -> None:
        self.line("{")
        self.indent += 1
        self.stmt_Bind(s)
        self.visit_stmt(s.body)
        self.indent -= 1
        self.line("}")

    def stmt_For(self, s) -> None:
        kind = int(s.kind)
        # ForKind: 0 serial, 1 parallel, 2 vectorized, 3 unrolled, 4 thread_binding
        if kind in (1, 4):
            raise UnsupportedConstruct(
                f"{['serial', 'parallel', 'vectorized', 'unrolled', 'thread_binding'][kind]}"
                f" loop over {s.loop_var.name} in device code"
            )
        var = s.loop_var
        dt = _dtype_of(var)
        base, _ = _split_dtype(dt)
        gt = self.glsl_type(base)
        lo, ext = self.with_prelude(lambda: (self.expr(s.min)[0], self.expr(s.extent)[0]))
        step = "1"
        if s.step is not None:
            step = self.with_prelude(lambda: self.expr(s.step)[0])
        gname = self.fresh(var.name)
        end = self.fresh(var.name + "_end")
        self.line(f"const {gt} {end} = {lo} + {ext};")
        self.line(f"for ({gt} {gname} = {lo}; {gname} < {end}; {gname} += {gt}({step})) {{")
        self.names[var] = [gname]
        self.indent += 1
        self.visit_stmt(s.body)
        self.indent -= 1
        self.line("}")

    def stmt_While(self, s) -> None:
        # the condition is re-evaluated every iteration: no hoisting into a prelude
        self.cond_depth += 1
        cond = self.with_prelude(lambda: self.expr(s.condition))
        self.cond_depth -= 1
        self.line(f"while ({cond[0]}) {{")
        self.indent += 1
        self.visit_stmt(s.body)
        self.indent -= 1
        self.line("}")

    def stmt_IfThenElse(self, s) -> None:
        cond = self.with_prelude(lambda: self.expr(s.condition))
        if len(cond) != 1:
            raise UnsupportedConstruct("vector condition in if statement")
        self.line(f"if ({cond[0]}) {{")
        self.indent += 1
        self.visit_stmt(s.then_case)
        self.indent -= 1
        if s.else_case is not None:
            self.line("} else {")
            self.indent += 1
            self.visit_stmt(s.else_case)
            self.indent -= 1
        self.line("}")

    def stmt_Break(self, s) -> None:
        self.line("break;")

    def stmt_Continue(self, s) -> None:
        self.line("continue;")

    def stmt_BufferStore(self, s) -> None:
        view = self.views.get(s.buffer)
        if view is None:
            raise UnsupportedConstruct(f"store to unknown buffer {s.buffer.name}")
        if len(s.indices) != 1:
            raise UnsupportedConstruct(f"multi-dimensional store to {s.buffer.name} (expected flattened TIR)")

        def compute():
            return self.element_refs(view, s.indices[0], s.buffer.name), self.expr(s.value)

        refs, vals = self.with_prelude(compute)
        if len(refs) != len(vals):
            if len(vals) == 1:
                vals = vals * len(refs)
            else:
                raise UnsupportedConstruct(f"store of {len(vals)} lanes into {len(refs)} elements")
        for r, v in zip(refs, vals, strict=False):
            self.line(f"{r} = {v};")

    def stmt_Evaluate(self, s) -> None:
        v = s.value
        if isinstance(v, (tirx.IntImm,)):
            return
        if isinstance(v, tvm.ir.expr.Call):
            name = v.op.name if isinstance(v.op, tvm.ir.Op) else str(v.op)
            if name == "tirx.tvm_storage_sync":
                scope = v.args[0].value
                if scope in ("shared", "shared.dyn"):
                    self.line("memoryBarrierShared(); barrier();")
                elif scope == "global":
                    self.line("memoryBarrierBuffer(); memoryBarrierShared(); barrier();")
                elif scope == "warp":
                    if int(self.target.attrs.get("thread_warp_size", 1)) != 1:
                        raise UnsupportedConstruct("warp-level sync with thread_warp_size > 1")
                else:
                    raise UnsupportedConstruct(f"tvm_storage_sync({scope!r})")
                return
            raise UnsupportedConstruct(f"call statement {name}")
        raise UnsupportedConstruct(f"evaluate of {type(v).__name__}")

    def stmt_AssertStmt(self, s) -> None:
        raise UnsupportedConstruct("assert inside a device kernel")

    # -- memory -------------------------------------------------------------------------------------------
    def element_refs(self, view: _View, index, name: str) -> list[str]:
        idx = self.expr(index)
        ibase, _ = _split_dtype(_dtype_of(index))
        off = self.expr(view.elem_offset)[0] if view.elem_offset is not None else None
        refs = []
        for i in idx:
            if off is not None:
                i = f"({i} + {off})"
            if ibase != "int32":
                i = f"int({i})"
            if view.lanes == 1:
                refs.append(f"{view.storage.glsl_name}[{i}]")
            else:
                for lane in range(view.lanes):
                    refs.append(f"{view.storage.glsl_name}[({i}) * {view.lanes} + {lane}]")
        return refs

    # -- expressions --------------------------------------------------------------------------------------
    def expr(self, e) -> list[str]:
        k = type(e).__name__
        handler = getattr(self, "expr_" + k, None)
        if handler is None:
            raise UnsupportedConstruct(f"expression {k}")
        out = handler(e)
        return out

    def expr_IntImm(self, e):
        base, _ = _split_dtype(_dtype_of(e))
        self.note_type(base)
        return [_int_literal(int(e.value), base)]

    def expr_FloatImm(self, e):
        base, _ = _split_dtype(_dtype_of(e))
        self.note_type(base)
        return [_float_literal(float(e.value), base)]

    def expr_StringImm(self, e):
        raise UnsupportedConstruct(f"string literal {e.value!r} in a device expression")

    def expr_Var(self, e):
        if e in self.names:
            return list(self.names[e])
        raise UnsupportedConstruct(f"variable {e.name} used before definition (or a handle used as a value)")

    def _lanes(self, e) -> int:
        return _split_dtype(_dtype_of(e))[1]

    def _bin(self, e, op: str):
        a, b = self.expr(e.a), self.expr(e.b)
        n = max(len(a), len(b))
        a = a * n if len(a) == 1 else a
        b = b * n if len(b) == 1 else b
        return [f"({x} {op} {y})" for x, y in zip(a, b, strict=False)]

    def expr_Add(self, e):
        return self._bin(e, "+")

    def expr_Sub(self, e):
        return self._bin(e, "-")

    def expr_Mul(self, e):
        return self._bin(e, "*")

    def expr_Div(self, e):
        return self._bin(e, "/")

    def expr_Mod(self, e):
        base, _ = _split_dtype(_dtype_of(e))
        if _is_float(base):
            return self._call2(e.a, e.b, "tvm_fmod", base)
        if _is_signed_int(base):  # truncated remainder (OpSRem); GLSL '%' is undefined for negative operands
            return self._call2(e.a, e.b, "tvm_truncmod", base)
        return self._bin(e, "%")

    def expr_FloorDiv(self, e):
        base, _ = _split_dtype(_dtype_of(e))
        if _is_float(base):
            return [f"floor({x})" for x in self._bin(e, "/")]
        if _is_signed_int(base):
            return self._call2(e.a, e.b, "tvm_floordiv", base)
        return self._bin(e, "/")

    def expr_FloorMod(self, e):
        base, _ = _split_dtype(_dtype_of(e))
        if _is_float(base):
            return self._call2(e.a, e.b, "tvm_floormod", base)
        if _is_signed_int(base):
            return self._call2(e.a, e.b, "tvm_floormod", base)
        return self._bin(e, "%")

    def _call2(self, a, b, fn: str, base: str):
        key = f"{fn}:{base}"
        if key not in _HELPERS:
            raise UnsupportedConstruct(f"{fn} on {base}")
        self.helpers.add(key)
        x, y = self.expr(a), self.expr(b)
        n = max(len(x), len(y))
        x = x * n if len(x) == 1 else x
        y = y * n if len(y) == 1 else y
        return [f"{fn}({p}, {q})" for p, q in zip(x, y, strict=False)]

    def expr_Min(self, e):
        return self._minmax(e, "min", "<")

    def expr_Max(self, e):
        return self._minmax(e, "max", ">")

    def _minmax(self, e, fn, op):
        base, _ = _split_dtype(_dtype_of(e))
        if base in ("float32", "float16", "int32", "uint32"):
            a, b = self.expr(e.a), self.expr(e.b)
            n = max(len(a), len(b))
            a = a * n if len(a) == 1 else a
            b = b * n if len(b) == 1 else b
            return [f"{fn}({x}, {y})" for x, y in zip(a, b, strict=False)]
        # 8/16/64-bit integers: a select keeps to core operations
        a, b = self.expr(e.a), self.expr(e.b)
        n = max(len(a), len(b))
        a = a * n if len(a) == 1 else a
        b = b * n if len(b) == 1 else b
        return [f"(({x}) {op} ({y}) ? ({x}) : ({y}))" for x, y in zip(a, b, strict=False)]

    def expr_EQ(self, e):
        return self._bin(e, "==")

    def expr_NE(self, e):
        return self._bin(e, "!=")

    def expr_LT(self, e):
        return self._bin(e, "<")

    def expr_LE(self, e):
        return self._bin(e, "<=")

    def expr_GT(self, e):
        return self._bin(e, ">")

    def expr_GE(self, e):
        return self._bin(e, ">=")

    def expr_And(self, e):
        a = self.expr(e.a)
        self.cond_depth += 1  # right operand is evaluated lazily
        b = self.expr(e.b)
        self.cond_depth -= 1
        n = max(len(a), len(b))
        a = a * n if len(a) == 1 else a
        b = b * n if len(b) == 1 else b
        return [f"({x} && {y})" for x, y in zip(a, b, strict=False)]

    def expr_Or(self, e):
        a = self.expr(e.a)
        self.cond_depth += 1
        b = self.expr(e.b)
        self.cond_depth -= 1
        n = max(len(a), len(b))
        a = a * n if len(a) == 1 else a
        b = b * n if len(b) == 1 else b
        return [f"({x} || {y})" for x, y in zip(a, b, strict=False)]

    def expr_Not(self, e):
        return [f"(!{x})" for x in self.expr(e.a)]

    def _bitwise(self, e, op: str):
        return self._bin(e, _bitwise_op(op, _split_dtype(_dtype_of(e))[0]))

    def expr_BitwiseAnd(self, e):
        return self._bitwise(e, "&")

    def expr_BitwiseOr(self, e):
        return self._bitwise(e, "|")

    def expr_BitwiseXor(self, e):
        return self._bitwise(e, "^")

    def expr_BitwiseNot(self, e):
        op = _bitwise_op("~", _split_dtype(_dtype_of(e))[0])
        return [f"({op}{x})" for x in self.expr(e.a)]

    def expr_LShift(self, e):
        return self._bin(e, "<<")

    def expr_RShift(self, e):
        return self._bin(e, ">>")

    def expr_Select(self, e):
        c, t, f = self.expr(e.condition), self.expr(e.true_value), self.expr(e.false_value)
        n = max(len(c), len(t), len(f))
        c, t, f = (x * n if len(x) == 1 else x for x in (c, t, f))
        return [f"({x} ? {y} : {z})" for x, y, z in zip(c, t, f, strict=False)]

    def expr_Cast(self, e):
        to_base, lanes = _split_dtype(_dtype_of(e))
        from_base, _ = _split_dtype(_dtype_of(e.value))
        vals = self.expr(e.value)
        if len(vals) == 1 and lanes > 1:
            vals = vals * lanes
        if to_base == from_base:
            return vals
        gt = self.glsl_type(to_base)
        self.note_type(from_base)
        if from_base == "bool" and _is_float(to_base):
            return [f"{gt}(({v}) ? 1 : 0)" for v in vals]
        if to_base == "int64" and _is_signed_int(from_base):
            # Mesa 22.3.6's lavapipe compared int64_t(x) (an OpSConvert) with constants wrongly
            # (int64_t(29) < 776 was false); the same value built from its two halves compares right
            self.helpers.add("tvm_sext64")
            narrow = "" if from_base == "int32" else "int"
            return [f"tvm_sext64({narrow}({v}))" for v in vals]
        return [f"{gt}({v})" for v in vals]

    def expr_Ramp(self, e):
        lanes = int(e.lanes)
        base = self.expr(e.base)[0]
        stride = self.expr(e.stride)[0]
        sbase, _ = _split_dtype(_dtype_of(e.base))
        return [base if i == 0 else f"({base} + {stride} * {_int_literal(i, sbase)})" for i in range(lanes)]

    def expr_Broadcast(self, e):
        lanes = int(e.lanes)
        v = self.expr(e.value)
        if len(v) != 1:
            raise UnsupportedConstruct("broadcast of a vector")
        if lanes > 1 and not _simple(v[0]):
            v = [self.hoist(v[0], _dtype_of(e.value))]
        return v * lanes

    def expr_Shuffle(self, e):
        pool = []
        for v in e.vectors:
            pool += self.expr(v)
        out = []
        for i in e.indices:
            if not isinstance(i, tirx.IntImm):
                raise UnsupportedConstruct("shuffle with a non-constant index")
            out.append(pool[int(i.value)])
        return out

    def expr_TensorLoad(self, e):
        buf = e.source
        view = self.views.get(buf)
        if view is None:
            raise UnsupportedConstruct(f"load from unknown buffer {getattr(buf, 'name', buf)}")
        if len(e.indices) != 1:
            raise UnsupportedConstruct(f"multi-dimensional load from {buf.name} (expected flattened TIR)")
        return self.element_refs(view, e.indices[0], buf.name)

    def expr_BufferLoad(self, e):
        return self.expr_TensorLoad(e)

    def hoist(self, value: str, dtype: str) -> str:
        """Bind a scalar sub-expression to a temporary when evaluation order allows it."""
        if self.prelude is None or self.cond_depth > 0:
            return value
        base, _ = _split_dtype(dtype)
        self.tmp_counter += 1
        name = self.fresh(f"tmp{self.tmp_counter}")
        self.prelude.append(f"{self.glsl_type(base)} {name} = {value};")
        return name

    def expr_Let(self, e):
        var = e.var
        vals = self.expr(e.value)
        dt = _dtype_of(e.value)
        if self.prelude is not None and self.cond_depth == 0:
            vals = [self.hoist(v, dt) for v in vals]
        saved = self.names.get(var)
        self.names[var] = [f"({v})" if not _simple(v) else v for v in vals]
        out = self.expr(e.body)
        if saved is None:
            del self.names[var]
        else:
            self.names[var] = saved
        return out

    def expr_Call(self, e):
        op = e.op
        name = op.name if isinstance(op, tvm.ir.Op) else str(op)
        args = list(e.args)
        dtype = _dtype_of(e)
        base, lanes = _split_dtype(dtype)
        if name == "prim.if_then_else" or name == "tirx.if_then_else":
            c = self.expr(args[0])
            self.cond_depth += 1
            t, f = self.expr(args[1]), self.expr(args[2])
            self.cond_depth -= 1
            n = max(len(c), len(t), len(f))
            c, t, f = (x * n if len(x) == 1 else x for x in (c, t, f))
            return [f"({x} ? {y} : {z})" for x, y, z in zip(c, t, f, strict=False)]
        if name in ("tirx.tvm_thread_invariant", "tirx.likely", "tirx.assume"):
            return self.expr(args[0])
        if name in ("tirx.call_pure_extern", "tirx.call_extern"):
            ext = args[0].value
            if ext not in _EXTERN_ALIASES:
                raise UnsupportedConstruct(f"external function {ext!r}")
            return self._math(_EXTERN_ALIASES[ext], args[1:], base, lanes)
        short = name.split(".", 1)[1] if "." in name else name
        if short in _MATH_UNARY or short in (
            "pow",
            "sigmoid",
            "fma",
            "exp10",
            "log10",
            "fmod",
            "atan2",
            "isnan",
            "isinf",
            "isfinite",
            "erf",
            "copysign",
        ):
            return self._math(short, args, base, lanes)
        if short in ("shift_left", "shift_right", "bitwise_and", "bitwise_or", "bitwise_xor"):
            op_s = {
                "shift_left": "<<",
                "shift_right": ">>",
                "bitwise_and": "&",
                "bitwise_or": "|",
                "bitwise_xor": "^",
            }[short]
            op_s = _bitwise_op(op_s, base)
            a, b = self.expr(args[0]), self.expr(args[1])
            n = max(len(a), len(b))
            a = a * n if len(a) == 1 else a
            b = b * n if len(b) == 1 else b
            return [f"({x} {op_s} {y})" for x, y in zip(a, b, strict=False)]
        if short == "bitwise_not":
            return [f"({_bitwise_op('~', base)}{x})" for x in self.expr(args[0])]
        if short == "popcount":
            return [f"{self.glsl_type(base)}(bitCount({x}))" for x in self.expr(args[0])]
        if short == "reinterpret":
            return self._reinterpret(args[0], base)
        if short == "large_uint_imm":
            lo, hi = int(args[0].value), int(args[1].value)
            return [_int_literal((hi << 32) | lo, base)] * lanes
        raise UnsupportedConstruct(f"intrinsic {name}")

    def _reinterpret(self, arg, to_base: str):
        from_base, _ = _split_dtype(_dtype_of(arg))
        vals = self.expr(arg)
        table = {
            ("float32", "uint32"): "floatBitsToUint",
            ("float32", "int32"): "floatBitsToInt",
            ("uint32", "float32"): "uintBitsToFloat",
            ("int32", "float32"): "intBitsToFloat",
            ("float16", "uint16"): "float16BitsToUint16",
            ("float16", "int16"): "float16BitsToInt16",
            ("uint16", "float16"): "uint16BitsToFloat16",
            ("int16", "float16"): "int16BitsToFloat16",
            ("int32", "uint32"): "uint",
            ("uint32", "int32"): "int",
        }
        fn = table.get((from_base, to_base))
        if fn is None:
            raise UnsupportedConstruct(f"reinterpret {from_base} -> {to_base}")
        self.note_type(from_base)
        self.note_type(to_base)
        return [f"{fn}({v})" for v in vals]

    def _math(self, fn: str, args, base: str, lanes: int):
        vals = [self.expr(a) for a in args]
        n = max(len(v) for v in vals) if vals else lanes
        vals = [v * n if len(v) == 1 else v for v in vals]
        one = _float_literal(1.0, base) if _is_float(base) else "1"
        out = []
        for i in range(n):
            a = [v[i] for v in vals]
            if fn in _MATH_UNARY:
                if not _is_float(base) and fn != "fabs":
                    raise UnsupportedConstruct(f"{fn} on {base}")
                out.append(f"{_MATH_UNARY[fn]}({a[0]})")
            elif fn == "pow":
                out.append(f"pow({a[0]}, {a[1]})")
            elif fn == "sigmoid":
                out.append(f"({one} / ({one} + exp(-({a[0]}))))")
            elif fn == "fma":
                out.append(f"fma({a[0]}, {a[1]}, {a[2]})")
            elif fn in ("max", "min"):
                out.append(f"{fn}({a[0]}, {a[1]})")
            elif fn == "exp10":
                out.append(f"exp2({a[0]} * {_float_literal(math.log2(10.0), base)})")
            elif fn == "log10":
                out.append(f"(log2({a[0]}) * {_float_literal(math.log10(2.0), base)})")
            elif fn == "fmod":
                self.helpers.add(f"tvm_fmod:{base}")
                out.append(f"tvm_fmod({a[0]}, {a[1]})")
            elif fn == "atan2":
                out.append(f"atan({a[0]}, {a[1]})")
            elif fn == "isnan":
                out.append(f"isnan({a[0]})")
            elif fn == "isinf":
                out.append(f"isinf({a[0]})")
            elif fn == "isfinite":
                out.append(f"(!isnan({a[0]}) && !isinf({a[0]}))")
            else:
                raise UnsupportedConstruct(f"math intrinsic {fn}")
        return out


# GLSL has no bitwise operators on bool: its logical ones give the same values
_BOOL_OPS = {"&": "&&", "|": "||", "^": "^^", "~": "!"}


def _bitwise_op(op: str, base: str) -> str:
    return _BOOL_OPS.get(op, op) if base == "bool" else op


def _bits(base: str) -> int:
    if base == "bool":
        return 8
    return int(re.sub(r"[a-z]", "", base))


def _simple(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*|[-0-9.e]+[a-z]*|\(-?[0-9]+l?\)", text) is not None


def _helper_defs() -> dict[str, str]:
    defs = {}
    for t in ("int", "int64_t", "int16_t", "int8_t"):
        key = {"int": "int32", "int64_t": "int64", "int16_t": "int16", "int8_t": "int8"}[t]
        defs[f"tvm_floordiv:{key}"] = (
            f"{t} tvm_floordiv({t} a, {t} b) {{ {t} q = a / b; "
            f"return (q * b != a && ((a < {t}(0)) != (b < {t}(0)))) ? q - {t}(1) : q; }}"
        )
        defs[f"tvm_floormod:{key}"] = (
            f"{t} tvm_floormod({t} a, {t} b) {{ {t} r = a - (a / b) * b; "
            f"return (r != {t}(0) && ((r < {t}(0)) != (b < {t}(0)))) ? r + b : r; }}"
        )
        defs[f"tvm_truncmod:{key}"] = f"{t} tvm_truncmod({t} a, {t} b) {{ return a - (a / b) * b; }}"
    for t, key in (("float", "float32"), ("float16_t", "float16")):
        defs[f"tvm_fmod:{key}"] = f"{t} tvm_fmod({t} a, {t} b) {{ return a - b * trunc(a / b); }}"
        defs[f"tvm_floormod:{key}"] = f"{t} tvm_floormod({t} a, {t} b) {{ return a - b * floor(a / b); }}"
    defs["tvm_sext64"] = "int64_t tvm_sext64(int x) { return packInt2x32(ivec2(x, x >> 31)); }"
    return defs


_HELPERS = _helper_defs()


def generate_glsl(func: tirx.PrimFunc, target: tvm.target.Target | None = None) -> KernelGLSL:
    """GLSL 450 for one device kernel (calling_conv 2, after TVM's device finalization passes)."""
    name = func.attrs.get("global_symbol")
    if name is None:
        raise UnsupportedConstruct("device kernel without global_symbol")
    cc = func.attrs.get("calling_conv")
    if cc is not None and int(cc) != 2:
        raise UnsupportedConstruct(f"PrimFunc {name} with calling_conv {int(cc)} (expected a device kernel)")
    target = target or func.attrs.get("target")
    return _Emitter(func, str(name), target).run()


__all__ = ["KernelGLSL", "BufferParam", "ScalarParam", "UnsupportedConstruct", "generate_glsl"]
