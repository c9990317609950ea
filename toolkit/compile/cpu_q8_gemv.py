"""q4 dequant-GEMV on x86 AVX2 with int8 activations: the kernel llama.cpp runs for Q4 weights on CPUs.

x is quantized per 32-group to int8 (scale max|x|/127, rounded half to even), then each 64 weights of a
row are one 32-byte load whose low and high nibbles are multiplied with the matching int8 activations by
`vpmaddubsw` (u8 x i8 -> i16 pairs) and summed to 8 int32 lanes by `vpmaddwd`; the -7 zero point is a
per-lane integer subtraction and the weight and activation scales one fp32 multiply-add per 64 weights.
That is about 0.25 instructions per weight against 0.4 for the fp32-activation kernel (`CPUDequantGEMV`),
whose int->float convert per 8 weights saturates the FP ports.

MLC's q4 layout (word j of row n holds k = 8j..8j+7, nibble c at bits 4c) is read as is: byte i of the 32
bytes at word 8b holds k = 64b + 2i (low nibble) and 64b + 2i + 1 (high), so x is stored de-interleaved
per 64-chunk: `xe[b, i] = q(x[64b + 2i])`, `xo[b, i] = q(x[64b + 2i + 1])`. int32 lane u of a chunk covers
bytes 4u..4u+3, i.e. k in 64b + 8u .. 8u + 7, all in group 2b + u // 4.

Numerics: the result differs from the fp32-activation kernel by the activation rounding, a relative error
of about 5e-3 of max|y| per matmul on random data (llama.cpp's Q8_0 activations do the same)."""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

MASK = 0x0F0F0F0F  # low nibble of every byte of a word


