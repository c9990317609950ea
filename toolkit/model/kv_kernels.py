"""GPU attention-merge kernel for TVM's paged KV cache, without the data race of the wheel's own.

apache-tvm 0.27's `_merge_state_inplace` (tvm/relax/frontend/nn/llm/_decode_kernels.py) merges two partial
attention results in place: each of the head_dim / VEC threads of a head reads S[n, h], merges its slice of
V and then writes the new S[n, h], with no barrier between the reads and the write. On a GPU the threads of a
head usually sit in one warp and all read before any writes, so it works by luck; where work-items of a
group run one after another (PoCL's CPU device, measured: max |ΔV| 1.9, |ΔS| 2.7 on random states) a
later thread reads the already-merged S and scales its slice wrongly. The cache calls this kernel for
prefill over cached pages (chunked prefill), so the whole model goes wrong there.

This kernel is the same computation with the race removed: every thread reads S, a barrier, then only
thread 0 of the head writes S. `install()` makes TIRPagedKVCache use it for every GPU target.

`install()` also wraps the wheel's ragged-prefill attention kernel for OpenCL (`prefill_ragged_for_opencl`):
PoCL 3.1 (Debian's CPU OpenCL) miscompiles it when head_dim is 16, and dropping one barrier that the kernel
does not need avoids that; see the function's docstring.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache as _kv_cache
from tvm.script import tirx as T
from tvm.target import Target

from ..tvm_compat import memo_kv_cache_kernels

_ORIGINAL = _kv_cache._merge_state_inplace
_ORIGINAL_PREFILL_RAGGED = _kv_cache._attention_prefill_ragged


def merge_state_inplace(num_heads: int, head_dim: int, v_dtype: str, target: Target, global_symbol=None):
    """Drop-in for kv_cache._merge_state_inplace (same signature, launch shape and arguments)."""
    vec = min(max(8 // 2, head_dim // 32), 4)  # the wheel's vector width (it assumes 2-byte V)
    bdx = head_dim // vec
    bdy = num_heads
    limit = int(target.attrs.get("max_num_threads", target.attrs.get("max_threads_per_block", 256)))
    while bdx * bdy > limit and bdy > 1:
        bdy //= 2
    gdy = num_heads // bdy

    @T.prim_func(s_tir=True)
    def merge_state_inplace(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        N = T.int32()
        H = T.int32()
        D = T.int32()
        V = T.match_buffer(v, (N, H, D), v_dtype)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, D), v_dtype)
        S_other = T.match_buffer(s_other, (N, H), "float32")
        for bx in T.thread_binding(N, thread="blockIdx.x"):
            for by in T.thread_binding(gdy, thread="blockIdx.y"):
                for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                    for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                        with T.sblock("merge"):
                            s_val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            s_other_val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            s_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            v_vec = T.sblock_alloc_buffer((vec,), v_dtype, scope="local")
                            v_other_vec = T.sblock_alloc_buffer((vec,), v_dtype, scope="local")
                            s_val[0] = S[bx, ty + by * bdy]
                            s_other_val[0] = S_other[bx, ty + by * bdy]
                            s_max[0] = T.max(s_val[0], s_other_val[0])
                            s_val[0] = T.exp2(s_val[0] - s_max[0])
                            s_other_val[0] = T.exp2(s_other_val[0] - s_max[0])
                            for i in T.vectorized(vec):
                                v_vec[i] = V[bx, ty + by * bdy, tx * vec + i]
                            for i in T.vectorized(vec):
                                v_other_vec[i] = V_other[bx, ty + by * bdy, tx * vec + i]
                            for i in T.serial(vec):
                                v_vec[i] = (v_vec[i] * s_val[0] + v_other_vec[i] * s_other_val[0]) / (
                                    s_val[0] + s_other_val[0]
                                )
                            for i in T.vectorized(vec):
                                V[bx, ty + by * bdy, tx * vec + i] = v_vec[i]
                            # every thread of the head has read S[bx, h] before any thread writes it
                            T.tvm_storage_sync("shared")
                            if tx == 0:
                                S[bx, ty + by * bdy] = T.log2(s_val[0] + s_other_val[0]) + s_max[0]

    func = merge_state_inplace
    return func.with_attr("global_symbol", global_symbol) if global_symbol else func


def drop_barrier_between_kv_loads(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` (the wheel's scheduled ragged-prefill kernel) without the barrier between its K and V loads.

    That barrier orders nothing: K_load writes only K_smem and V_load only V_smem, neither reads shared
    memory, and the barrier after V_load (before S = Q K^T reads K_smem) stays, as does the one ThreadSync
    puts before K_load for the previous tile's readers. Raises if the kernel no longer has that shape."""
    import tvm.s_tir as s_tir

    sch = s_tir.Schedule(func)
    k_loops, v_loops = (sch.get_loops(sch.get_sblock(b)) for b in ("K_load", "V_load"))
    kv_loop = k_loops[0]  # the loop over KV tiles; both loads sit directly in its body
    if not (sch.get(v_loops[0]).same_as(sch.get(kv_loop)) and len(k_loops) > 1 and len(v_loops) > 1):
        raise ValueError("ragged prefill: K_load and V_load are not in one KV-tile loop")
    loop = sch.get(kv_loop)
    seq = list(loop.body.seq) if isinstance(loop.body, tirx.SeqStmt) else []
    k_nest, v_nest = sch.get(k_loops[1]), sch.get(v_loops[1])
    at = [i for i in range(1, len(seq) - 1) if seq[i - 1].same_as(k_nest) and seq[i + 1].same_as(v_nest)]
    if len(at) != 1 or not _is_storage_sync(seq[at[0]]):
        raise ValueError("ragged prefill: no single barrier between K_load and V_load")
    del seq[at[0]]
    new_loop = tirx.For(
        loop.loop_var,
        loop.min,
        loop.extent,
        loop.kind,
        tirx.SeqStmt(seq),
        loop.thread_binding,
        loop.annotations,
    )
    sch.state.replace(sch.get_sref(kv_loop), new_loop)
    return sch.mod["main"]


