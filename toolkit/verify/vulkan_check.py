"""Check one TIR PrimFunc on a Vulkan driver: schedule it for a vulkan target, build it through TVM's
normal build (our target.build.vulkan), run the kernel on lavapipe with TVM's dispatch conventions, and
compare with the llvm build of the same *unscheduled* function (an independent reference: different schedule,
different compiler). The kernels checked standalone are the verifiers' sample kernels (sample_kernels.py);
`check_model_on_cpu_inputs` checks every kernel of a compiled model on the host build's inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import dlight as dl

from ..backends.vulkan.build import CompiledKernel, build_of, vulkan_imports
from ..backends.vulkan.codegen_glsl import BufferParam

_DEBUG = False
DEFAULT_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")


def dlight_schedule(mod: tvm.IRModule, target: tvm.target.Target, rules=DEFAULT_RULES) -> tvm.IRModule:
    with target:
        return dl.ApplyDefaultSchedule(*[getattr(dl.gpu, r)() for r in rules])(mod)


@dataclass
class KernelResult:
    name: str
    kernels: int
    max_abs_err: float
    max_abs_ref: float
    tolerance: float
    compile_seconds: float
    run_seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tolerance


def _fresh(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return tvm.ir.load_json(tvm.ir.save_json(func))


def _random_input(shape, dtype: str, rng: np.random.Generator, name: str = "") -> np.ndarray:
    from .verify import _QUANT_SCALE, random_scales

    if _QUANT_SCALE.search(name) and dtype in ("float16", "uint16"):
        # quantization scales / mins as fp16 (or its bits): small, so a K-quant's d * sc * q summed over a
        # row stays inside fp16's range (verify.QUANT_SCALE_STD)
        return random_scales(shape, rng).view(dtype)
    if dtype == "uint32":  # packed q4 words: every nibble pattern
        return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype == "float16":
        return (rng.standard_normal(shape) * 0.5).astype(np.float16)
    return rng.standard_normal(shape).astype(dtype)


def _shape(buf, env: dict[str, int]) -> tuple[int, ...]:
    from ..backends.vulkan.build import evaluate_int

    return tuple(evaluate_int(d, env) for d in buf.shape)


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs reference) over finite reference values. Untouched scratch memory may hold NaN
    (copied bit for bit to both runs); a finite/non-finite disagreement counts as infinite error."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf"), float(np.abs(ref[finite]).max(initial=0.0))
    if not finite.any():
        return 0.0, 0.0
    return float(np.abs(got[finite] - ref[finite]).max()), float(np.abs(ref[finite]).max())


def output_tolerance(out_dtype: str, ref: np.ndarray, reduce_len: int) -> float:
    """Absolute tolerance for a device output of `out_dtype` against an fp32 (or same-dtype) reference."""
    # fp32: different summation orders over K terms give errors ~ K * eps * |partial sums|; 1e-4 relative to
    # the output magnitude covers K <= 8192 with margin. fp16 outputs: storage rounding alone is 2^-11
    # relative, and fp16 accumulation (dlight keeps the output dtype) adds ~sqrt(K) ulps, so 2e-2 relative.
    # The scale is taken over finite values: a non-finite one (scratch memory) must not widen it to inf.
    finite = np.nan_to_num(ref.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = max(1.0, float(np.abs(finite).max(initial=0.0)))
    rel = 2e-2 if out_dtype == "float16" else 1e-4 * max(1.0, reduce_len / 512)
    return rel * scale


def check_primfunc(
    func: tirx.PrimFunc,
    name: str,
    target: tvm.target.Target,
    device,
    sizes: dict[str, int],
    rules=DEFAULT_RULES,
    seed: int = 0,
    reduce_len: int = 512,
    schedule=None,
) -> KernelResult:
    """Build `func` for Vulkan and llvm, run both on the same random inputs, compare every written buffer."""
    func = _fresh(func).with_attr("global_symbol", name)
    # TVM passes may rewrite a function in place: schedule a private copy, keep `func` for the reference
    mod = tvm.IRModule({name: _fresh(func)})
    t0 = time.perf_counter()
    scheduled = schedule(mod) if schedule is not None else dlight_schedule(mod, target, rules)
    # no CSE: otherwise the host passes hoisted temporaries (cse_v1 = n * 576) as extra kernel scalars
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(scheduled, target=target)
    compile_s = time.perf_counter() - t0
    builds = [build_of(m) for m in vulkan_imports(lib.mod)]
    kernels: list[CompiledKernel] = [k for b in builds for k in b.kernels.values()]
    if len(kernels) != 1:
        raise NotImplementedError(
            f"{name}: {len(kernels)} device kernels; the checker runs single-kernel functions"
        )
    kernel = kernels[0]

    rng = np.random.default_rng(seed)
    params = list(func.params)
    env = dict(sizes)
    arrays = {}
    for p in params:
        if isinstance(p.ty, tvm.ir.PointerType) or hasattr(p, "shape"):
            arrays[p.name] = _random_input(_shape(p, env), str(p.dtype), rng, p.name)
    ref_lib = tvm.compile(tvm.IRModule({name: _fresh(func)}), target="llvm")
    ref_args = []
    for p in params:
        if p.name in arrays:
            ref_args.append(tvm.runtime.tensor(arrays[p.name]))
        else:
            ref_args.append(env[p.name])
    ref_lib[name](*ref_args)
    refs = {p.name: a.numpy() for p, a in zip(params, ref_args, strict=False) if p.name in arrays}

    by_ptr = {f"{p.name}_ptr": p.name for p in params if p.name in arrays}
    call_args = []
    outputs = []
    for kp in kernel.glsl.params:
        if isinstance(kp, BufferParam):
            if kp.name not in by_ptr:
                raise NotImplementedError(f"{name}: kernel buffer {kp.name} is not a function parameter")
            pname = by_ptr[kp.name]
            arr = arrays[pname] if not kp.written else np.zeros_like(arrays[pname])
            call_args.append(arr)
            if kp.written:
                outputs.append((len(call_args) - 1, pname))
        else:
            if kp.name not in env:
                raise NotImplementedError(f"{name}: scalar argument {kp.name} has no value")
            call_args.append(env[kp.name])
    t1 = time.perf_counter()
    result = device.run(kernel.name, kernel.spirv, kernel.info, kernel.flag, call_args, kernel.grid(env))
    run_s = time.perf_counter() - t1
    err, mag, tol = 0.0, 0.0, 0.0
    for idx, pname in outputs:
        e, m = _compare(result[idx], refs[pname])
        err, mag = max(err, e), max(mag, m)
        tol = max(tol, output_tolerance(str(arrays[pname].dtype), refs[pname], reduce_len))
    return KernelResult(name, len(kernels), err, mag, tol, compile_s, run_s)


def standalone_kernels() -> dict[str, tuple[tirx.PrimFunc, dict[str, int], int]]:
    """name -> (PrimFunc, dynamic sizes, reduction length for the tolerance): the verifiers' sample kernels
    (verify/sample_kernels.py), the q4 ones with int32 shapes and fp16 scales beside fp32 activations too."""
    from .sample_kernels import add_tanh, dequant_matmul, rms_norm, silu_mul, softmax

    def q4(act: str, scale: str, seq_len: int | str = 1):
        return dequant_matmul(256, 512, act, seq_len, scale=scale, index="int32")

    return {
        "q4_gemv_f32_s16": (q4("float32", "float16"), {}, 512),
        "q4_gemv_f32_s32": (q4("float32", "float32"), {}, 512),
        "q4_gemv_f16_s16": (q4("float16", "float16"), {}, 512),
        "q4_matmul_f32": (q4("float32", "float16", "seq_len"), {"seq_len": 37}, 512),
        "q4_matmul_f16": (q4("float16", "float16", "seq_len"), {"seq_len": 37}, 512),
        "rms_norm_f32": (rms_norm(256, "float32"), {"n": 5}, 256),
        "rms_norm_f16": (rms_norm(256, "float16"), {"n": 5}, 256),
        "softmax_f32": (softmax(1000, "float32"), {"b": 3}, 1000),
        "softmax_f16": (softmax(1000, "float16"), {"b": 3}, 1000),
        "silu_mul_f16": (silu_mul(dtype="float16"), {"seq_len": 7}, 1),
        "add_tanh_f32": (add_tanh("float32"), {"n": 1000}, 1),
    }


# ---- every kernel of a compiled model ---------------------------------------------------------------------


@dataclass
class ModelReport:
    device_kernels: int  # SPIR-V modules in the full vulkan build (all passed spirv-val)
    build_seconds: float
    results: list  # KernelResult per PrimFunc run on the driver
    not_run: dict  # PrimFunc name -> reason (e.g. pre-scheduled paged-KV kernels: compile + spirv-val only)


def _shape_vars(func: tirx.PrimFunc) -> set[str]:
    names = set()

    def visit(e):
        if isinstance(e, tirx.Var):
            names.add(e.name)
        for attr in ("a", "b", "value"):
            if hasattr(e, attr) and not isinstance(e, (tirx.IntImm, tirx.FloatImm)):
                visit(getattr(e, attr))

    for p in func.params:
        if isinstance(p.ty, tvm.ir.PointerType) or hasattr(p, "shape"):
            for d in p.shape:
                visit(d)
        else:
            names.add(p.name)
    return names


def paged_kv_cache_module(
    target: tvm.target.Target,
    dtype: str = "float32",
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    layers: int = 1,
) -> tvm.IRModule:
    """A tiny Relax module holding TVM's TIR paged KV cache (attention with fused qkv), for codegen
    coverage."""
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

    class _Attn(nn.Module):
        def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size):
            return TIRPagedKVCache(
                attn_kind="mha",
                max_batch_size=max_batch_size,
                max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size,
                page_size=page_size,
                support_sliding_window=0,
                layer_partition=relax.ShapeExpr([0, layers]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                qk_head_dim=head_dim,
                v_head_dim=head_dim,
                mla_original_qk_head_dim=0,
                mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL,
                rope_scale=1,
                rope_theta=10000,
                rope_scaling={},
                rope_ext_factors=relax.prim_value(0),
                rotary_dim=head_dim,
                enable_disaggregation=False,
                dtype=dtype,
                target=target,
            )

        def attn(self, qkv: nn.Tensor, kv: PagedKVCache):
            return kv.attention_with_fused_qkv(0, qkv, heads, sm_scale=head_dim**-0.5), kv

    spec = {
        "create_tir_paged_kv_cache": {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
        "attn": {
            "qkv": nn.spec.Tensor([1, "seq_len", heads + 2 * kv_heads, head_dim], dtype),
            "kv": nn.spec.Object(object_type=PagedKVCache),
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }
    mod, _ = _Attn().export_tvm(spec=spec)
    return mod


# ---- every VM-level kernel of a model, on the inputs a real CPU run feeds it ----------------------------


def kv_cache_kernel_positions(mod: tvm.IRModule) -> dict[int, str]:
    """Argument position -> TIR function name in the KV-cache factory call of `create_tir_paged_kv_cache`."""
    from tvm import relax

    out: dict[int, str] = {}
    func = mod["create_tir_paged_kv_cache"]
    for block in func.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or not call.args:
                continue
            head = call.args[0]
            if not (
                isinstance(head, relax.ExternFunc)
                and "paged_attention_kv_cache_create" in str(head.global_symbol)
            ):
                continue
            for i, a in enumerate(call.args[1:]):
                if isinstance(a, tvm.ir.GlobalVar):
                    out[i] = a.name_hint
                elif (
                    isinstance(a, relax.Tuple)
                    and len(a.fields) == 2
                    and isinstance(a.fields[1], tvm.ir.GlobalVar)
                ):
                    out[i] = a.fields[1].name_hint
    return out


def capture_cpu_calls(
    checkpoint, quantization: str, dtype: str, out_dir, kv_kernel_names: dict[int, str] | None = None
) -> dict[str, tuple[list, list]]:
    """Run the host (llvm) build of the model (prefill 7, prefill 4 more, 2 decode steps) and record, for
    the first call of every TIR function, the argument tensors before and after the call."""
    from ..checkpoint import open_model
    from ..compile.compile_model import compile_model
    from ..runtime.engine import Engine
    from ..runtime.weights import load_params

    src = open_model(checkpoint)
    compiled = compile_model(src.config, quantization, "host-exact", out_dir, dtype=dtype)
    lib = tvm.runtime.load_module(str(compiled.library))
    calls: dict[str, tuple[list, list]] = {}
    pending: dict[str, list] = {}

    def snapshot(args):
        return [a.numpy().copy() if isinstance(a, tvm.runtime.Tensor) else a for a in args]

    # The paged KV cache calls its kernels from C++, not through VM instructions. Its factory receives them as
    # function arguments, so a wrapped factory hands it recording wrappers; argument positions are the same
    # for every target (the C++ cache fixes the calling convention), names come from `kv_kernel_names`.
    create_name = "vm.builtin.paged_attention_kv_cache_create"
    original = tvm.get_global_func(create_name)

    def recorder(name, fn):
        def call(*args):
            before = snapshot(args) if name not in calls else None
            fn(*args)
            if before is not None:
                calls[name] = (before, snapshot(args))

        return tvm_ffi.convert(call)

    def create(*args):
        wrapped = list(args)
        for i, a in enumerate(args):
            name = (kv_kernel_names or {}).get(i)
            if name is None:
                continue
            if isinstance(a, tvm_ffi.Function):
                wrapped[i] = recorder(name, a)
            elif (
                isinstance(a, (list, tuple, tvm_ffi.Array))
                and len(a) == 2
                and isinstance(a[1], tvm_ffi.Function)
            ):
                wrapped[i] = [a[0], recorder(name, a[1])]
        return original(*wrapped)

    tvm.register_global_func(create_name, create, override=True)
    try:
        eng = Engine(lib, load_params(src, compiled, tvm.cpu()), src.config, dtype=dtype)
    finally:
        tvm.register_global_func(create_name, original, override=True)

    def instrument(func, symbol, before_run, ret_value, *args):
        symbol = str(symbol)
        if symbol in calls:
            return 0
        if before_run:
            pending[symbol] = snapshot(args)
        elif symbol in pending:
            calls[symbol] = (pending.pop(symbol), snapshot(args))
        return 0

    eng.vm.set_instrument(instrument)
    sid = eng.add_sequence()
    rng = np.random.default_rng(0)
    eng.prefill(sid, [int(t) for t in rng.integers(0, src.config.vocab_size, 7)])  # ragged prefill
    eng.prefill(sid, [int(t) for t in rng.integers(0, src.config.vocab_size, 4)])  # prefill over cached pages
    eng.decode(sid, 3)
    eng.decode(sid, 5)
    return calls


def check_captured(
    func: tirx.PrimFunc, name: str, target, device, schedule, before: list, after: list
) -> KernelResult:
    """Run the Vulkan build of `func` on the captured inputs; compare with the captured CPU outputs."""
    mod = tvm.IRModule({name: _fresh(func).with_attr("global_symbol", name)})
    t0 = time.perf_counter()
    scheduled = schedule(mod)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(scheduled, target=target)
    compile_s = time.perf_counter() - t0
    kernels = [k for m in vulkan_imports(lib.mod) for k in build_of(m).kernels.values()]
    if len(kernels) != 1:
        raise NotImplementedError(f"{name}: {len(kernels)} device kernels")
    kernel = kernels[0]
    params = list(func.params)
    if len(before) != len(params):
        raise NotImplementedError(f"{name}: captured {len(before)} args for {len(params)} params")
    env: dict[str, int] = {}
    arrays = {}
    for p, value in zip(params, before, strict=True):
        if isinstance(value, np.ndarray):
            arrays[p.name] = value
            for d, n in zip(p.shape, value.shape, strict=True):
                if isinstance(d, tirx.Var):
                    env[d.name] = int(n)
            eo = getattr(p, "elem_offset", None)
            if isinstance(eo, tirx.Var):
                env[eo.name] = 0  # the captured array is a dense copy of the (possibly offset) view
        else:
            env[p.name] = value if isinstance(value, float) else int(value)  # keep float scalars (sm_scale)
    outs = {p.name: a for p, a in zip(params, after, strict=True) if isinstance(a, np.ndarray)}
    call_args, written = [], []
    for kp in kernel.glsl.params:
        if isinstance(kp, BufferParam):
            pname = kp.name[: -len("_ptr")] if kp.name.endswith("_ptr") else kp.name
            if pname not in arrays:
                raise NotImplementedError(f"{name}: kernel buffer {kp.name} is not a function parameter")
            call_args.append(arrays[pname].copy())
            if kp.written:
                written.append((len(call_args) - 1, pname))
        else:
            if kp.name not in env:
                raise NotImplementedError(f"{name}: no value for scalar {kp.name}")
            call_args.append(env[kp.name])
    t1 = time.perf_counter()
    result = device.run(kernel.name, kernel.spirv, kernel.info, kernel.flag, call_args, kernel.grid(env))
    run_s = time.perf_counter() - t1
    err = mag = tol = 0.0
    k_len = max([int(d) for p in params for d in getattr(p, "shape", []) if isinstance(d, tirx.IntImm)] + [1])
    for idx, pname in written:
        e, m = _compare(result[idx], outs[pname])
        if _DEBUG:
            print(name, pname, e, m)
        err, mag = max(err, e), max(mag, m)
        tol = max(tol, output_tolerance(str(outs[pname].dtype), outs[pname], k_len))
    return KernelResult(name, 1, err, mag, tol, compile_s, run_s)


def check_low_batch_branches(
    func: tirx.PrimFunc, name: str, target: tvm.target.Target, device, preset, reduce_len: int = 512
) -> list[KernelResult]:
    """Each LowBatchGEMV branch of the preset's low-batch dispatch (compile/low_batch_gemv.py) for `func`,
    run alone at a batch inside its range (`name[n<=limit]`); [] where the dispatch leaves `func` alone. The
    dispatch itself is one function with a kernel per branch, which these checkers cannot launch whole."""
    from ..compile.gpu_schedule import has_thread_binding

    sizes = [v for v in _shape_vars(func) if not v.endswith("_elem_offset")]
    if len(sizes) != 1:
        return []
    results = []
    for limit, bucket in preset.low_batch_gemv:

        def branch(m, bucket=bucket):
            with target:
                return dl.ApplyDefaultSchedule(dl.gpu.LowBatchGEMV(bucket))(m)

        if not has_thread_binding(branch(tvm.IRModule({"m": _fresh(func)}))["m"]):
            return []  # not GEMV-shaped: no dispatch for it
        env = {v: 0 if v.endswith("_elem_offset") else min(limit, 5) for v in _shape_vars(func)}
        r = check_primfunc(func, name, target, device, env, reduce_len=reduce_len, schedule=branch)
        results.append(replace(r, name=f"{name}[n<={limit}]"))
    return results


def check_model_on_cpu_inputs(
    checkpoint, quantization: str, preset_name: str, device, work_dir
) -> ModelReport:
    """Every TIR function the VM calls directly, built for the Vulkan preset and run on `device` with the
    inputs (and compared with the outputs) of the same function in the host build of the same graph."""
    from pathlib import Path

    from ..checkpoint import open_model
    from ..compile import pipeline
    from ..compile.compile_model import graph_options, schedule_fn
    from ..targets import load_preset

    preset = load_preset(preset_name)
    target = preset.target
    opts = graph_options(quantization, preset)
    cfg = open_model(checkpoint).config
    t0 = time.perf_counter()
    mod, _ = pipeline.export_model(cfg, opts, target)
    built = pipeline.build(mod, target, schedule_fn(preset), system_lib=preset.system_lib)
    ex = built[0] if isinstance(built, tuple) else built  # (executable, scheduled IRModule)
    build_s = time.perf_counter() - t0
    n_kernels = sum(len(build_of(m).kernels) for m in vulkan_imports(ex.mod))

    mod, _ = pipeline.export_model(cfg, opts, target)
    positions = kv_cache_kernel_positions(mod)
    calls = capture_cpu_calls(checkpoint, quantization, opts.dtype, Path(work_dir) / "host", positions)
    lowered = pipeline.lower_to_tir(mod, target)
    # one kernel per function for the checks below: the low-batch dispatch's other branches are checked on
    # their own (check_low_batch_branches); without it a symbolic matmul is its large-batch branch
    sched = schedule_fn(replace(preset, low_batch_gemv=()))

    def schedule_one(m):
        with target:
            return sched(m)

    results, not_run = [], {}
    for gv, func in lowered.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        try:
            if name in calls:
                results.append(check_captured(func, name, target, device, schedule_one, *calls[name]))
                results += check_low_batch_branches(func, name, target, device, preset)
                continue
            if func.attrs.get("tirx.is_scheduled", False):
                not_run[name] = "paged-KV-cache kernel (called inside the cache): compiled and validated only"
                continue
            index_inputs = [p.name for p in func.params if str(getattr(p, "dtype", "")) in ("int32", "int64")]
            if index_inputs:
                # random positions / page maps could index out of bounds (an OOB write on a CPU driver
                # corrupts this process); these run inside the KV cache on real data only
                not_run[name] = f"called inside the KV cache with index inputs {index_inputs}: compiled only"
                continue
            # not called on the CPU build (e.g. reshapes become views there): random inputs vs llvm
            sizes = {v: 0 if v.endswith("_elem_offset") else 5 for v in _shape_vars(func)}
            results.append(check_primfunc(func, name, target, device, sizes, schedule=schedule_one))
        except NotImplementedError as err:
            not_run[name] = str(err)
    return ModelReport(n_kernels, build_s, results, not_run)
