"""GPU pass: a matmul whose row count is a symbolic batch gets a GEMV schedule for small batches.

dlight's Matmul rule claims any matmul with a symbolic row count and tiles it 128 rows at a time, so a batch
of one or two sequences (batch_decode, batch_verify of a short draft) runs a GEMM kernel that computes 127 of
every 128 rows for nothing, and GEMV-shaped work never reaches the GEMV rules. Here each such PrimFunc
becomes one kernel body per batch range: `n <= limit` runs dlight's LowBatchGEMV scheduled for that range's
bucket, anything larger runs the preset's other rules (Matmul). The branch condition is marked thread
invariant so the launch hoists it, as MLC-LLM does for the same reason (compiler_pass/low_batch_specialization
.py at mlc-ai/mlc-llm 79d603f0).
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
import tvm_ffi
from tvm import IRModule, s_tir, tirx
from tvm.s_tir import dlight as dl

from .gpu_schedule import _declining, has_thread_binding


def _schedule(func: tirx.PrimFunc, rules: Sequence) -> tirx.PrimFunc:
    return dl.ApplyDefaultSchedule(*rules)(IRModule({"main": func}))["main"]


def _single_symbolic_var(func: tirx.PrimFunc) -> tirx.Var | None:
    """The one variable in the shapes of the PrimFunc's buffer parameters, or None (static, or several)."""
    found = set()
    for p in func.params:
        try:
            shape = p.shape  # buffer parameters are Vars of BufferType here
        except AttributeError:
            continue
        found.update(e for e in shape if isinstance(e, tirx.Var))
    return next(iter(found)) if len(found) == 1 else None


def low_batch_dispatch(ranges: Sequence[tuple[int, int]], large_rules: Sequence) -> tvm.transform.Pass:
    """Module pass (under the target): PrimFuncs LowBatchGEMV schedules and whose buffers have exactly one
    symbolic size get `if n <= limit: LowBatchGEMV(bucket) ... else: large_rules`, for `ranges` =
    [(limit, bucket), ...] in increasing limit. Kernels either side fails to bind to GPU threads keep
    going to the ordinary rules."""
    ranges = sorted(ranges)

    @tvm.transform.module_pass(opt_level=0, name="LowBatchGEMVDispatch")
    def _pass(mod: IRModule, _ctx) -> IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
                continue
            n = _single_symbolic_var(func)
            if n is None:
                continue
            smalls = [_schedule(func, [_declining(dl.gpu.LowBatchGEMV(bucket))]) for _, bucket in ranges]
            if any(tvm_ffi.structural_equal(s, func) or not has_thread_binding(s) for s in smalls):
                continue  # not GEMV-shaped (LowBatchGEMV left it alone)
            large = _schedule(func, large_rules)
            if not has_thread_binding(large):
                continue
            body = large.body
            for (limit, _), small in reversed(list(zip(ranges, smalls, strict=True))):
                cond = tirx.op.tvm_thread_invariant(n <= limit)
                body = tirx.IfThenElse(cond, small.body, body)
            body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
            new = func.with_body(body).with_attr("tirx.is_scheduled", True)
            out[gv] = new.with_attr("tirx.HoistIfThenElseExprWithBlock", 1)
        return out

    return _pass
