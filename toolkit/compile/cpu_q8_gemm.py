"""q4 dequant-GEMM for prefill with int8 activations and VNNI (`vpdpbusd`), or AVX2 (`vpmaddubsw`) on CPUs
without it: llama.cpp's Q4 x Q8 scheme for many rows of x.

x is quantized per 32-group to int8 as the decode GEMV does (`cpu_q8_gemv`), 4 consecutive values packed
in one int32. Per parallel task a tile of `lanes` weight rows (16 with 512-bit AVX-512 VNNI, 8 with 256-bit
AVX-VNNI) is repacked once into u8 codes laid out [K/4, rows, 4 k] (one vector per 4 k), and for each
block of `mr` rows of x one `vpdpbusd` per (row, 4 k) multiplies the tile rows' codes with the row's 4
activations broadcast to every lane: 4 multiply-adds per lane against 1 for an fp32 FMA. Each 32-group's
int32 sums start from the zero-point term (-7, or -8 for GGUF Q4_0) and are scaled into fp32 accumulators
once per group; GGUF's Q4_1 (no zero point, a per-group min) adds min x the group's sum of x there. GGUF's
Q8_0 (8-bit codes - 128) needs no repacking: its words are 4 u8 codes in k order already. GGUF's Q4_K runs
as Q4_1 with each 32-group's scale d x sc and min -dmin x m computed once per tile from the super-block's fp16
d, dmin and sub-block bytes; Q5_K the same with each code's fifth bit put in while repacking. Q6_K puts its
two high bits in while repacking, and its int32 sums start from the -32 zero-point term and are scaled per
16-weight sub-block (d x signed sc), against the 32-group's activation scale.

Numerics: the integer sums are exact; the result equals `cpu_q8_gemv`'s up to fp32 summation order."""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .cpu_isa import MADDUBS_ISAS, Q8_GEMM_LANES
from .cpu_q8_gemv import (
    MADDUBS,
    check_layout,
    pack_four,
    quantize_x_group,
    repack_tile,
    scale_groups,
    weight_group_values,
    with_params_of,
)


