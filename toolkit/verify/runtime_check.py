"""Every kernel of a Vulkan / OpenCL library run by TVM's own runtime (plugins from `phi3 runtime build`).

The reference is the host-exact (llvm, fp32 activations) build of the same graph, run with the same random
weights through the same engine calls (two prefills, decodes, a two-sequence batch decode). For the first call
of every TIR function, its argument tensors before and after the call are recorded: the Relax VM's functions
through `vm.set_instrument`, the paged KV cache's kernels (attention, append, copy; TVM schedules these
itself) by wrapping the functions the cache's factory receives. Each device kernel is then called through
the runtime, as the VM and the cache call it (its host wrapper computes the grid and the runtime launches
it), on the recorded inputs, and every buffer the host build wrote is compared. Where the kernel declares a
float buffer in another dtype than the host build (fp16 activations and KV pages beside host-exact's fp32),
the recorded values are cast to the kernel's dtype and the host kernel is run again on exactly those values
for the reference, so only the kernel's own arithmetic differs. Functions the host run never
calls (e.g. reshapes that are views on the CPU) run on random inputs against the llvm build of their
unscheduled TIR, as the launcher-based check does.
"""

from __future__ import annotations

import time

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

from ..compile.kernel_info import describe
from .verify import DEFAULT_SHAPE_VALUE, KernelCheck, random_inputs, run_reference
from .vulkan_check import output_tolerance


def _random_params(meta: list[dict], seed: int) -> list[np.ndarray]:
    """Weights with the library's names/shapes/dtypes: any bits for packed q4 words, N(0, 1/sqrt(fan_in))
    for matrices (so activations stay O(1) through the layers), U(0.5, 1.5) for norms and scales."""
    rng = np.random.default_rng(seed)
    out = []
    for p in meta:
        shape, dtype = tuple(p["shape"]), p["dtype"]
        # uint16 params are fp16 scale / min bits (fp32 gguf schemes): drawn as fp16 values
        value_dtype = np.float16 if dtype == "uint16" else dtype
        if dtype == "uint32":
            out.append(rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32))
            continue
        if "scale" in p["name"]:
            # q4 scales: symmetric nibbles (-8..7) times scale -> entries ~ N(0, 1/fan_in) overall
            fan_in = max(1, shape[-1] * 32)
            v = (rng.uniform(0.5, 1.5, shape) / (4.6 * np.sqrt(fan_in))).astype(value_dtype)
        elif len(shape) == 1:
            v = rng.uniform(0.5, 1.5, shape).astype(value_dtype)
        else:
            v = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(value_dtype)
        out.append(v.view(np.uint16) if dtype == "uint16" else v)
    return out


def _snapshot(args) -> list:
    return [a.numpy().copy() if isinstance(a, tvm.runtime.Tensor) else a for a in args]