def q8_dot_gemv(func: tirx.PrimFunc, q, *, rows: int = 1, tile: int = 16) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x, q_weight, q_scale, out, optional residual `other`) as the int8
    dot-product kernel: same parameters, same result up to activation rounding.

    rows: weight rows per x load (1 streams the weights strictly in memory order, which the hardware
    prefetcher follows best: 8.2 GB/s vs 4.3 for 4 rows; software prefetch 256/512 B ahead gave 6.5/7.1);
    tile: rows per parallel task."""
    n, k = q.n, q.k
    assert k % 64 == 0 and n % tile == 0 and tile % rows == 0
    n_groups, n_words, n_chunks = k // 32, k // 8, k // 64
    m_shape = list(q.x.shape)[:-1]
    n_rows = functools.reduce(operator.mul, m_shape, 1)  # rows of x (PrimExpr when dynamic)
    x_shape, out_shape = [*m_shape, k], [*m_shape, n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)

    # fmt: off
    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer((n, n_groups), scale_dtype), other: T.Buffer(out_shape, "float32"),
               out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        xe = T.alloc_buffer((n_rows * n_chunks * 32,), "int8")  # even k of each 64-chunk, quantized
        xo = T.alloc_buffer((n_rows * n_chunks * 32,), "int8")  # odd k
        xz = T.alloc_buffer((n_rows * n_chunks * 8,), "int32")  # 7 * sum of the codes an int32 lane covers
        xs = T.alloc_buffer((n_rows * n_chunks * 8,), "float32")  # activation scale of a lane's group
        amax = T.alloc_buffer((1,), "float32", scope="local")
        # 1. quantize x per 32-group (K values per row: negligible next to the N x K weights)
        for m in range(n_rows):
            for g in range(n_groups):
                amax[0] = T.float32(0)
                for i in range(32):
                    amax[0] = T.max(amax[0], T.abs(xf[m * k + g * 32 + i]))
                for i in range(32):
                    # k = 32g + i -> chunk g // 2, byte 16 (g % 2) + i // 2, low/high nibble by i % 2
                    if i % 2 == 0:
                        xe[(m * n_chunks + g // 2) * 32 + 16 * (g % 2) + i // 2] = T.Cast("int8", T.Cast(
                            "int32", T.nearbyint(xf[m * k + g * 32 + i] * T.Select(
                                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))))
                    else:
                        xo[(m * n_chunks + g // 2) * 32 + 16 * (g % 2) + i // 2] = T.Cast("int8", T.Cast(
                            "int32", T.nearbyint(xf[m * k + g * 32 + i] * T.Select(
                                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))))
                for u in range(4):
                    xs[(m * n_chunks + g // 2) * 8 + 4 * (g % 2) + u] = amax[0] / T.float32(127)
            for b in range(n_chunks):
                for u in range(8):
                    xz[(m * n_chunks + b) * 8 + u] = 7 * (
                        T.Cast("int32", xe[(m * n_chunks + b) * 32 + 4 * u])
                        + T.Cast("int32", xe[(m * n_chunks + b) * 32 + 4 * u + 1])
                        + T.Cast("int32", xe[(m * n_chunks + b) * 32 + 4 * u + 2])
                        + T.Cast("int32", xe[(m * n_chunks + b) * 32 + 4 * u + 3])
                        + T.Cast("int32", xo[(m * n_chunks + b) * 32 + 4 * u])
                        + T.Cast("int32", xo[(m * n_chunks + b) * 32 + 4 * u + 1])
                        + T.Cast("int32", xo[(m * n_chunks + b) * 32 + 4 * u + 2])
                        + T.Cast("int32", xo[(m * n_chunks + b) * 32 + 4 * u + 3]))
        # 2. rows of W: 8 fp32 lane accumulators per row, summed at the end
        for t in T.parallel(n // tile):
            acc = T.alloc_local((rows * 8,), "float32")
            for m in range(n_rows):
                for r0 in range(tile // rows):
                    for r in T.unroll(rows):
                        acc[T.ramp(r * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
                    for b in range(n_chunks):
                        for r in T.unroll(rows):
                            # one expression, no vector temporaries: TVMScript would give each its own
                            # buffer, which LowerTVMBuiltin turns into heap workspace (measured 1.7x slower)
                            acc[T.ramp(r * 8, 1, 8)] = acc[T.ramp(r * 8, 1, 8)] + T.Cast(
                                "float32x8",
                                T.call_llvm_pure_intrin(
                                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                    T.call_llvm_pure_intrin(
                                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        T.reinterpret("uint8x32", qw[t * tile + r0 * rows + r, T.ramp(
                                            b * 8, 1, 8)] & T.broadcast(T.uint32(MASK), 8)),
                                        xe[T.ramp((m * n_chunks + b) * 32, 1, 32)], dtype="int16x16")
                                    + T.call_llvm_pure_intrin(
                                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        T.reinterpret("uint8x32", T.shift_right(
                                            qw[t * tile + r0 * rows + r, T.ramp(b * 8, 1, 8)],
                                            T.broadcast(T.uint32(4), 8)) & T.broadcast(T.uint32(MASK), 8)),
                                        xo[T.ramp((m * n_chunks + b) * 32, 1, 32)], dtype="int16x16"),
                                    T.broadcast(T.int16(1), 16), dtype="int32x8")  # |sum| <= 4*15*127
                                - xz[T.ramp((m * n_chunks + b) * 8, 1, 8)]) * (
                                T.Shuffle(  # the two group scales of the chunk, each over 4 lanes
                                    [T.Cast("float32x2", qs[t * tile + r0 * rows + r, T.ramp(
                                        b * 2, 1, 2)])] * 4, [0, 0, 0, 0, 1, 1, 1, 1])
                                * xs[T.ramp((m * n_chunks + b) * 8, 1, 8)])
                    for r in T.unroll(rows):
                        if has_other:
                            oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                            if other_first:
                                of[m * n + t * tile + r0 * rows + r] = oth[
                                    m * n + t * tile + r0 * rows + r] + (
                                    (acc[r * 8] + acc[r * 8 + 1] + acc[r * 8 + 2] + acc[r * 8 + 3])
                                    + (acc[r * 8 + 4] + acc[r * 8 + 5] + acc[r * 8 + 6] + acc[r * 8 + 7]))
                            else:
                                of[m * n + t * tile + r0 * rows + r] = (
                                    (acc[r * 8] + acc[r * 8 + 1] + acc[r * 8 + 2] + acc[r * 8 + 3])
                                    + (acc[r * 8 + 4] + acc[r * 8 + 5] + acc[r * 8 + 6] + acc[r * 8 + 7])
                                ) + oth[m * n + t * tile + r0 * rows + r]
                        else:
                            of[m * n + t * tile + r0 * rows + r] = (
                                (acc[r * 8] + acc[r * 8 + 1] + acc[r * 8 + 2] + acc[r * 8 + 3])
                                + (acc[r * 8 + 4] + acc[r * 8 + 5] + acc[r * 8 + 6] + acc[r * 8 + 7]))
    # fmt: on

    return with_params_of(func, q, kernel)


def with_params_of(func: tirx.PrimFunc, q, kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """`kernel`'s parameters (x, q_weight, q_scale, other, out) in `func`'s order and with `func`'s
    attributes (a private Relax kernel has no global symbol). Without a residual, `other` is dropped: the
    body never reads it (the epilogue branch was resolved when parsing)."""
    x, qw, qs, other, out = kernel.params
    by_role = [(q.x, x), (q.q_weight, qw), (q.q_scale, qs), (q.out, out)]
    if q.other is not None:
        by_role.append((q.other, other))
    order = [next(mine for theirs, mine in by_role if theirs.same_as(p)) for p in func.params]
    attrs = dict(func.attrs.items()) if func.attrs is not None else {}
    attrs.update({"tirx.is_scheduled": True, "tirx.noalias": True})
    return tirx.PrimFunc(order, kernel.body, kernel.ret_type).with_attrs(attrs)
