"""The paged KV cache's two copy kernels for the host CPU, replacing TVM's scalar ones (the swap:
compile/host_attention.py): the split of the fused qkv rows into q, k and v (`fused_rope`), and the append
of k and v into the cache pages (`tir_kv_cache_transpose_append`).

TVM's kernels copy one element at a time: the split evaluates its rotary branch per element (the runtime
flag that switches it off is tested inside the loop) and the append tests the position map per element.
Ours copy whole head rows as vectors, on one thread (a prefill chunk is a few hundred KB; a thread launch
would cost more than the copy in decode). Same parameters and results; the split asserts the rotary flag
is off (our model applies RoPE before the cache, as the attention kernels assume)."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel

NO_ROPE = "the host KV-cache kernels expect rope applied before the cache (apply_rope 0)"


@memo_kernel
def split_qkv_cpu(h_qo: int, h_kv: int, d: int, dtype: str) -> tirx.PrimFunc:
    """TVM's `fused_rope` (position_embedding) with its rotary part off: qkv [n, H_qo + 2 H_kv, d] -> q, k,
    v."""
    heads = h_qo + 2 * h_kv

    # fmt: off
    @T.prim_func(private=True)
    def kernel(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
               var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, heads, d), dtype)
        T.match_buffer(var_position_map, (seq_len,), "int32", offset_factor=1)
        q = T.match_buffer(var_q, (seq_len, h_qo, d), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, d), dtype)
        assert apply_rope == T.int64(0), NO_ROPE
        for s in range(seq_len):
            for h in range(h_qo):
                for j in T.vectorized(d):
                    q[s, h, j] = qkv[s, h, j]
            for h in range(h_kv):
                for j in T.vectorized(d):
                    k[s, h, j] = qkv[s, h_qo + h, j]
                for j in T.vectorized(d):
                    v[s, h, j] = qkv[s, h_qo + h_kv + h, j]
    # fmt: on

    return kernel


@memo_kernel
def transpose_append_cpu(h_kv: int, d: int, dtype: str, page_size: int) -> tirx.PrimFunc:
    """TVM's `tir_kv_cache_transpose_append`: token i's k / v rows into slot position_map[i] of the pages
    (pages [P, 2, H_kv, page_size, d]); a position of -1 is skipped."""

    # fmt: off
    @T.prim_func(private=True)
    def kernel(var_pages: T.handle, var_k_data: T.handle, var_v_data: T.handle, var_position_map: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        ntoken = T.int64()
        num_pages = T.int64()
        pages_elem_offset = T.int64()
        position_map_elem_offset = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, h_kv, page_size, d), dtype,
                               elem_offset=pages_elem_offset)
        k_data = T.match_buffer(var_k_data, (ntoken, h_kv, d), dtype)
        v_data = T.match_buffer(var_v_data, (ntoken, h_kv, d), dtype)
        position_map = T.match_buffer(var_position_map, (ntoken,), "int32",
                                      elem_offset=position_map_elem_offset)
        for i in range(ntoken):
            pos: T.int32 = position_map[i]
            if pos != T.int32(-1):
                for h in range(h_kv):
                    for j in T.vectorized(d):
                        pages[pos // page_size, 0, h, pos % page_size, j] = k_data[i, h, j]
                    for j in T.vectorized(d):
                        pages[pos // page_size, 1, h, pos % page_size, j] = v_data[i, h, j]
    # fmt: on

    return kernel
