"""Relax pass: fuse each q4 `dequantize` PrimFunc into the matmul that consumes it (plus its epilogue).

TVM's FuseOps never puts an injective producer (dequantize) and a reduction (matmul) into one group, so after
LegalizeOps/FuseOps/FuseTIR a q4 Linear is two kernels with a dequantized weight tensor in between (measured,
shared/notes/tvm-0.27-facts.md §2). This pass (run after FuseTIR) matches
    w = call_tir(<dequantize PrimFunc>, (q_weight, q_scale, ...))
    y = call_tir(<matmul PrimFunc>, (x, w, *epilogue_args))
with FuseOpsByPattern and runs FuseTIR again: one PrimFunc holds the dequantize block, the matmul and its
epilogue (e.g. the residual add), and the weight is only ever read packed. The dequantize block still
exists inside the PrimFunc; GPU dlight rules (GEMV / Matmul) and the CPU GEMV rule inline it.

PrimFuncs are recognised by their blocks, not by names: a "dequantize" PrimFunc has only spatial blocks, one
of them named "dequantize" (the TE op in toolkit/quantization/tvm_layers.py, possibly fused with a transpose);
a "matmul" PrimFunc has a reduction block whose name contains "matmul" (LegalizeOps' matmul / NT_matmul).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

DEQUANT_BLOCK = "dequantize"
# q_weight, q_scale (+ a min, or a K-quant's high bits / sub-block scales / min); epilogue inputs such as a
# residual
_MAX_DEQUANT_ARGS = 5
_MAX_EPILOGUE_ARGS = 3


def _blocks(func: tirx.PrimFunc) -> list[tuple[str, bool]]:
    """(name, is_reduction) of the top-level blocks of a PrimFunc (none for a hand-written kernel, which
    has no block structure: the host attention kernels)."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return []
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    try:
        root = sch.get_sblock("root")
    except s_tir.ScheduleError:  # IR-builder kernels (TVM's GPU sort/scan) have no block structure either
        return []
    out = []
    for rv in sch.get_child_blocks(root):
        block = sch.get(rv)
        out.append((block.name_hint, any(int(iv.iter_type) == 2 for iv in block.iter_vars)))  # 2 = CommReduce
    return out


def _is_dequantize(func: tirx.PrimFunc) -> bool:
    blocks = _blocks(func)
    return any(name == DEQUANT_BLOCK for name, _ in blocks) and not any(red for _, red in blocks)


def _is_matmul(func: tirx.PrimFunc) -> bool:
    blocks = _blocks(func)
    return any(red and "matmul" in name for name, red in blocks) and not any(
        name == DEQUANT_BLOCK for name, _ in blocks
    )


def _pattern(n_dequant_args: int, n_epilogue_args: int, dequant_gvs: set[str], matmul_gvs: set[str]):
    x = wildcard()
    w = is_op("relax.call_tir")(
        GlobalVarPattern(), TuplePattern([wildcard() for _ in range(n_dequant_args)]), add_constraint=False
    )
    matmul = is_op("relax.call_tir")(
        GlobalVarPattern(),
        TuplePattern([x, w] + [wildcard() for _ in range(n_epilogue_args)]),
        add_constraint=False,
    )

    def _callee(expr) -> str | None:
        if isinstance(expr, relax.Call) and isinstance(expr.args[0], relax.GlobalVar):
            return expr.args[0].name_hint
        return None

    def check(ctx: relax.transform.PatternCheckContext) -> bool:
        return (
            _callee(ctx.annotated_expr["w"]) in dequant_gvs
            and _callee(ctx.annotated_expr["matmul"]) in matmul_gvs
        )

    return matmul, {"x": x, "w": w, "matmul": matmul}, check


def _arg_counts(mod: tvm.IRModule, dequant_gvs: set[str], matmul_gvs: set[str]) -> tuple[set[int], set[int]]:
    """The argument counts of the dequantize calls and the epilogue-argument counts of the matmul calls
    that occur in the module's Relax functions, within the limits the patterns cover."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    n_dequant: set[int] = set()
    n_epilogue: set[int] = set()

    for _gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        for block in func.body.blocks:  # normalized Relax: every call is a binding's value
            for binding in block.bindings:
                call = binding.value
                if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)):
                    continue
                callee, args = call.args[0], call.args[1]
                if not isinstance(callee, relax.GlobalVar) or not isinstance(args, relax.Tuple):
                    continue
                if callee.name_hint in dequant_gvs and len(args.fields) <= _MAX_DEQUANT_ARGS:
                    n_dequant.add(len(args.fields))
                elif callee.name_hint in matmul_gvs and 2 <= len(args.fields) <= 2 + _MAX_EPILOGUE_ARGS:
                    n_epilogue.add(len(args.fields) - 2)
    return n_dequant, n_epilogue


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """Fuse call_tir(dequantize) -> call_tir(matmul [+ epilogue]) into one PrimFunc. Run after FuseTIR."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        dequant_gvs, matmul_gvs = set(), set()
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                if _is_dequantize(func):
                    dequant_gvs.add(gv.name_hint)
                elif _is_matmul(func):
                    matmul_gvs.add(gv.name_hint)
        if not dequant_gvs or not matmul_gvs:
            return mod
        n_dequant, n_epilogue = _arg_counts(mod, dequant_gvs, matmul_gvs)
        if not n_dequant or not n_epilogue:
            return mod
        # only the arities the graph holds (the patterns are exclusive: a tuple pattern has one length)
        patterns = [
            ("dequantize_matmul", *_pattern(n_args, n_epi, dequant_gvs, matmul_gvs))
            for n_args in sorted(n_dequant)
            for n_epi in sorted(n_epilogue)
        ]
        return tvm.transform.Sequential(
            [relax.transform.FuseOpsByPattern(patterns), relax.transform.FuseTIR()]
        )(mod)


def fused_dequant_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs that hold both a dequantize block and a matmul reduction (for tests/reports)."""
    names = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            blocks = _blocks(func)
            if any(n == DEQUANT_BLOCK for n, _ in blocks) and any(red and "matmul" in n for n, red in blocks):
                names.append(gv.name_hint)
    return sorted(names)


def unfused_dequant_kernels(mod: tvm.IRModule) -> list[str]:
    """PrimFuncs that dequantize and are still called on their own (their output is a full weight tensor)."""
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and _is_dequantize(func)
    )