def capture_host_calls(cfg, quantization: str, dtype: str | None, seed: int = 0):
    """(calls by VM symbol, calls by KV-cache factory position, the factory's kernel names by position) of
    the host-exact build; a call is (host function, arguments before, arguments after)."""
    from ..compile import pipeline
    from ..compile.compile_model import compiled_for, graph_options
    from ..runtime.engine import CacheOptions, Engine
    from ..targets import load_preset
    from .vulkan_check import kv_cache_kernel_positions

    preset = load_preset("host-exact")
    compiled = compiled_for(cfg, quantization, preset)
    mod, _ = pipeline.export_model(cfg, graph_options(quantization, preset, dtype), preset.target)
    positions = kv_cache_kernel_positions(mod)
    meta = compiled.manifest["params"]
    params = [tvm.runtime.tensor(a) for a in _random_params(meta, seed)]
    lib = tvm.runtime.load_module(str(compiled.library))
    vm_calls: dict[str, tuple[object, list, list]] = {}
    kv_calls: dict[int, tuple[object, list, list]] = {}
    pending: dict[str, list] = {}
    create_name = "vm.builtin.paged_attention_kv_cache_create"
    original = tvm.get_global_func(create_name)

    def recorder(pos, fn):
        def call(*args):
            before = _snapshot(args) if pos not in kv_calls else None
            fn(*args)
            if before is not None:
                kv_calls[pos] = (fn, before, _snapshot(args))

        return tvm_ffi.convert(call)

    def create(*args):
        wrapped = list(args)
        for i, a in enumerate(args):
            if i not in positions:
                continue
            if isinstance(a, tvm_ffi.Function):
                wrapped[i] = recorder(i, a)
            elif isinstance(a, (list, tuple, tvm_ffi.Array)) and len(a) == 2:
                wrapped[i] = [a[0], recorder(i, a[1])]
        return original(*wrapped)

    tvm.register_global_func(create_name, create, override=True)
    try:
        eng = Engine(lib, params, cfg, dtype=compiled.manifest["dtype"], cache=CacheOptions(prefill_chunk=16))
    finally:
        tvm.register_global_func(create_name, original, override=True)

    def instrument(func, symbol, before_run, ret_value, *args):
        symbol = str(symbol)
        if symbol in vm_calls or symbol.startswith("vm.builtin"):
            return 0
        if before_run:
            pending[symbol] = _snapshot(args)
        elif symbol in pending:
            vm_calls[symbol] = (func, pending.pop(symbol), _snapshot(args))
        return 0

    eng.vm.set_instrument(instrument)
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(t) for t in rng.integers(0, cfg.vocab_size, n)]  # noqa: E731
    a, b = eng.add_sequence(), eng.add_sequence()
    eng.prefill(a, ids(7))  # ragged prefill
    eng.prefill(a, ids(4))  # prefill over cached pages
    eng.decode(a, 3)
    eng.prefill(b, ids(5))
    eng.decode_batch([a, b], [4, 5])  # batch decode: two sequences, two page lists
    return vm_calls, kv_calls, positions


def fits(func: tirx.PrimFunc, args: list) -> bool:
    """Whether recorded arguments have the ranks and sizes `func` declares (a symbolic size bound to one
    value across its parameters)."""
    if len(args) != len(func.params):
        return False
    bound: dict = {}
    for p, a in zip(func.params, args, strict=True):
        shape = getattr(p.ty, "shape", None)
        if shape is None or not isinstance(a, np.ndarray):
            continue
        if len(shape) != a.ndim:
            return False
        for dim, n in zip(shape, a.shape, strict=True):
            if isinstance(dim, tirx.IntImm):
                if int(dim) != n:
                    return False
            elif isinstance(dim, tirx.Var) and bound.setdefault(dim.name, n) != n:
                return False
    return True


def host_call_for(name: str, func: tirx.PrimFunc, calls: dict) -> tuple | None:
    """The recorded host call for device kernel `name`: its namesake, when the arguments fit `func`. FuseOps
    numbers twin functions (rms_norm, rms_norm1, ...) in the order each graph emits them, and the fp16 and
    fp32 graphs emit prefill's and decode's in different orders, so a namesake can be the other twin; a
    kernel without a fitting call is checked against its own TIR on llvm instead (a sibling of the same
    shapes need not compute the same thing)."""
    found = calls.get(name)
    return found if found is not None and fits(func, found[0][1]) else None


def param_dtypes(func: tirx.PrimFunc) -> list[str]:
    """The dtype of each parameter of `func`: its buffer's for a tensor, its own for a scalar."""
    return [str(p.ty.dtype) for p in func.params]  # BufferType and PrimType both carry a dtype


def in_kernel_dtypes(func: tirx.PrimFunc, host_fn, before: list, after: list) -> tuple[list, list]:
    """(inputs, reference) of a recorded host call for the kernel `func`: float arrays the kernel declares
    in another float dtype are cast to it, and the host function is run again on the cast values (exact
    in the host's wider dtype) for the reference; calls already in the kernel's dtypes are returned as
    recorded. Other dtype differences are left for the runtime to refuse (reported as an error)."""
    cast = list(before)
    for i, (b, d) in enumerate(zip(before, param_dtypes(func), strict=True)):
        if isinstance(b, np.ndarray) and b.dtype.kind == "f" and np.dtype(d).kind == "f" and b.dtype != d:
            # buffers the kernel only writes hold uninitialised memory, which may exceed fp16's range: inf
            # there is harmless (overwritten), and an input out of range shows as a non-finite mismatch
            with np.errstate(over="ignore"):
                cast[i] = b.astype(d)
    if all(c is b for c, b in zip(cast, before, strict=True)):
        return before, after
    host_in = [c.astype(b.dtype) if c is not b else b for c, b in zip(cast, before, strict=True)]
    return cast, _run(host_fn, host_in, tvm.cpu())


