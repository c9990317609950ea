"""Running sums along each row of a [b, v] float32 tensor (inclusive, or of the elements before each), for
the GPU sampler's draws and top-p cuts.

Not TVM's GPU scan (relax.op.cumsum after DispatchSortScan): its in-block step adds a neighbour's
shared-memory entry while that neighbour rewrites it, with no barrier between, so it is right only where 32
threads run in lockstep (NVIDIA warps); it gave wrong sums on lavapipe and PoCL. Nor the sums as TE
reductions scheduled by dlight: at a real vocabulary dlight staged a whole row in shared memory (203520 bytes
at SmolLM2's 49152), past every preset's limit.

GPU: one block per row; thread t sums its contiguous run of the row, the runs' totals meet in shared memory
(one barrier), and each thread adds the totals of the runs before its own, then walks its run again writing
the sums. Shared memory: one float per thread. llvm: a serial walk per row.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .logit_processor import max_threads

_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: never fused


def prefix_sum(vocab: int, target: tvm.target.Target, exclusive: bool = False) -> tirx.PrimFunc:
    """kernel(x f32[b, v], out f32[b, v]): out[r, i] = x[r, 0] + ... + x[r, i] (up to i - 1 if exclusive)."""
    if target.kind.name in ("llvm", "c"):
        return _serial(vocab, exclusive)
    return _blocked(vocab, max_threads(target), exclusive)


@memo_kernel
def _blocked(v: int, tx_n: int, exclusive: bool) -> tirx.PrimFunc:
    run = (v + tx_n - 1) // tx_n
    own = not exclusive  # inclusive sums count the element itself

    # a root block around the launch: Relax's reshape detection (RewriteDataflowReshape) inspects every
    # one-input call_tir callee and requires one
    @T.prim_func(private=True, s_tir=True)
    def scan(var_x: T.handle, var_out: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        x = T.match_buffer(var_x, (b, v), "float32")
        out = T.match_buffer(var_out, (b, v), "float32")
        with T.sblock("root"):
            T.reads(x[0:b, 0:v])
            T.writes(out[0:b, 0:v])
            totals = T.sblock_alloc_buffer((tx_n,), "float32", scope="shared")
            acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
            for row in T.thread_binding(b, thread="blockIdx.x"):
                for tx in T.thread_binding(tx_n, thread="threadIdx.x"):
                    acc[0] = T.float32(0)
                    for i in range(run):
                        if tx * run + i < v:
                            acc[0] = acc[0] + x[row, tx * run + i]
                    totals[tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    acc[0] = T.float32(0)
                    for t in range(tx_n):
                        acc[0] = acc[0] + T.Select(t < tx, totals[t], T.float32(0))
                    for i in range(run):
                        if tx * run + i < v:
                            value = x[row, tx * run + i]
                            out[row, tx * run + i] = T.Select(T.bool(own), acc[0] + value, acc[0])
                            acc[0] = acc[0] + value

    return scan


@memo_kernel
def _serial(v: int, exclusive: bool) -> tirx.PrimFunc:
    own = not exclusive

    @T.prim_func(private=True, s_tir=True)
    def scan(var_x: T.handle, var_out: T.handle):
        T.func_attr(_ATTRS)
        b = T.int64()
        x = T.match_buffer(var_x, (b, v), "float32")
        out = T.match_buffer(var_out, (b, v), "float32")
        with T.sblock("root"):
            T.reads(x[0:b, 0:v])
            T.writes(out[0:b, 0:v])
            acc = T.sblock_alloc_buffer((1,), "float32")
            for row in range(b):
                acc[0] = T.float32(0)
                for i in range(v):
                    out[row, i] = T.Select(T.bool(own), acc[0] + x[row, i], acc[0])
                    acc[0] = acc[0] + x[row, i]

    return scan
