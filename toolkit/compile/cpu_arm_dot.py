"""q4 x int8 kernels for arm64 (NEON, Armv8.2 DotProd, Armv8.6 i8mm): llama.cpp's Q4 x Q8 scheme on the
instructions `cpu_isa` picks from the target CPU's features.

Decode GEMV: the dot-product step of `cpu_q8_gemv.q8_dot_gemv` (same data layout: one 64-weight chunk per
step, 8 int32 lanes, lane u summing bytes 4u..4u+3 of the chunk's 32 bytes), as two 128-bit halves:
- `neon-dotprod`: two `sdot` per half (low nibbles x even-k activations, high x odd), chained from the -7
  zero-point term. The codes (0..15; K-quants' up to 63) are valid signed bytes, so `sdot` (s8 x s8) is exact;
  `udot` (u8 x u8) does not fit signed activations.
- `neon`: `smull`/`smlal` products in int16 (|2 * 63 * 127| < 2^15), `saddlp` pairs to int32 and `addp`
  pairs of those: the same lanes as `sdot`, on any Armv8 CPU.

Prefill GEMM (`q8_arm_gemm`): x quantized per group to int8 as the GEMV does; per parallel task a tile of
`nr` weight rows is repacked once into int8 codes, then register blocks of `mr` rows of x:
- `neon-i8mm`: `smmla` multiplies a 2x8 int8 block of x (2 rows, 8 k) by a 2x8 block of weights into a 2x2
  int32 block; the tile is laid out [K/8, nr/2 row pairs, 2 rows x 8 k] so each block is one load.
- `neon-dotprod`: `sdot` of 4 weight rows x 4 k (laid out [K/4, nr, 4 k]) with one row's 4 activations
  broadcast to every lane, as the VNNI kernel does with `vpdpbusd`.
Per group the int32 sums start from the zero-point term and are scaled into fp32 accumulators once; GGUF's
Q4_1 (a per-group min, no zero point) adds min x the group's sum of x there (the GEMV's min term is
`cpu_q8_gemv`'s). GGUF's K-quants as on x86 (`cpu_q8_gemm`): each weight group's scale (and min) derived
from its super-block, Q5_K / Q6_K's high bits put in while repacking, Q6_K's scales per 16 weights against
x's per 32. GGUF's Q8_0 runs the GEMV only (`GEMV_DOTS8`; this GEMM unpacks nibbles).

Numerics: the integer sums are exact (|sum| <= group * 63 * 127), so every path equals the exact int8
reference up to fp32 summation over the K / group scaled group sums, as on x86.

Speed: not measured on any arm64 CPU (none was at hand; the paths are checked for numbers under qemu-user,
whose timings say nothing about hardware). By construction: the DotProd GEMV step is 5 pairs of 128-bit
loads, 6 and/shift, 4 `sdot` and 4 fp32 multiply(-add)s per 64 weights (the AVX2 step's shape); the GEMM
register blocks use 16 accumulators + up to 6 operands of the 32 vector registers (`smmla`: 32 int8
multiply-adds per instruction against 16 for `sdot`). mr / nr are not tuned.
"""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .cpu_q8_gemv import (
    _nibbles,
    check_layout,
    four_codes,
    k_group_min,
    k_group_scale,
    scale_groups,
    with_params_of,
)

BITS = 4  # the code width these kernels unpack (nibbles); the group size comes from the matched shapes
PER_WORD = 32 // BITS  # codes per uint32 word


def _half(v: tirx.PrimExpr, h: int, lanes: int) -> tirx.PrimExpr:
    """Lanes h*lanes .. (h+1)*lanes - 1 of vector v."""
    return T.Shuffle([v], list(range(h * lanes, (h + 1) * lanes)))


def _intrin(name: str, dtype: str, *args) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), *args, dtype=dtype)