def _compare(ref: np.ndarray, got: np.ndarray) -> float:
    """max abs error over the reference's finite values; a finite/non-finite disagreement is infinite."""
    if ref.dtype.kind != "f":
        return 0.0 if np.array_equal(ref, got) else float("inf")
    r, g = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r)
    if not np.array_equal(finite, np.isfinite(g)):
        return float("inf")
    return float(np.abs(g[finite] - r[finite]).max(initial=0.0))


def _run(fn, before: list, dev) -> list:
    args = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in before]
    fn(*args)
    return [a.numpy() if isinstance(a, tvm.runtime.Tensor) else a for a in args]


def _check(
    name: str, fn, func: tirx.PrimFunc | None, before: list, after: list, dev, backend: str
) -> KernelCheck:
    check = KernelCheck(name, [name], backend, "error")
    start = time.perf_counter()
    shapes = [tuple(a.shape) for a in before if isinstance(a, np.ndarray)]
    reduce_len = max([int(d) for s in shapes for d in s] + [1])
    try:
        got = _run(fn, before, dev)
        worst, where, outputs = (-1.0, 0.0, 0.0), "", []
        for i, (b, a, g) in enumerate(zip(before, after, got, strict=True)):
            if not isinstance(a, np.ndarray) or np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                continue
            pname = func.params[i].name if func is not None and i < len(func.params) else f"arg{i}"
            outputs.append(pname)
            # the tolerance follows what the kernel stores (fp16 beside an fp32 reference: its rounding)
            err, tol = _compare(a, g), output_tolerance(str(g.dtype), a, reduce_len)
            if err / tol > worst[0]:
                worst, where = (err / tol, err, tol), pname
        if not outputs:
            check.note = "the host call wrote no buffer"
        else:
            check.error, check.tolerance = worst[1], worst[2]
            check.status = "ok" if worst[1] <= worst[2] else "mismatch"
            check.note = f"TVM {backend} runtime on the host run's inputs; worst buffer {where}"
    except Exception as e:  # a broken kernel is a finding to report, not a reason to stop checking others
        check.note = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    check.seconds = round(time.perf_counter() - start, 3)
    return check


def merge_state_reference(v, s, v_other, s_other) -> tuple[np.ndarray, np.ndarray]:
    """numpy `tir_attention_merge_state` (TVM's relax/frontend/nn/llm/tree_attn.py semantics): two partial
    attentions with their base-2 log-sum-exp, merged in place into (v, s)."""
    m = np.maximum(s, s_other)
    a, b = np.exp2(s - m), np.exp2(s_other - m)
    return (v * a[..., None] + v_other * b[..., None]) / (a + b)[..., None], m + np.log2(a + b)


def _merge_state_check(fn, func: tirx.PrimFunc, cfg, dev, backend: str, rng) -> KernelCheck:
    """The cache's merge kernel (chunked prefill, cascade decode) has no CPU counterpart in the host build:
    check it against numpy on random partial states (its thread layout is fixed for the model's heads), in
    the kernel's dtypes (fp16 V beside fp32 log-sum-exp for fp16 caches), numpy in fp32 on those values."""
    n, h, d = 5, cfg.num_attention_heads, cfg.head_dim
    shapes = [(n, h, d), (n, h), (n, h, d), (n, h)]
    before = [rng.standard_normal(sh).astype(dt) for sh, dt in zip(shapes, param_dtypes(func), strict=True)]
    v, s, vo, so = (b.astype("float32") for b in before)
    ref_v, ref_s = merge_state_reference(v, s, vo, so)
    after = [ref_v.astype("float32"), ref_s.astype("float32"), before[2], before[3]]
    check = _check(MERGE_STATE, fn, func, before, after, dev, backend)
    check.note = check.note.replace("on the host run's inputs", "on random states vs numpy")
    return check


