"""Row-wise descending argsort for GPUs: a bitonic network over the vocabulary padded to a power of two, one
kernel launch per stage, every kernel a plain thread-bound elementwise loop.

Why not TVM's GPU sort (relax.op.argsort after DispatchSortScan): its merge stage binds blockIdx.z, which
TVM's WebGPU code generator rejects ("blockIdx.z is not supported in WebGPU") once a row is longer than one
block, i.e. for any real vocabulary; and its host-side loops and workspaces cannot be replayed by our kernel
launchers, so it could not be run on the GPU APIs available here either. Sorting 32064 probabilities takes
15 * 16 / 2 = 120 stages of cheap launches, small next to a decode step.

Order: larger value first, equal values by smaller index (a strict total order, so every launch is
deterministic and the result equals numpy's stable argsort of -probs). Padding entries hold the lowest
float32 and indices >= vocab, so they sort after every probability.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .logit_processor import max_threads


def padded_length(vocab: int) -> int:
    return max(2, 1 << (vocab - 1).bit_length())


def stages(vocab: int) -> list[tuple[int, int]]:
    """(j, k) of every compare-exchange stage: partners i ^ j, direction by bit k of the lower index."""
    n = padded_length(vocab)
    out, k = [], 2
    while k <= n:
        j = k // 2
        while j >= 1:
            out.append((j, k))
            j //= 2
        k *= 2
    return out


@memo_kernel
def _kernels(vocab: int, target: tvm.target.Target) -> tuple[tirx.PrimFunc, tirx.PrimFunc, tirx.PrimFunc]:
    n = padded_length(vocab)
    tx = min(max_threads(target), n)
    blocks = n // tx
    # opaque (op_pattern 8): FuseOps must not merge these scheduled kernels into others
    attrs = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}

    @T.prim_func(private=True, s_tir=True)
    def init(var_probs: T.handle, var_keys: T.handle, var_ids: T.handle):
        T.func_attr(attrs)
        b = T.int64()
        probs = T.match_buffer(var_probs, (b, vocab), "float32")
        keys = T.match_buffer(var_keys, (b, n), "float32")
        ids = T.match_buffer(var_ids, (b, n), "int32")
        for row in T.thread_binding(b, thread="blockIdx.y"):
            for bx in T.thread_binding(T.int64(blocks), thread="blockIdx.x"):
                for t in T.thread_binding(T.int64(tx), thread="threadIdx.x"):
                    with T.sblock("init"):
                        r = T.axis.spatial(b, row)
                        i = T.axis.spatial(T.int64(n), bx * T.int64(tx) + t)
                        keys[r, i] = T.if_then_else(i < T.int64(vocab), probs[r, i], T.min_value("float32"))
                        ids[r, i] = T.Cast("int32", i)

    @T.prim_func(private=True, s_tir=True)
    def stage(
        var_keys: T.handle,
        var_ids: T.handle,
        j: T.int64,
        k: T.int64,
        var_keys_out: T.handle,
        var_ids_out: T.handle,
    ):
        # scalars before the outputs: call_tir passes (inputs..., outputs...) and PrimValue args are inputs
        T.func_attr(attrs)
        b = T.int64()
        keys = T.match_buffer(var_keys, (b, n), "float32")
        ids = T.match_buffer(var_ids, (b, n), "int32")
        keys_out = T.match_buffer(var_keys_out, (b, n), "float32")
        ids_out = T.match_buffer(var_ids_out, (b, n), "int32")
        for row in T.thread_binding(b, thread="blockIdx.y"):
            for bx in T.thread_binding(T.int64(blocks), thread="blockIdx.x"):
                for t in T.thread_binding(T.int64(tx), thread="threadIdx.x"):
                    with T.sblock("exchange"):
                        r = T.axis.spatial(b, row)
                        i = T.axis.spatial(T.int64(n), bx * T.int64(tx) + t)
                        p = T.meta_var(T.bitwise_xor(i, j))
                        # self ranks before its partner: larger key, or equal key and smaller index
                        first = T.meta_var(
                            T.Or(
                                keys[r, i] > keys[r, p],
                                T.And(keys[r, i] == keys[r, p], ids[r, i] < ids[r, p]),
                            )
                        )
                        descending = T.meta_var(T.bitwise_and(T.min(i, p), k) == T.int64(0))
                        # the lower slot takes the first-ranked element in a descending run, the last in an
                        # ascending one; the upper slot the other
                        keep = T.meta_var((first == descending) == (i < p))
                        keys_out[r, i] = T.Select(keep, keys[r, i], keys[r, p])
                        ids_out[r, i] = T.Select(keep, ids[r, i], ids[r, p])

    @T.prim_func(private=True, s_tir=True)
    def take(var_keys: T.handle, var_ids: T.handle, var_values: T.handle, var_indices: T.handle):
        T.func_attr(attrs)
        b = T.int64()
        keys = T.match_buffer(var_keys, (b, n), "float32")
        ids = T.match_buffer(var_ids, (b, n), "int32")
        values = T.match_buffer(var_values, (b, vocab), "float32")
        indices = T.match_buffer(var_indices, (b, vocab), "int32")
        for row in T.thread_binding(b, thread="blockIdx.y"):
            for bx in T.thread_binding(T.int64(blocks), thread="blockIdx.x"):
                for t in T.thread_binding(T.int64(tx), thread="threadIdx.x"):
                    with T.sblock("take"):
                        r = T.axis.spatial(b, row)
                        i = T.axis.spatial(T.int64(vocab), bx * T.int64(tx) + t)
                        T.where(bx * T.int64(tx) + t < T.int64(vocab))
                        values[r, i] = keys[r, i]
                        indices[r, i] = ids[r, i]

    return init, stage, take


def emit_argsort(bb: relax.BlockBuilder, probs: relax.Expr, vocab: int, target: tvm.target.Target):
    """(sorted values f32[b, v], sorted indices i32[b, v]) of `probs` f32[b, v], descending; inside a
    dataflow block of `bb`."""
    init, stage, take = _kernels(vocab, target)
    rows = probs.ty.shape[0]
    n = padded_length(vocab)
    work = [relax.TensorType([rows, n], "float32"), relax.TensorType([rows, n], "int32")]
    out = [relax.TensorType([rows, vocab], "float32"), relax.TensorType([rows, vocab], "int32")]
    init_gv = bb.add_func(init, "bitonic_init")
    stage_gv = bb.add_func(stage, "bitonic_stage")
    take_gv = bb.add_func(take, "bitonic_take")
    pair = bb.emit(relax.call_tir(init_gv, [probs], out_ty=work))
    for j, k in stages(vocab):
        keys, ids = bb.emit(relax.TupleGetItem(pair, 0)), bb.emit(relax.TupleGetItem(pair, 1))
        scalars = [relax.prim_value(tirx.IntImm("int64", j)), relax.prim_value(tirx.IntImm("int64", k))]
        pair = bb.emit(relax.call_tir(stage_gv, [keys, ids, *scalars], out_ty=work))
    keys, ids = bb.emit(relax.TupleGetItem(pair, 0)), bb.emit(relax.TupleGetItem(pair, 1))
    result = bb.emit(relax.call_tir(take_gv, [keys, ids], out_ty=out))
    return bb.emit(relax.TupleGetItem(result, 0)), bb.emit(relax.TupleGetItem(result, 1))