def _sdot(acc: tirx.PrimExpr, a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """acc (int32x4) + per lane u: sum of a[4u + j] * b[4u + j] (int8x16), one `sdot`."""
    return _intrin("llvm.aarch64.neon.sdot", "int32x4", acc, a, b)


def _s8(v: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    return T.reinterpret(f"int8x{lanes}", v)


def dot_dotprod(words, xe, xo, xz) -> tirx.PrimExpr:
    """The `q8_dot_gemv` step (8 words = 64 codes, int8x32 activations, int32x8 zero-point start) in
    four `sdot`s."""
    lo, hi = _nibbles(words, 8)
    halves = [
        _sdot(_sdot(_half(xz, h, 4), _s8(_half(lo, h, 16), 16), _half(xe, h, 16)),
              _s8(_half(hi, h, 16), 16), _half(xo, h, 16))
        for h in range(2)
    ]  # fmt: skip
    return T.Shuffle(halves, list(range(8)))


def dot_neon(words, xe, xo, xz) -> tirx.PrimExpr:
    """The same step without DotProd: int16 products of codes and activations (low and high nibbles
    summed), then `saddlp` (adjacent int16 pairs -> int32) and `addp` (adjacent pairs again): lane u of a
    half sums products 4u..4u+3, as `sdot` does."""
    lo, hi = _nibbles(words, 8)
    i16 = functools.partial(T.Cast, "int16x32")
    prod = i16(_s8(lo, 32)) * i16(xe) + i16(_s8(hi, 32)) * i16(xo)
    pairs = [_intrin("llvm.aarch64.neon.saddlp", "int32x4", _half(prod, i, 8)) for i in range(4)]
    quads = [_intrin("llvm.aarch64.neon.addp", "int32x4", pairs[2 * h], pairs[2 * h + 1]) for h in range(2)]
    return T.Shuffle(quads, list(range(8))) + xz


GEMV_DOTS = {"neon-dotprod": dot_dotprod, "neon": dot_neon}


def _signed_codes(words) -> tirx.PrimExpr:
    """8 words of 8-bit codes (u8, weight = code - 128) as the weights themselves, int8x32."""
    return _s8(words ^ T.broadcast(T.uint32(0x80808080), 8), 32)


def dot8_dotprod(words, xe, xo, xz) -> tirx.PrimExpr:
    """The `q8_dot_gemv` step for 8-bit codes (GGUF Q8_0: 8 words = 32 codes in k order, int8x32
    activations in k order): code - 128 is a signed byte, so two `sdot`s from 0 (`xz` is not read)."""
    del xo, xz
    w = _signed_codes(words)
    zero = T.broadcast(T.int32(0), 4)
    halves = [_sdot(zero, _half(w, h, 16), _half(xe, h, 16)) for h in range(2)]
    return T.Shuffle(halves, list(range(8)))


def dot8_neon(words, xe, xo, xz) -> tirx.PrimExpr:
    """The same without DotProd: int16 products (|128 * 127| < 2^15), `saddlp`, `addp`."""
    del xo, xz
    i16 = functools.partial(T.Cast, "int16x32")
    prod = i16(_signed_codes(words)) * i16(xe)
    pairs = [_intrin("llvm.aarch64.neon.saddlp", "int32x4", _half(prod, i, 8)) for i in range(4)]
    quads = [_intrin("llvm.aarch64.neon.addp", "int32x4", pairs[2 * h], pairs[2 * h + 1]) for h in range(2)]
    return T.Shuffle(quads, list(range(8)))


GEMV_DOTS8 = {"neon-dotprod": dot8_dotprod, "neon": dot8_neon}  # 8-bit codes (GGUF Q8_0)


def _bcast2(buf, i0, i1) -> tirx.PrimExpr:
    """[buf[i0], buf[i0], buf[i1], buf[i1]]: a per-x-row value over a 2x2 `smmla` block."""
    return T.Shuffle([T.broadcast(buf[i0], 2), T.broadcast(buf[i1], 2)], [0, 1, 2, 3])


def gemm_fits(q, *, isa: str, nr: int = 8) -> bool:
    """Whether `q8_arm_gemm` can run `q` (a `_Q4Matmul`): 4-bit codes (K-quants' with their high bits),
    whole weight tiles, groups of whole instruction steps."""
    group, xgroup = scale_groups(q)
    step = 8 if isa == "neon-i8mm" else 4
    return (
        q.layout.bits != 8
        and q.k == int(q.q_weight.shape[1]) * PER_WORD
        and q.k % xgroup == 0
        and xgroup % group == 0
        and group % max(step, PER_WORD) == 0
        and q.n % nr == 0
        and nr % 4 == 0
    )


@memo_kernel(derived=("q",))
def q8_arm_gemm(func: tirx.PrimFunc, q, *, isa: str, mr: int = 4, nr: int = 8) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x [.., M, K], q_weight, q_scale, out, optional residual) as the
    int8 `smmla` (`isa="neon-i8mm"`) or `sdot` (`"neon-dotprod"`) GEMM: same parameters, same result up
    to activation rounding. mr: rows of x per register block (even for `smmla`), nr: weight rows per tile
    (a multiple of 4)."""
    assert isa in ("neon-i8mm", "neon-dotprod"), isa
    mmla = isa == "neon-i8mm"
    n, k = q.n, q.k
    group, xgroup = scale_groups(q)  # weights per weight scale, activations per activation scale
    n_groups, n_xg, per, n_words = k // group, k // xgroup, xgroup // group, int(q.q_weight.shape[1])
    kq, width = q.q_sub is not None, q.layout.high_bits if q.q_high is not None else 0
    six = kq and q.q_min is None  # Q6_K: signed scales per 16 weights, zero point 32
    qs_shape = (n, int(q.q_scale.shape[1]))
    qsub_shape, qh_shape = [(n, int(b.shape[1])) if b is not None else (1, 1) for b in (q.q_sub, q.q_high)]
    step = 8 if mmla else 4  # k per instruction and row
    assert gemm_fits(q, isa=isa, nr=nr) and (mr % 2 == 0 or not mmla), (isa, mr, nr)
    steps = group // step  # instructions per group and block of rows
    n_rows = functools.reduce(operator.mul, list(q.x.shape)[:-1], 1)
    x_shape, out_shape = [*list(q.x.shape)[:-1], k], [*list(q.x.shape)[:-1], n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)
    # w = (code - zero) * scale: 7 for MLC's q4, 8 for GGUF's Q4_0, 32 for Q6_K; Q4_1 / Q4_K / Q5_K: code *
    # scale + min
    zero, has_min = check_layout(q, with_min=True, with_k=True).zero_point, q.q_min is not None
    bi = mr // 2 if mmla else mr  # blocks of x rows per register block (pairs for smmla)
    bj = nr // 2 if mmla else nr // 4  # 4-lane int32 blocks per tile row (pairs / quads of weight rows)

    # quantized x is padded to whole register blocks (copies of the last row, computed but not stored)
    m_pad = (n_rows + mr - 1) // mr * mr

    def x_row(mo, i):
        return mo * mr + i

    def lane_row(t, jb, lane):  # the weight row of lane `lane` of tile t's int32 block jb
        return t * nr + (jb * 2 + lane % 2 if mmla else jb * 4 + lane)  # smmla: lane = 2 x row + w row

    def w_scale(qs, qsub, row, g):  # weight group g's fp32 scale (K-quants: from the super-block)
        return k_group_scale(qs, qsub, row, g, six) if kq else T.Cast("float32", qs[row, g])

    def w_min(qm, qsub, row, g):
        return k_group_min(qm, qsub, row, g) if kq else T.Cast("float32", qm[row, g])

    def xq_at(m, kk):  # smmla: [row pairs, K/8, 2 rows x 8 k], so an operand is one 16-byte load
        if mmla:
            return ((m // 2) * (k // 8) + kk // 8) * 16 + (m % 2) * 8 + kk % 8
        return m * k + kk

    # fmt: off
    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer(qs_shape, scale_dtype), qm: T.Buffer(qs_shape, scale_dtype),
               qsub: T.Buffer(qsub_shape, "uint32"), qh: T.Buffer(qh_shape, "uint32"),
               other: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        xm = T.alloc_buffer((m_pad * n_groups if has_min else 1,), "float32")  # a group's sum of rounded x
        xq = T.alloc_buffer((m_pad * k,), "int8")  # x quantized (`xq_at`)
        xz = T.alloc_buffer((m_pad * n_groups,), "int32")  # -zp * sum of a weight group's int8 activations
        xs = T.alloc_buffer((m_pad * n_xg,), "float32")  # an activation group's scale
        # 1. quantize x per activation group (rows in parallel: M x K values, small next to the GEMM)
        for m in T.parallel(m_pad):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            for xg in range(n_xg):
                amax[0] = T.float32(0)
                for i in range(xgroup):
                    amax[0] = T.max(amax[0], T.abs(xf[T.min(m, n_rows - 1) * k + xg * xgroup + i]))
                for h in range(per):  # the weight groups it covers
                    xz[m * n_groups + xg * per + h] = T.int32(0)
                for i in range(xgroup):
                    xq[xq_at(m, xg * xgroup + i)] = T.Cast("int8", T.Cast("int32", T.nearbyint(
                        xf[T.min(m, n_rows - 1) * k + xg * xgroup + i] * T.Select(
                            amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))))
                    xz[m * n_groups + xg * per + i // group] = xz[m * n_groups + xg * per + i // group] - (
                        zero * T.Cast("int32", xq[xq_at(m, xg * xgroup + i)]))
                xs[m * n_xg + xg] = amax[0] / T.float32(127)
                for h in range(per):
                    if has_min:  # x as the codes see it (cpu_q8_gemv: the error then follows |w|)
                        xm[m * n_groups + xg * per + h] = T.float32(0)
                        for i in range(group):
                            xm[m * n_groups + xg * per + h] = xm[m * n_groups + xg * per + h] + T.Cast(
                                "float32", xq[xq_at(m, (xg * per + h) * group + i)])
                        xm[m * n_groups + xg * per + h] = xm[m * n_groups + xg * per + h] * xs[m * n_xg + xg]
        # 2. per tile of nr weight rows: repack the codes to bytes, then register blocks of mr rows of x
        for t in T.parallel(n // nr):
            wp = T.alloc_buffer((k // 4 * nr,), "uint32")  # 4 codes (bytes) per word
            ws = T.alloc_buffer((n_groups * bj * 4,), "float32")  # weight scales in the blocks' lanes
            wm = T.alloc_buffer((n_groups * bj * 4 if has_min else 1,), "float32")  # and mins
            acc = T.alloc_buffer((bi * bj * 4,), "float32")  # global scope + small: a stack alloca
            dots = T.alloc_buffer((bi * bj * 4,), "int32")
            for w in range(n_words):
                for j in range(nr):
                    for h in T.unroll(2):  # k = 8w + 4h .. 8w + 4h + 3 -> bytes 0..3
                        if mmla:  # [K/8, nr/2 pairs, 2 rows, 8 k]: a word is one smmla step
                            wp[(w * bj + j // 2) * 4 + (j % 2) * 2 + h] = four_codes(
                                qw, qh, t * nr + j, w, h, width)
                        else:  # [K/4, nr, 4 k]
                            wp[(w * 2 + h) * nr + j] = four_codes(qw, qh, t * nr + j, w, h, width)
            for g in range(n_groups):
                for jb in range(bj):
                    for lane in range(4):
                        ws[(g * bj + jb) * 4 + lane] = w_scale(qs, qsub, lane_row(t, jb, lane), g)
                        if has_min:
                            wm[(g * bj + jb) * 4 + lane] = w_min(qm, qsub, lane_row(t, jb, lane), g)
            for mo in range((n_rows + mr - 1) // mr):
                for b in T.unroll(bi * bj):
                    acc[T.ramp(b * 4, 1, 4)] = T.broadcast(T.float32(0), 4)
                for g in range(n_groups):
                    for ib in T.unroll(bi):
                        for jb in T.unroll(bj):
                            if mmla:
                                dots[T.ramp((ib * bj + jb) * 4, 1, 4)] = _bcast2(
                                    xz, x_row(mo, 2 * ib) * n_groups + g,
                                    x_row(mo, 2 * ib + 1) * n_groups + g)
                            else:
                                dots[T.ramp((ib * bj + jb) * 4, 1, 4)] = T.broadcast(
                                    xz[x_row(mo, ib) * n_groups + g], 4)
                    for s in T.unroll(steps):
                        for ib in T.unroll(bi):
                            for jb in T.unroll(bj):
                                if mmla:
                                    dots[T.ramp((ib * bj + jb) * 4, 1, 4)] = _intrin(
                                        "llvm.aarch64.neon.smmla", "int32x4",
                                        dots[T.ramp((ib * bj + jb) * 4, 1, 4)],
                                        xq[T.ramp(xq_at(x_row(mo, 2 * ib), g * group + s * 8), 1, 16)],
                                        _s8(wp[T.ramp(((g * steps + s) * bj + jb) * 4, 1, 4)], 16))
                                else:
                                    dots[T.ramp((ib * bj + jb) * 4, 1, 4)] = _sdot(
                                        dots[T.ramp((ib * bj + jb) * 4, 1, 4)],
                                        _s8(wp[T.ramp((g * steps + s) * nr + jb * 4, 1, 4)], 16),
                                        _s8(T.broadcast(T.reinterpret("uint32", xq[T.ramp(
                                            xq_at(x_row(mo, ib), g * group + s * 4), 1, 4)]), 4), 16))
                    for ib in T.unroll(bi):
                        for jb in T.unroll(bj):
                            if mmla:
                                acc[T.ramp((ib * bj + jb) * 4, 1, 4)] = acc[
                                    T.ramp((ib * bj + jb) * 4, 1, 4)] + T.Cast(
                                    "float32x4", dots[T.ramp((ib * bj + jb) * 4, 1, 4)]) * (
                                    ws[T.ramp((g * bj + jb) * 4, 1, 4)] * _bcast2(
                                        xs, x_row(mo, 2 * ib) * n_xg + g // per,
                                        x_row(mo, 2 * ib + 1) * n_xg + g // per))
                            else:
                                acc[T.ramp((ib * bj + jb) * 4, 1, 4)] = acc[
                                    T.ramp((ib * bj + jb) * 4, 1, 4)] + T.Cast(
                                    "float32x4", dots[T.ramp((ib * bj + jb) * 4, 1, 4)]) * (
                                    ws[T.ramp((g * bj + jb) * 4, 1, 4)]
                                    * T.broadcast(xs[x_row(mo, ib) * n_xg + g // per], 4))
                    if has_min:
                        for ib in T.unroll(bi):
                            for jb in T.unroll(bj):
                                if mmla:
                                    acc[T.ramp((ib * bj + jb) * 4, 1, 4)] = acc[
                                        T.ramp((ib * bj + jb) * 4, 1, 4)] + wm[
                                        T.ramp((g * bj + jb) * 4, 1, 4)] * _bcast2(
                                        xm, x_row(mo, 2 * ib) * n_groups + g,
                                        x_row(mo, 2 * ib + 1) * n_groups + g)
                                else:
                                    acc[T.ramp((ib * bj + jb) * 4, 1, 4)] = acc[
                                        T.ramp((ib * bj + jb) * 4, 1, 4)] + wm[
                                        T.ramp((g * bj + jb) * 4, 1, 4)] * T.broadcast(
                                        xm[x_row(mo, ib) * n_groups + g], 4)
                # 3. store: acc block (ib, jb) lane -> (x row, weight row)
                for i in T.unroll(mr):
                    if mo * mr + i < n_rows:
                        for j in range(nr):
                            if has_other:
                                oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                if other_first:
                                    of[(mo * mr + i) * n + t * nr + j] = oth[
                                        (mo * mr + i) * n + t * nr + j] + acc[_acc_index(mmla, bj, i, j)]
                                else:
                                    of[(mo * mr + i) * n + t * nr + j] = acc[
                                        _acc_index(mmla, bj, i, j)] + oth[(mo * mr + i) * n + t * nr + j]
                            else:
                                of[(mo * mr + i) * n + t * nr + j] = acc[_acc_index(mmla, bj, i, j)]
    # fmt: on

    return with_params_of(func, q, kernel)


def _acc_index(mmla: bool, bj: int, i, j):
    """Where the accumulator of (x row i, weight row j) of a register block sits."""
    if mmla:  # block (i // 2, j // 2), lane 2 * (i % 2) + j % 2
        return ((i // 2) * bj + j // 2) * 4 + 2 * (i % 2) + j % 2
    return (i * bj + j // 4) * 4 + j % 4