MERGE_STATE = "tir_attention_merge_state"


def verify_with_runtime(
    cfg, quantization: str, preset, dtype, unscheduled, scheduled, library, seed: int = 0
) -> list[KernelCheck]:
    """KernelChecks for every PrimFunc of `scheduled`, called in the compiled `library` itself (the kernels
    that ship) through TVM's runtime on this machine's device."""
    from ..compile import pipeline
    from ..compile.compile_model import graph_options
    from ..runtime.plugins import require_device
    from .vulkan_check import kv_cache_kernel_positions

    backend = preset.kind
    dev = require_device(backend)
    vm_calls, kv_calls, host_positions = capture_host_calls(cfg, quantization, dtype, seed)
    mod, _ = pipeline.export_model(cfg, graph_options(quantization, preset, dtype), preset.target)
    dev_positions = kv_cache_kernel_positions(mod)
    by_name = {}
    for pos, call in kv_calls.items():
        if pos in dev_positions:
            by_name[dev_positions[pos]] = (call, f"KV-cache kernel (host: {host_positions[pos]})")
    for name, call in vm_calls.items():
        by_name.setdefault(name, (call, ""))
    checks = []
    lib = tvm.runtime.load_module(str(library))
    rng = np.random.default_rng(seed)
    unscheduled_names = {gv.name_hint for gv in unscheduled.get_global_vars()}
    for gv, func in sorted(scheduled.functions_items(), key=lambda x: x[0].name_hint):
        name = gv.name_hint
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            fn = lib.get_function(name, query_imports=True)
        except AttributeError:
            fn = None
        if fn is None:
            checks.append(KernelCheck(name, [], backend, "not-run", note="not exported by the library"))
        elif name == MERGE_STATE:
            checks.append(_merge_state_check(fn, func, cfg, dev, backend, rng))
        elif (found := host_call_for(name, func, by_name)) is not None:
            (host_fn, before, after), origin = found
            try:
                before, after = in_kernel_dtypes(func, host_fn, before, after)
            except Exception as e:  # the host kernel refused the cast values: reported for this kernel
                note = f"host reference on the kernel's dtypes: {type(e).__name__}: {e}".splitlines()[0]
                checks.append(KernelCheck(name, [name], backend, "error", note=note[:300]))
                continue
            c = _check(name, fn, func, before, after, dev, backend)
            c.note = f"{origin}; {c.note}" if origin else c.note
            checks.append(c)
        elif name in unscheduled_names and not _prescheduled(unscheduled[name]):
            one = tvm.IRModule({gv: func})
            checks.append(_random_check(name, fn, one, unscheduled[name], preset, dev, rng))
        else:
            note = (
                "the host run's namesake call has other shapes (and no llvm reference)"
                if name in by_name
                else "not called by the host run (no recorded inputs)"
            )
            checks.append(KernelCheck(name, [], backend, "not-run", note=note))
    return checks


def _prescheduled(func: tirx.PrimFunc) -> bool:
    """TVM's own KV-cache kernels arrive scheduled: no unscheduled TIR to build an llvm reference from."""
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def _random_check(name: str, fn, one: tvm.IRModule, func: tirx.PrimFunc, preset, dev, rng) -> KernelCheck:
    """A function the host run never calls: random inputs, llvm build of its unscheduled TIR as reference."""
    backend = preset.kind
    check = KernelCheck(name, [name], backend, "error")
    try:
        info = describe(one, preset.target)[name]
        values = {v: DEFAULT_SHAPE_VALUE for v in info.shape_vars}
        values.update({v: 0 for v in info.offset_vars})
        inputs = random_inputs(info, values, rng)
        expected = run_reference(func, info, inputs)
        # scalars go in as Python numbers, as the VM passes them (0-d arrays would become tensors)
        before = [inputs[p.name].item() if p.shape is None else inputs[p.name] for p in info.params]
        after = [before[i] if p.shape is None else expected[p.name] for i, p in enumerate(info.params)]
        check = _check(name, fn, func, before, after, dev, backend)
        check.note = check.note.replace("on the host run's inputs", "on random inputs vs llvm")
    except Exception as e:  # reported per kernel, as verify_kernels does
        check.note = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return check