@memo_kernel(derived=("q",))
def q8_vnni_gemm(
    func: tirx.PrimFunc, q, *, mr: int = 12, lanes: int = 16, isa: str = "vnni"
) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x [.., M, K], q_weight, q_scale, out, optional residual) as the
    int8 VNNI kernel: same parameters, same result up to activation rounding. `lanes`: int32 lanes of the
    registers (16: 512-bit, 8: 256-bit), also the weight rows per tile.

    `isa="avx2"` (8 lanes) or `"avx512bw"` (16 lanes), for CPUs without VNNI: each (row, 4 k) product is a
    `vpmaddubsw` (u8 codes x int8 activations into int16 pairs) instead; a run of them adds up in int16 as
    long as it cannot overflow (`2 * max code * 127` per product: 8 products of 4-bit codes, 4 of 5-bit, 2
    of 6-bit) before one `vpmaddwd` widens the run to int32 - llama.cpp's AVX2 Q4 x Q8 dot product, for
    many rows of x."""
    NR = lanes  # noqa: N806 - a constant of the kernel below
    lay = check_layout(q, with_min=True, with_q8=True, with_k=True)
    avx2 = isa in MADDUBS_ISAS  # the vpmaddubsw form
    assert not avx2 or (lanes == Q8_GEMM_LANES[isa] and lay.bits != 8)
    kq = q.q_sub is not None  # K-quants: a sub-block's scale (and min) from its super-block
    epw, zp = lay.elems_per_word, lay.zero_point
    has_min = q.q_min is not None
    six = kq and not has_min  # Q6_K: a signed scale per 16 weights, zero point 32
    wg, gs = scale_groups(q)  # the int32 sums are scaled once per wg weights; x quantized per gs
    per_wg = gs // wg
    eight = lay.bits == 8  # a word is already 4 u8 codes in k order
    n, k = q.n, q.k
    assert n % NR == 0 and k % gs == 0
    n_groups, n_words, n_quads = k // gs, k // epw, k // 4  # 4 int8 activations per int32 (vpdpbusd)
    n_wg = k // wg
    m_shape = list(q.x.shape)[:-1]
    n_rows = functools.reduce(operator.mul, m_shape, 1)
    x_shape, out_shape = [*m_shape, k], [*m_shape, n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)
    qs_shape = (n, int(q.q_scale.shape[1]))
    qsub_shape = (n, int(q.q_sub.shape[1])) if kq else (1, 1)
    width = lay.high_bits if q.q_high is not None else 0  # Q5_K / Q6_K: code bits above the nibble
    qh_shape = (n, int(q.q_high.shape[1])) if width else (1, 1)

    repack = repack_tile(NR, n_words, width, eight)
    quantize = quantize_x_group(k, gs, has_min)
    group_values = weight_group_values(NR, n_wg, kq, has_min, six)
    dpbusd = T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}")
    maddubs, maddwd = (T.llvm_lookup_intrinsic_id(name) for name in MADDUBS[8 if lanes == 8 else 16])
    i16 = 2 * NR  # int16 lanes of a register
    max_code = (1 << (4 + width)) - 1
    run = min(wg // 4, 32767 // (2 * max_code * 127))  # 4 k products summed in int16 before widening
    assert not avx2 or (wg // 4) % run == 0

    # fmt: off
    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer(qs_shape, scale_dtype), qm: T.Buffer(qs_shape, scale_dtype),
               qsub: T.Buffer(qsub_shape, "uint32"), qh: T.Buffer(qh_shape, "uint32"),
               other: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        xq = T.alloc_buffer((n_rows * n_quads,), "uint32")  # 4 int8 activations per word, k order
        xz = T.alloc_buffer((n_rows * n_wg,), "int32")  # -zp * sum of a weight group's int8 activations
        xs = T.alloc_buffer((n_rows * n_groups,), "float32")  # a group's activation scale
        xm = T.alloc_buffer((n_rows * n_groups if has_min else 1,), "float32")  # a group's sum of x
        # 1. quantize x per 32-group (rows in parallel: M x K values, small next to the GEMM)
        for m in T.parallel(n_rows):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            qv = T.alloc_buffer((gs,), "int32", scope="local")
            for g in range(n_groups):
                quantize(xf, m, g, amax, qv, xs, xm)
                for j in range(8):
                    xq[m * n_quads + g * 8 + j] = pack_four(qv, j)
                for h in range(per_wg):
                    xz[m * n_wg + g * per_wg + h] = T.int32(0)
                    for i in range(wg):
                        xz[m * n_wg + g * per_wg + h] = xz[m * n_wg + g * per_wg + h] - zp * qv[h * wg + i]
        # 2. per tile of NR weight rows: repack, then register blocks of mr rows of x
        for t in T.parallel(n // NR):
            wp = T.alloc_buffer((n_quads * NR,), "uint32")  # [K/4, NR rows]: 4 u8 codes per word
            ws = T.alloc_buffer((n_wg * NR,), "float32")  # [weight groups, NR rows] weight scales
            wm = T.alloc_buffer((n_groups * NR if has_min else 1,), "float32")  # and mins
            acc = T.alloc_buffer((mr * NR,), "float32")  # global scope + small: a stack alloca
            dots = T.alloc_buffer((mr * NR,), "int32")
            pairs = T.alloc_buffer((mr * i16 if avx2 else 1,), "int16")  # vpmaddubsw: a run's int16 sums
            repack(qw, qh, wp, t)
            group_values(qs, qm, qsub, ws, wm, t)
            for mo in range((n_rows + mr - 1) // mr):
                for i in T.unroll(mr):
                    acc[T.ramp(i * NR, 1, NR)] = T.broadcast(T.float32(0), NR)
                for g in range(n_wg):  # a weight group: its int32 sums, then one scaling
                    for i in T.unroll(mr):
                        dots[T.ramp(i * NR, 1, NR)] = T.broadcast(
                            xz[T.min(mo * mr + i, n_rows - 1) * n_wg + g], NR)
                    if avx2:
                        for r in T.unroll(wg // 4 // run):
                            for i in T.unroll(mr):
                                pairs[T.ramp(i * i16, 1, i16)] = T.broadcast(T.int16(0), i16)
                            for s in T.unroll(run):
                                for i in T.unroll(mr):
                                    pairs[T.ramp(i * i16, 1, i16)] = pairs[
                                        T.ramp(i * i16, 1, i16)] + T.call_llvm_pure_intrin(
                                        maddubs, T.reinterpret(f"uint8x{4 * NR}", wp[
                                            T.ramp((g * (wg // 4) + r * run + s) * NR, 1, NR)]),
                                        T.reinterpret(f"int8x{4 * NR}", T.broadcast(xq[
                                            T.min(mo * mr + i, n_rows - 1) * n_quads + g * (wg // 4)
                                            + r * run + s], NR)),
                                        dtype=f"int16x{i16}")
                            for i in T.unroll(mr):
                                dots[T.ramp(i * NR, 1, NR)] = dots[T.ramp(i * NR, 1, NR)] + (
                                    T.call_llvm_pure_intrin(
                                        maddwd, pairs[T.ramp(i * i16, 1, i16)], T.broadcast(T.int16(1), i16),
                                        dtype=f"int32x{NR}"))
                    else:
                        for s in T.unroll(wg // 4):
                            for i in T.unroll(mr):
                                dots[T.ramp(i * NR, 1, NR)] = T.call_llvm_pure_intrin(
                                    dpbusd, dots[T.ramp(i * NR, 1, NR)],
                                    T.reinterpret(f"uint8x{4 * NR}",
                                                  wp[T.ramp((g * (wg // 4) + s) * NR, 1, NR)]),
                                    T.reinterpret(f"int8x{4 * NR}", T.broadcast(
                                        xq[T.min(mo * mr + i, n_rows - 1) * n_quads + g * (wg // 4) + s],
                                        NR)),
                                    dtype=f"int32x{NR}")
                    for i in T.unroll(mr):
                        acc[T.ramp(i * NR, 1, NR)] = acc[T.ramp(i * NR, 1, NR)] + T.Cast(
                            f"float32x{NR}", dots[T.ramp(i * NR, 1, NR)]) * (
                            ws[T.ramp(g * NR, 1, NR)]
                            * T.broadcast(xs[T.min(mo * mr + i, n_rows - 1) * n_groups + g // per_wg], NR))
                    if has_min:
                        for i in T.unroll(mr):
                            acc[T.ramp(i * NR, 1, NR)] = acc[T.ramp(i * NR, 1, NR)] + wm[
                                T.ramp(g * NR, 1, NR)] * T.broadcast(
                                xm[T.min(mo * mr + i, n_rows - 1) * n_groups + g], NR)
                for i in T.unroll(mr):
                    if mo * mr + i < n_rows:
                        for j in T.vectorized(NR):
                            if has_other:
                                oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                if other_first:
                                    of[(mo * mr + i) * n + t * NR + j] = (
                                        oth[(mo * mr + i) * n + t * NR + j] + acc[i * NR + j])
                                else:
                                    of[(mo * mr + i) * n + t * NR + j] = (
                                        acc[i * NR + j] + oth[(mo * mr + i) * n + t * NR + j])
                            else:
                                of[(mo * mr + i) * n + t * NR + j] = acc[i * NR + j]
    # fmt: on

    return with_params_of(func, q, kernel)
