"""Our Relax pipeline: export + target passes -> graph passes -> fusion (incl. dequantize into matmul) ->
schedules -> VM lowering.

TVM's built-in "default" pipeline does no operator fusion on llvm, so we spell the phases out. The phases are
separate functions because `phi3 verify` compares every scheduled kernel against the same kernel unscheduled
(output of `lower_to_tir`).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import IRModule, relax

from ..config import Phi3Config
from ..model.phi3 import GraphOptions, export_phi3


def export_model(cfg: Phi3Config, opts: GraphOptions, target: tvm.target.Target, knobs=None):
    """-> (IRModule, [(param name, nn.Parameter)]): the model's graph as every build starts from it, the
    exported graph after the target's module passes. llvm: TVM's CPU attention kernels are scalar and
    single-threaded, so ours replace them (compile/host_attention.py), sized by `knobs`
    (compile/knobs.Knobs; None: the kernels' defaults). GPUs with `opts.gpu_decode_attention`: our decode
    attention kernel replaces TVM's (compile/gpu_attention.py)."""
    mod, named_params = export_phi3(cfg, opts, target)
    if target.kind.name == "llvm":
        from .host_attention import host_attention

        mod = host_attention(cfg, knobs)(mod)
    elif opts.gpu_decode_attention:
        from .gpu_attention import GPUDecodeAttention

        mod = GPUDecodeAttention(target)(mod)
    return mod, named_params


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


def finalize(
    mod: IRModule, target: tvm.target.Target, cuda_graph: bool = False, timeline: bool = False
) -> IRModule:
    """Relax VM lowering after scheduling (`cuda_graph`: see compile/attach_cuda_graph.py; `timeline`:
    compile/kernel_timeline.py), with the host kernels' small-work loops made serial at run time
    (compile/cpu_parallel_guard.py)."""
    from .attach_cuda_graph import rewrite
    from .cpu_parallel_guard import guard_small_parallel_loops
    from .kernel_timeline import insert_ticks

    seq = tvm.transform.Sequential(
        [
            relax.transform.RewriteDataflowReshape(),
            # after the reshape rewrite: a kernel whose loop it splits is no longer seen as a view
            tvm.transform.module_pass(lambda m, _c: guard_small_parallel_loops(m), 0, "phi3_parallel_guard"),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            tvm.transform.module_pass(lambda m, _c: insert_ticks(m), 0, "phi3_timeline")
            if timeline
            else tvm.transform.Sequential([]),
            tvm.transform.module_pass(lambda m, _c: rewrite(m), 0, "phi3_cuda_graph")
            if cuda_graph
            else tvm.transform.Sequential([]),
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


def with_symbol_prefix(mod: IRModule, prefix: str) -> IRModule:
    """Every kernel renamed `<prefix><name>` (its C symbol and the name the VM calls it by), and the prefix
    recorded for codegen, which names the system library after it, so one app can link several models.
    Done after AttachGlobalSymbol instead of through its own prefix option, whose call-site rewrite breaks
    on Metal's simdgroup kernels in TVM 0.27 (TypeError on `T.type_annotation`)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    bb = relax.BlockBuilder()
    renamed = {}  # old GlobalVar -> new one, typed by the BlockBuilder
    for gv, f in mod.functions.items():
        if not isinstance(f, relax.Function):
            name = gv.name_hint if gv.name_hint.startswith(prefix) else prefix + gv.name_hint
            f = f.with_attr("global_symbol", name) if isinstance(f, tvm.tirx.PrimFunc) else f
            renamed[gv] = bb.add_func(f, name)

    @mutator
    class _Rename(PyExprMutator):
        def visit_global_var_(self, op: tvm.ir.GlobalVar) -> relax.Expr:
            return renamed.get(op, op)

    rename = _Rename(bb.get())
    out = bb.get()
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            out[gv] = rename.visit_expr(f)
    return IRModule(dict(out.functions.items()), attrs=mod.attrs).with_attr("system_lib_prefix", prefix)


def build(
    mod: IRModule,
    target: tvm.target.Target,
    schedule: Callable[[IRModule], IRModule],
    *,
    system_lib: bool = False,
    system_lib_prefix: str = "",
    attach: Callable[[IRModule], IRModule] | None = None,
    cuda_graph: bool = False,
    timeline: bool = False,
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

    @tvm.transform.module_pass(opt_level=0, name="phi3_finalize")
    def _finalize(m: IRModule, _ctx) -> IRModule:
        m = finalize(m, target, cuda_graph, timeline)
        return with_symbol_prefix(m, system_lib_prefix) if system_lib and system_lib_prefix else m

    # OpenCL: built with TIR CSE, the wheel's ragged-prefill attention kernel computed a wrong output on PoCL
    # for the tiny MHA models (head_dim 32; without CSE it was head_dim 16 instead). Both are one PoCL 3.1
    # miscompile of a work-item value carried over a barrier (model/kv_kernels.py
    # `prefill_ragged_for_opencl`), which the kernel we now build avoids with and without CSE (measured on
    # the bare kernel); CSE stays off as only that setting is checked on whole models. `phi3 verify` checks
    # the kernel through the runtime. OpenCL compilers do their own CSE.
    config = {"tirx.disable_cse_tir": True} if target.kind.name == "opencl" else {}
    with tvm.transform.PassContext(config=config):
        if target.kind.name == "llvm" and not system_lib:
            from .parallel_codegen import build_vm

            ex = build_vm(scheduled, target, _finalize)
        else:
            ex = relax.build(scheduled, target, relax_pipeline=_finalize, system_lib=system_lib)
    return ex, scheduled
