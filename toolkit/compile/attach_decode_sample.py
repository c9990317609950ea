"""One library call per decode step on the device: `decode_and_sample` and `batch_decode_and_sample` run
`embed`, the forward and `sample_tokens` as one Relax function.

The engine's device-sampling step is otherwise three VM calls (embed, decode, sample_tokens), each a trip
through Python and the VM's interpreter while the GPU waits on the host. The fused functions are the
scheduled functions' bodies one after the other, so they launch the same kernels and add none; memory
planning and the CUDA-graph rewrite (attach_cuda_graph.py) then see the whole step as one function. Token
ids and the sampler's params (attach_sampling.py's rows) go in, the drawn ids come out.
"""

from __future__ import annotations

from tvm import IRModule, relax, tirx

from .attach_sampling import F32, I32
from .sampling_cut import PARAM_ROWS

# fused function -> the forward it runs (model/phi3.py's spec); the engine looks them up by these names
# (runtime/device_sampling.FUSED_STEPS). The batched one's CUDA graphs are keyed by its batch size
# (attach_cuda_graph.CAPTURE_VARS)
FUSED = {"decode_and_sample": "decode", "batch_decode_and_sample": "batch_decode"}
_PARTS = ("embed", "sample_tokens")


def attach_decode_sample(mod: IRModule) -> IRModule:
    """`mod` plus a fused function for each of decode / batch_decode, where the module has `embed` and
    `sample_tokens` (GPU presets; host builds with the sampler). Run on the scheduled module."""
    names = {gv.name_hint for gv in mod.get_global_vars()}
    todo = {f: fwd for f, fwd in FUSED.items() if fwd in names and all(p in names for p in _PARTS)}
    if not todo:
        return mod
    bb = relax.BlockBuilder(mod)
    for name, fwd in todo.items():
        _fused(bb, name, mod["embed"], mod[fwd], mod["sample_tokens"])
    return bb.finalize()


def _fused(bb: relax.BlockBuilder, name: str, embed, forward, sampler) -> None:
    """name(input_ids i32[b], paged_kv_cache, params f32[5, b], packed_params) -> (ids i32[b], cache):
    forward(embed(input_ids) as [b, 1, h]) with its logits drawn from by sample_tokens."""
    embeds, cache, weights = forward.params
    batch, one, hidden = embeds.ty.shape
    b = batch if isinstance(batch, tirx.IntImm) else tirx.Var("batch_size", "int64")
    ids = relax.Var("input_ids", relax.TensorType([b], I32))
    params = relax.Var("params", relax.TensorType([PARAM_ROWS, b], F32))
    kv = relax.Var(cache.name, cache.ty)
    packed = relax.Var(weights.name, weights.ty)
    # runtime inputs first, the weights last (what `num_input` counts, as on the forwards)
    with bb.function(name, [ids, kv, params, packed], attrs={"num_input": 3}):
        with bb.dataflow():
            flat = _inline(bb, embed, [ids, packed])
            emb = bb.emit(relax.op.reshape(flat, relax.ShapeExpr([b, one, hidden])))
            out = _inline(bb, forward, [emb, kv, packed])
            logits, new_kv = bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))
            tokens = _inline(bb, sampler, [logits, params])
            res = bb.emit_output(relax.Tuple([tokens, new_kv]))
        bb.emit_func_output(res)


def _inline(bb: relax.BlockBuilder, func: relax.Function, args: list[relax.Expr]) -> relax.Expr:
    """func's body emitted into bb's dataflow block with its params bound to `args` (and its symbolic
    sizes to theirs) -> its result. TVM's InlinePrivateFunctions binds the params without matching shapes,
    which leaves a callee's symbolic sizes undefined in the caller."""
    func = relax.utils.copy_with_new_vars(func)  # fresh vars: embed's body goes into both fused functions
    body = func.bind_params(dict(zip(func.params, args))).body
    for block in body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            name = func.attrs["global_symbol"]
            raise ValueError(f"{name}: a binding block outside dataflow can't be inlined")
        for binding in block.bindings:
            bb.emit_normalized(binding)
    return body.body
