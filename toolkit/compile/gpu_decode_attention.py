"""Low-latency paged-KV decode attention for GPUs, a drop-in for TVM's `batch_decode_paged_kv`.

Why: TVM's decode kernel (`tvm.relax.frontend.nn.llm._decode_kernels._attention_decode`) runs one CTA per
(sequence, KV head) that stages tiles of K/V in shared memory with two block-wide barriers per tile. At
batch 1 for Phi-3-mini (32 heads, head_dim 96, fp16, page_size 16) that is 32 CTAs of 504 threads on a
132-SM H200, walking ~190 tokens of context in tiles of 42: 11.2 us per call, 18% of a decode step.

This kernel keeps one CTA per (sequence, head) but spreads the sequence over many more threads and has no
barrier inside the token loop:

- grid (B, H_qo); block (LANES, GROUPS) with LANES * GROUPS = `max_threads` (1024 by default). A group is
  LANES (a power of two <= 32, so one warp or part of one) threads; lane `l` owns head dims
  [l * VEC, (l + 1) * VEC). For D = 96: VEC 4, 24 of 32 lanes active, 32 groups.
- group `g` takes tokens g, g + GROUPS, ... two per step: it reads K and V rows straight from the pages
  (a page-table lookup per token), reduces the two dot products across its lanes (warp shuffles on CUDA),
  and updates its online-softmax state (running max, running sum, VEC accumulators) in registers;
- after the loop the GROUPS partial states meet once in shared memory (one barrier) and the first group
  merges them and writes the output and the log-sum-exp.
- nothing in the token loop branches within a warp (idle lanes and tokens past the end read a valid slice
  and weigh 0), since TVM's shuffle reduction takes its lane mask from `__activemask()`.

Measured on an H200 (CUDA graph replay of the sm_90 build, Phi-3-mini shape, fp16; "cold" cycles through
enough KV caches to miss L2): at B 1 and 190 tokens 5.1 us (cold 6.9) against TVM's 11.0 (14.4); 2000
tokens 27 us against 80; B 4 x 190 tokens 5.3 us against 11.6; B 8 x 190 tokens 9.6 us
against 15.4 (`max_threads=512` does 7.3 there, but is slower at B <= 4 and long contexts).

Interface: exactly TVM's GPU kernel (same parameters, buffer shapes, dtypes and elem_offset symbols, global
symbol `batch_decode_paged_kv[_sliding_window]`), so the KV cache can call it in its place. Output semantics
are TVM's: `output[b, h]` is the softmax(q k^T * sm_scale) weighted sum of V in the qkv dtype, and
`lse[b, h]` is base 2 with sm_scale folded in: log2(sum_j exp2(q . k_j * sm_scale * log2(e))). For a
sequence with no KV at all the output is 0 and lse is -5e4 (TVM's GPU kernel writes -5e4 + a small log2 term).

Limits: multi-head attention only (H_kv == H_qo; the factory returns None for GQA); `rotary_mode` must be 0
(q and k rotated before they reach the cache, as in our model): `rotary_mode`, `rope_scale`, `rope_theta`,
`k_rope_pos_offset` and `q_rope_position` are accepted for the interface and ignored. Sliding window (with
attention sinks; `length_info` of shape [3, B]) is supported.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel

WARP = 32
TOKENS_PER_STEP = 2  # tokens a group handles per loop step (fixed: the reducer below sums two values)
NO_SCORE = -5e4  # initial running max, as TVM's kernels use


def _length_info(handle, batch: int, sliding_window: bool, elem_offset):
    """[B] last-page lengths; with a sliding window [3, B]: last-page length, window start, sink length."""
    shape = (3, batch) if sliding_window else (batch,)
    return T.match_buffer(handle, shape, "int32", elem_offset=elem_offset)


def _kv_len(num_pages, page_size: int, b, length_info, sliding_window: bool):
    """Number of KV positions attended to: all of them, or sink + window with a sliding window."""
    full = (num_pages - 1) * page_size
    if not sliding_window:
        return full + length_info[b]
    return full + length_info[0, b] - length_info[1, b] + length_info[2, b]


def _position(i, b, length_info, sliding_window: bool):
    """Position in the paged sequence of the i-th attended KV entry (sinks first, then the window)."""
    if not sliding_window:
        return i
    sink = length_info[2, b]
    return T.if_then_else(i < sink, i, i - sink + length_info[1, b])


@memo_kernel
def decode_attention_gpu(
    h_kv: int,
    h_qo: int,
    d: int,
    dtype: str,
    sliding_window: bool,
    page_size: int,
    max_threads: int = 1024,
) -> tirx.PrimFunc | None:
    """The decode kernel for these shapes, or None where this kernel does not apply (GQA, a head_dim that is
    not a multiple of 4, another dtype than float16/float32).

    `max_threads` is the CTA size (1024 for CUDA; WebGPU allows 256); the PrimFunc itself is the same for
    every GPU target: only the lowering of the lane reduction differs (shuffles, or shared memory where the
    target has no warps).
    """
    if h_kv != h_qo or dtype not in ("float16", "float32") or page_size <= 0:
        return None
    vec = 4
    while d // vec > WARP:
        vec *= 2
    if d % vec:
        return None
    lanes_used = d // vec
    lanes = 1 << (lanes_used - 1).bit_length()  # power of two: a sub-warp shuffle reduction
    groups = max_threads // lanes
    if lanes > WARP or groups < 1:
        return None
    n_heads, head_dim, step_tokens = h_qo, d, groups * TOKENS_PER_STEP
    score_scale = math.log2(math.e)
    symbol = "batch_decode_paged_kv" + ("_sliding_window" if sliding_window else "")

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": symbol})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_elem_offset = T.int64()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, n_heads, head_dim), dtype)
        pages = T.match_buffer(
            pages_handle,
            (max_num_pages, 2, n_heads, page_size, head_dim),
            dtype,
            elem_offset=pages_elem_offset,
        )
        page_table_indptr = T.match_buffer(
            page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset
        )
        page_table_values = T.match_buffer(
            page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset
        )
        # RoPE inputs: part of the interface, unused (rotary_mode 0: q and k arrive rotated)
        k_rope_pos_offset = T.match_buffer(  # noqa: F841
            k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset
        )
        q_rope_position = T.match_buffer(  # noqa: F841
            q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset
        )
        output = T.match_buffer(output_handle, (B, n_heads, head_dim), dtype)
        lse = T.match_buffer(lse_handle, (B, n_heads), "float32")
        length_info = _length_info(var_length_info, B, sliding_window, length_info_elem_offset)

        for b in T.thread_binding(B, thread="blockIdx.x"):
            for h in T.thread_binding(n_heads, thread="blockIdx.y"):
                for g in T.thread_binding(groups, thread="threadIdx.y"):
                    for lane in T.thread_binding(lanes, thread="threadIdx.x"):
                        with T.sblock("decode"):
                            q = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                            k = T.sblock_alloc_buffer((TOKENS_PER_STEP, vec), dtype, scope="local")
                            v = T.sblock_alloc_buffer((TOKENS_PER_STEP, vec), dtype, scope="local")
                            part = T.sblock_alloc_buffer((TOKENS_PER_STEP,), "float32", scope="local")
                            # the reduction results must be separate one-element buffers
                            score0 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            score1 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            prob = T.sblock_alloc_buffer((TOKENS_PER_STEP,), "float32", scope="local")
                            acc = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                            run_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            run_sum = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            new_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            n_kv = T.sblock_alloc_buffer((1,), "int32", scope="local")
                            grp_max = T.sblock_alloc_buffer((groups,), "float32", scope="shared")
                            grp_sum = T.sblock_alloc_buffer((groups,), "float32", scope="shared")
                            grp_acc = T.sblock_alloc_buffer((groups, head_dim), "float32", scope="shared")

                            first_page: T.let[T.int32] = page_table_indptr[b]
                            last_page: T.let[T.int32] = page_table_indptr[b + 1]
                            n_kv[0] = T.if_then_else(
                                first_page < last_page,
                                _kv_len(last_page - first_page, page_size, b, length_info, sliding_window),
                                0,
                            )
                            run_max[0] = T.float32(NO_SCORE)
                            run_sum[0] = T.float32(0)
                            # No branch that splits a warp may come before the lane reductions: the
                            # shuffles take their mask from __activemask(), so every lane must be there.
                            # Idle lanes (lane >= lanes_used) read a real slice and weigh it by q = 0.
                            # scores in the log2 domain: fold sm_scale * log2(e) into q once (a scalar
                            # select: OpenCL's vector select reads a true of 1 as false)
                            q_scale: T.let[T.float32] = T.Select(
                                lane < lanes_used, sm_scale * score_scale, T.float32(0)
                            )
                            for i in T.vectorized(vec):
                                acc[i] = T.float32(0)
                                q[i] = (
                                    T.cast(Q[b, h, T.min(lane, lanes_used - 1) * vec + i], "float32")
                                    * q_scale
                                )

                            for step in T.serial(T.ceildiv(n_kv[0], step_tokens)):
                                tok: T.let[T.int32] = step * step_tokens + g  # then tok + groups
                                # 1. both tokens' K and V rows, straight from their pages
                                # (a token past the end reads the last one again and weighs 0 below)
                                for u in T.unroll(TOKENS_PER_STEP):
                                    pos: T.let[T.int32] = _position(
                                        T.min(tok + u * groups, n_kv[0] - 1), b, length_info, sliding_window
                                    )
                                    page: T.let[T.int32] = page_table_values[first_page + pos // page_size]
                                    dim: T.let[T.int32] = T.min(lane, lanes_used - 1) * vec
                                    for i in T.vectorized(vec):
                                        k[u, i] = pages[page, 0, h, pos % page_size, dim + i]
                                    for i in T.vectorized(vec):
                                        v[u, i] = pages[page, 1, h, pos % page_size, dim + i]
                                # 2. partial dot products, summed across the group's lanes
                                for u in T.unroll(TOKENS_PER_STEP):
                                    part[u] = T.float32(0)
                                    for i in T.unroll(vec):
                                        part[u] += q[i] * T.cast(k[u, i], "float32")
                                with T.sblock("lane_sum"):
                                    T.reads(part[0:TOKENS_PER_STEP])
                                    T.writes(score0[0], score1[0])
                                    T.attr(
                                        T.comm_reducer(
                                            lambda x0, x1, y0, y1: (x0 + y0, x1 + y1),
                                            [T.float32(0), T.float32(0)],
                                        ),
                                        "reduce_scope",
                                        T.int32(0),
                                    )
                                    T.tvm_thread_allreduce(
                                        T.uint32(2),
                                        part[0],
                                        part[1],
                                        True,
                                        score0[0],
                                        score1[0],
                                        lane,
                                        dtype="void",
                                    )
                                # 3. online softmax; a token past the end weighs 0 (selects, not branches)
                                new_max[0] = T.max(
                                    run_max[0],
                                    T.max(
                                        T.Select(tok < n_kv[0], score0[0], T.float32(NO_SCORE)),
                                        T.Select(tok + groups < n_kv[0], score1[0], T.float32(NO_SCORE)),
                                    ),
                                )
                                prob[0] = T.Select(
                                    tok < n_kv[0], T.exp2(score0[0] - new_max[0]), T.float32(0)
                                )
                                prob[1] = T.Select(
                                    tok + groups < n_kv[0], T.exp2(score1[0] - new_max[0]), T.float32(0)
                                )
                                rescale: T.let[T.float32] = T.exp2(run_max[0] - new_max[0])
                                run_sum[0] = run_sum[0] * rescale + prob[0] + prob[1]
                                for i in T.vectorized(vec):
                                    acc[i] = (
                                        acc[i] * rescale
                                        + prob[0] * T.cast(v[0, i], "float32")
                                        + prob[1] * T.cast(v[1, i], "float32")
                                    )
                                run_max[0] = new_max[0]

                            # merge the groups' partial states: the kernel's only barrier
                            if lane == 0:
                                grp_max[g] = run_max[0]
                                grp_sum[g] = run_sum[0]
                            if lane < lanes_used:
                                for i in T.vectorized(vec):
                                    grp_acc[g, lane * vec + i] = acc[i]
                            T.tvm_storage_sync("shared")
                            if g == 0:
                                new_max[0] = T.float32(NO_SCORE)
                                for j in T.serial(groups):
                                    new_max[0] = T.max(new_max[0], grp_max[j])
                                run_sum[0] = T.float32(0)
                                for i in T.vectorized(vec):
                                    acc[i] = T.float32(0)
                                for j in T.serial(groups):
                                    weight: T.let[T.float32] = T.exp2(grp_max[j] - new_max[0])
                                    run_sum[0] += grp_sum[j] * weight
                                    if lane < lanes_used:
                                        for i in T.vectorized(vec):
                                            acc[i] += grp_acc[j, lane * vec + i] * weight
                                if lane < lanes_used:
                                    for i in T.vectorized(vec):
                                        output[b, h, lane * vec + i] = T.cast(
                                            T.if_then_else(
                                                run_sum[0] > T.float32(0), acc[i] / run_sum[0], T.float32(0)
                                            ),
                                            dtype,
                                        )
                                if lane == 0:
                                    lse[b, h] = T.if_then_else(
                                        run_sum[0] > T.float32(0),
                                        new_max[0] + T.log2(run_sum[0]),
                                        T.float32(NO_SCORE),
                                    )

    return batch_decode_paged_kv
