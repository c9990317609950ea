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
"""

from __future__ import annotations

from tvm.relax.frontend.nn.llm import kv_cache as _kv_cache
from tvm.script import tirx as T
from tvm.target import Target

_ORIGINAL = _kv_cache._merge_state_inplace


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


def install() -> None:
    """Route TIRPagedKVCache's GPU merge kernel to ours (idempotent; CPU targets keep their serial one)."""
    _kv_cache._merge_state_inplace = merge_state_inplace
