"""CUDA graphs for the forward functions: what TVM's RewriteCUDAGraph needs, and MLC's init hook.

RewriteCUDAGraph lifts the static allocations of a Relax function and replaces each run of kernel launches
between two calls it can't capture (here: the KV cache's attention builtins, one per layer) by
`vm.builtin.cuda_graph.run_or_capture`: the first call per captured shape records a graph, later calls
replay it, so a decode step is (layers + 1) graph launches instead of hundreds of kernel launches from the
VM's interpreter. It needs every symbolic size bounded (`tir_var_upper_bound`, planned at the bound) and
the sizes a graph is keyed by (`relax.rewrite_cuda_graph.capture_symbolic_vars`): one graph per batch size
for decode, as MLC's compile does. `cuda_graph_alloc_init` is what MLC's engine calls once at load
(cpp/serve/function_table.cc) to allocate the lifted buffers up front.
"""

from __future__ import annotations

import tvm
from tvm import IRModule, relax

# the forward functions whose graphs are keyed by these sizes (names from model/phi3.py's spec and
# attach_decode_sample.py)
CAPTURE_VARS = {
    "decode": ["batch_size"],
    "batch_decode": ["batch_size"],
    "batch_verify": ["seq_len"],
    "batch_decode_and_sample": ["batch_size"],  # attach_decode_sample.py's
}
INIT_FUNC = "cuda_graph_alloc_init"


def with_capture_hints(mod: IRModule, bounds: dict[str, int]) -> IRModule:
    """Every Relax function bounded by `bounds`; the forward functions keyed by their batch / length."""
    out = {}
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            f = f.with_attr("tir_var_upper_bound", bounds)
            defined = {v.name for v in relax.analysis.defined_symbolic_vars(f)}
            keys = [v for v in CAPTURE_VARS.get(gv.name_hint, []) if v in defined]  # GPU decode is static
            if keys:
                f = f.with_attr("relax.rewrite_cuda_graph.capture_symbolic_vars", keys)
        out[gv] = f
    return IRModule(out, attrs=mod.attrs)


def attach_alloc_init(mod: IRModule) -> IRModule:
    """Add `cuda_graph_alloc_init()`: runs RewriteCUDAGraph's allocation function once and caches it."""
    alloc = [gv for gv, _ in mod.functions_items() if gv.name_hint.startswith("cuda_graph_alloc")]
    if not alloc:
        return mod
    bb = relax.BlockBuilder(mod)
    with bb.function(INIT_FUNC, []):
        bb.emit_func_output(
            relax.op.call_builtin_with_ctx(
                "vm.builtin.cuda_graph.get_cached_alloc",
                args=[alloc[0], relax.prim_value(0)],
                ty_args=relax.ObjectType(),
            )
        )
    return bb.finalize()


def rewrite(mod: IRModule) -> IRModule:
    """The rewrite itself (after memory planning), under the config switch TVM reads."""
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        return attach_alloc_init(relax.transform.RewriteCUDAGraph()(mod))
