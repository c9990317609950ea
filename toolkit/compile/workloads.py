"""A lowered model's kernels as fixed-size workloads: which kernels a step calls and how often, their
dynamic sizes bound to one step's values, structural hashes. Shared by applying tuned records (compile)
and by tuning (tune)."""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import IRModule, relax, sym, tirx

DEFAULT_PREFILL_LEN = 128  # prompt length that prefill kernels are specialised to for tuning


def call_counts(mod: IRModule, function: str) -> Counter:
    """How many call_tir sites of each PrimFunc the Relax function `function` has (= calls per step)."""
    counts: Counter = Counter()
    if function not in [gv.name_hint for gv in mod.get_global_vars()]:
        return counts
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.visitor
    class _Visitor(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:  # noqa: N802 - TVM visitor hook name
            if call.op.same_as(call_tir) and isinstance(call.args[0], tvm.ir.GlobalVar):
                counts[call.args[0].name_hint] += 1
            for arg in call.args:
                self.visit_expr(arg)

    _Visitor().visit_expr(mod[function])
    return counts


def dynamic_vars(func: tirx.PrimFunc) -> list[tirx.Var]:
    """Shape variables of the PrimFunc's buffers (batch in decode, seq_len in prefill, ...)."""
    found: dict[str, tirx.Var] = {}
    for param in func.params:
        for dim in getattr(param, "shape", None) or []:
            for var in _vars_in(dim):
                found.setdefault(var.name, var)
    return list(found.values())


def _var_dtype(var: tirx.Var) -> str:
    return str(var.ty.dtype)  # tirx.Var.dtype only exists for buffer-typed vars in TVM 0.27


def _vars_in(expr) -> list[tirx.Var]:
    if isinstance(expr, tirx.IntImm):
        return []
    if isinstance(expr, tirx.Var):
        return [expr]
    return list(tirx.analysis.undefined_vars(expr))


def step_binding(func: tirx.PrimFunc, in_decode: bool, prefill_len: int) -> dict[str, int]:
    """Sizes for the dynamic shape variables: 1 for a decode kernel (one token, batch 1), else prefill_len."""
    value = 1 if in_decode else prefill_len
    return {v.name: value for v in dynamic_vars(func)}


def specialize(func: tirx.PrimFunc, binding: dict[str, int]) -> tirx.PrimFunc:
    """`func` with its named shape variables replaced by constants (MetaSchedule needs static shapes).

    TVM 0.27 specialises buffer params (their shape vars are not params): each dynamic buffer is mapped to a
    static one, which binds the variables everywhere."""
    if not binding:
        return func
    param_map, bound = {}, set()
    for param in func.params:
        shape = getattr(param, "shape", None)
        dynamic = [d for d in shape or [] if not isinstance(d, tirx.IntImm)]
        # Specialize needs the mapped buffer's dynamic dims to be bare vars (not `batch * 12`)
        if not dynamic or not all(isinstance(d, tirx.Var) for d in dynamic):
            continue
        if all(d.name in bound for d in dynamic):
            continue
        # same index dtype as the original dims (int64): Specialize compares the static dims structurally
        static = [
            tirx.IntImm(str(d.ty.dtype) if hasattr(d, "ty") else str(d.dtype), v)
            for d, v in zip(shape, _static_shape(shape, binding), strict=True)
        ]
        param_map[param] = tirx.decl_buffer(static, str(param.dtype), param.name)
        bound |= {d.name for d in dynamic}
    missing = {v.name for v in dynamic_vars(func)} - bound
    if missing:
        raise ValueError(f"cannot specialise shape vars {sorted(missing)}: no buffer has them as a plain dim")
    return func.specialize(param_map)


def _static_shape(shape, binding: dict[str, int]) -> list[int]:
    dims = []
    for dim in shape:
        if isinstance(dim, tirx.IntImm):
            dims.append(int(dim))
            continue
        analyzer = sym.Analyzer()
        for v in _vars_in(dim):
            analyzer.bind(v, tirx.IntImm(_var_dtype(v), binding.get(v.name, 1)))
        dims.append(int(analyzer.simplify(dim)))
    return dims


def as_workload(func: tirx.PrimFunc) -> IRModule:
    """The IRModule form MetaSchedule keys its database by (same normalisation as tune_tir)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    # a deep copy: a Schedule made on the workload edits its statements in place, and a static-shape kernel
    # (GPU decode: nothing to specialise) would otherwise share them with the model's own PrimFunc
    func = tvm.ir.load_json(tvm.ir.save_json(func))
    return _normalize_mod(
        func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func
    )


def func_hash(func: tirx.PrimFunc) -> str:
    """Structural hash of a PrimFunc (names of vars/buffers ignored), as hex."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(func, map_free_vars=True) & (2**64 - 1):016x}"
