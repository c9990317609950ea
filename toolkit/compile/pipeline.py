"""Our Relax pipeline: graph passes -> fusion (incl. dequantize into matmul) -> schedules -> VM lowering.

TVM's built-in "default" pipeline does no operator fusion on llvm, so we spell the phases out. The phases are
separate functions because `phi3 verify` compares every scheduled kernel against the same kernel unscheduled
(output of `lower_to_tir`).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import IRModule, relax


def lower_to_tir(mod: IRModule, target: tvm.target.Target) -> IRModule:
    """Graph-level passes and fusion; every compute is a PrimFunc afterwards, none scheduled yet."""
    from .fuse_dequant import FuseDequantizeMatmul

    seq = tvm.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            FuseDequantizeMatmul(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    with target:
        return seq(mod)


def finalize(mod: IRModule, target: tvm.target.Target) -> IRModule:
    """Relax VM lowering after scheduling."""
    seq = tvm.transform.Sequential(
        [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
    )
    with target:
        return seq(mod)


def build(
    mod: IRModule,
    target: tvm.target.Target,
    schedule: Callable[[IRModule], IRModule],
    *,
    system_lib: bool = False,
    system_lib_prefix: str = "",
    attach: Callable[[IRModule], IRModule] | None = None,
) -> tuple[relax.VMExecutable, IRModule]:
    """Full pipeline: lower, schedule (target-specific callable), `attach` (e.g. the `_metadata` function,
    which reads the scheduled module), finalize, codegen. A system library's symbols carry
    `system_lib_prefix`, so that one app can link several models.

    Returns the executable and the scheduled module (for the manifest's kernel table)."""
    lowered = lower_to_tir(mod, target)
    with target:
        scheduled = schedule(lowered)
    if attach is not None:
        scheduled = attach(scheduled)
    if system_lib:
        scheduled = scheduled.with_attr("system_lib_prefix", system_lib_prefix)

    @tvm.transform.module_pass(opt_level=0, name="phi3_finalize")
    def _finalize(m: IRModule, _ctx) -> IRModule:
        return finalize(m, target)

    return relax.build(scheduled, target, relax_pipeline=_finalize, system_lib=system_lib), scheduled
