"""q4 dequant-GEMM for prefill on the host CPU, written out as an outer-product micro-kernel.

Per parallel task, a tile of `nr` weight rows is dequantized once into a [K, nr] fp32 scratch (transposed, so
a k step of the tile is one contiguous vector load), then for every `mr` rows of x a register block of
mr x nr accumulators runs over k: `acc[i, :] += x[i, k] * Wt[k, :]` (a broadcast and one FMA per 8 lanes).
The tail of the rows reads a clamped row index and skips the store, so the hot loop has no branches.
Same result as the fp32 reference up to summation order (k runs in order per output, one FMA chain)."""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .cpu_q8_gemv import check_layout, with_params_of


@memo_kernel(derived=("q",))
def q4_outer_gemm(func: tirx.PrimFunc, q, *, mr: int = 6, nr: int = 16, lanes: int = 8) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x [.., M, K] with a dynamic M, q_weight, q_scale, out, optional
    residual) as the outer-product kernel; `lanes`: fp32 lanes per vector (8: AVX2, 16: AVX-512)."""
    lay = check_layout(q)
    epw, wpg, bits, mask = lay.elems_per_word, lay.words_per_group, lay.bits, lay.code_mask
    zp = lay.zero_point
    n, k = q.n, q.k
    assert n % nr == 0 and k % lay.group_size == 0 and nr % lanes == 0
    n_groups, n_words = k // lay.group_size, k // epw
    m_shape = list(q.x.shape)[:-1]
    n_rows = functools.reduce(operator.mul, m_shape, 1)
    x_shape, out_shape = [*m_shape, k], [*m_shape, n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)
    vecs = nr // lanes

    # fmt: off
    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer((n, n_groups), scale_dtype), other: T.Buffer(out_shape, "float32"),
               out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        for t in T.parallel(n // nr):
            wt = T.alloc_buffer((k * nr,), "float32")  # this task's weight rows, dequantized, [k, nr]
            acc = T.alloc_buffer((mr * nr,), "float32")  # global scope + small: a stack alloca
            words = T.alloc_buffer((nr,), "uint32")  # one packed word per tile row (stack)
            scales = T.alloc_buffer((nr,), "float32")  # the rows' scales of the current group (stack)
            # vectorized over the tile's rows (a gather of one word per row). The gathers go to stack
            # buffers first: in the whole-model build LLVM can't tell `wt` stores from `qw`/`qs` loads
            # and re-gathered them for each of the 8 nibbles (64 GFLOP/s in the model vs 83 alone)
            for w in range(n_words):
                for j in T.vectorized(nr):
                    words[j] = qw[t * nr + j, w]
                if w % wpg == 0:
                    for j in T.vectorized(nr):
                        scales[j] = T.Cast("float32", qs[t * nr + j, w // wpg])
                for c in T.unroll(epw):
                    for j in T.vectorized(nr):
                        wt[(w * epw + c) * nr + j] = (T.Cast("float32", T.Cast("int32", T.shift_right(
                            words[j], T.uint32(bits * c)) & T.uint32(mask))) - T.float32(zp)) * scales[j]
            for mo in range((n_rows + mr - 1) // mr):
                for i in T.unroll(mr):
                    for v in T.unroll(vecs):
                        acc[T.ramp(i * nr + v * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                for kk in range(k):
                    for i in T.unroll(mr):
                        for v in T.unroll(vecs):
                            acc[T.ramp(i * nr + v * lanes, 1, lanes)] = acc[
                                T.ramp(i * nr + v * lanes, 1, lanes)] + (
                                T.broadcast(xf[T.min(mo * mr + i, n_rows - 1) * k + kk], lanes)
                                * wt[T.ramp(kk * nr + v * lanes, 1, lanes)])
                for i in T.unroll(mr):
                    if mo * mr + i < n_rows:
                        for j in T.vectorized(nr):
                            if has_other:
                                oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                if other_first:
                                    of[(mo * mr + i) * n + t * nr + j] = (
                                        oth[(mo * mr + i) * n + t * nr + j] + acc[i * nr + j])
                                else:
                                    of[(mo * mr + i) * n + t * nr + j] = (
                                        acc[i * nr + j] + oth[(mo * mr + i) * n + t * nr + j])
                            else:
                                of[(mo * mr + i) * n + t * nr + j] = acc[i * nr + j]
    # fmt: on

    return with_params_of(func, q, kernel)