def _is_storage_sync(stmt: tirx.Stmt) -> bool:
    return (
        isinstance(stmt, tirx.Evaluate)
        and isinstance(stmt.value, tvm.ir.Call)
        and stmt.value.op.same_as(tvm.ir.Op.get("tirx.tvm_storage_sync"))
    )


def prefill_ragged_for_opencl(h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target: Target):
    """Drop-in for kv_cache._attention_prefill_ragged (same signature): the wheel's kernel, and for OpenCL
    targets the same kernel without the barrier between its K and V tile loads.

    Why: with head_dim 16 (tiny GQA/MHA models) each work-item loads exactly one K and one V vector, both
    guarded by the same bound `L_kv_start + i < kv_chunk_len` with a barrier between them. PoCL 3.1's
    kernel compiler first lets LLVM merge the two identical comparisons (legal: a barrier does not change
    private values), so the V-load branch, right after that barrier, uses the comparison computed before
    it. Its work-item loops then carry that per-work-item value over the barrier as the last work-item's
    value (an LCSSA phi, no per-work-item context slot), so every work-item of the group takes the last
    one's branch: all V rows of a partly filled KV tile become zero and the output is wrong (measured max
    |error| 2.7 on random inputs; right with -cl-opt-disable or POCL_WORK_GROUP_METHOD=workitemrepl). Without
    the barrier both loads are in one parallel region and the shared comparison never crosses a barrier.
    The barrier is redundant on every device, so GPUs lose nothing; other targets keep the wheel's kernel."""
    func = _ORIGINAL_PREFILL_RAGGED(h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target)
    if target.kind.name != "opencl":
        return func
    return drop_barrier_between_kv_loads(func)


def install() -> None:
    """Route TIRPagedKVCache's GPU merge kernel to ours (idempotent; CPU targets keep their serial one), and
    its ragged-prefill kernel through `prefill_ragged_for_opencl`; then every kernel builder of the cache
    through the in-process memo (tvm_compat.memo_kv_cache_kernels)."""
    _kv_cache._merge_state_inplace = merge_state_inplace
    _kv_cache._attention_prefill_ragged = prefill_ragged_for_opencl
    memo_kv_cache_kernels()
