"""q4 dequant-GEMV on x86 with int8 activations and integer dot products: the kernel llama.cpp runs for Q4
weights on CPUs, in three instruction-set paths (`cpu_isa.Q8_DOT_ISAS`).

x is quantized per 32-group to int8 (scale max|x|/127, rounded half to even). Each 64 weights of a row are
one 32-byte load whose low and high nibbles (u8) are multiplied with the matching int8 activations:
- `avx2`: `vpmaddubsw` (u8 x i8 -> i16 pairs) twice, added, then summed to 8 int32 lanes by `vpmaddwd`;
- `avxvnni`: two `vpdpbusd` (u8 x i8, 4 products summed into each int32 lane) on 256-bit registers;
- `avx512vnni`: the same on 512-bit registers, 128 weights (two chunks) per step (`avx512bw`: AVX2's steps
  on 512-bit registers); for K an odd number of chunks (SmolLM2's 576) both end with one step on 256-bit
  registers (`steps_through`);
- `neon-dotprod` / `neon` (arm64): `sdot`, or int16 products and pairwise adds, per 128-bit half
  (`cpu_arm_dot`).
The zero point (-7 for MLC's q4, -8 for GGUF's Q4_0) is a per-lane integer term (`xz`, the VNNI chains
start from it) and the weight and activation scales one fp32 multiply-add per step. GGUF's Q4_1 has no zero
point but a per-group min: one more multiply-add per step, the mins times each lane's sum of x (`xm`, the
rounded x the codes see, as llama.cpp's Q8_1 sums: the product's error then follows |w| as for Q4_0).

MLC's q4 layout (word j of row n holds k = 8j..8j+7, nibble c at bits 4c) is read as is: byte i of the 32
bytes at word 8b holds k = 64b + 2i (low nibble) and 64b + 2i + 1 (high), so x is stored de-interleaved
per 64-chunk: `xe[b, i] = q(x[64b + 2i])`, `xo[b, i] = q(x[64b + 2i + 1])`. int32 lane u of a chunk covers
bytes 4u..4u+3, i.e. k in 64b + 8u .. 8u + 7, all in group 2b + u // 4. Chunks are contiguous in xe/xo/xz/
xs, so a 512-bit step over chunks 2b, 2b + 1 reads them as one vector: lane u is in group 4b + u // 4.

Numerics: the integer dot products are exact in every path (|lane| <= 8 * 63 * 127), so all paths give
the same result up to fp32 summation; it differs from the fp32-activation kernel by the activation
rounding, a relative error of about 5e-3 of max|y| per matmul on random data (llama.cpp's Q8_0
activations do the same)."""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from ..quantization import GGUF_BLOCK_LAYOUTS, MLC_Q4_LAYOUT, GroupLayout
from .cpu_isa import MADDUBS_ISAS, Q8_DOT_LANES

# The layouts the host's hand q4 kernels (this module, `cpu_q8_gemm`, `cpu_q4_gemm`, `cpu_arm_dot`,
# `cpu_schedule._regrouped_q4_gemv`) are built for: 4-bit codes, 8 per uint32 in element order, groups of
# 32, no per-group min; the zero point comes from the layout: MLC's q4 (c - 7) and GGUF's Q4_0 as repacked
# (c - 8). `cpu_schedule._match_q4_matmul` declines any other layout (generic schedules take it).
HOST_Q4_LAYOUTS: tuple[GroupLayout, ...] = (MLC_Q4_LAYOUT, GGUF_BLOCK_LAYOUTS["q4_0"])
# The same codes with a per-group min instead of a zero point (GGUF's Q4_1: code * scale + min), which the
# int8 kernels take (decode GEMV, every dot-product path; x86 VNNI prefill GEMM) as one more fp32
# multiply-add per group: min times the group's activation sum.
HOST_Q4_MIN_LAYOUTS: tuple[GroupLayout, ...] = (GGUF_BLOCK_LAYOUTS["q4_1"],)
# 8-bit codes, 4 per uint32 in element order, groups of 32, code - 128 (GGUF's Q8_0 as repacked): the int8
# decode GEMV (x86 and arm64) and the x86 VNNI GEMM read them next to x in element order (no nibbles).
HOST_Q8_LAYOUTS: tuple[GroupLayout, ...] = (GGUF_BLOCK_LAYOUTS["q8_0"],)
# GGUF's K-quants. Q4_K: q4 codes; each 32-group's scale d x sc and min -dmin x m come from its
# super-block's fp16 d, dmin and sub-block bytes (q_sub), computed per step (GEMV) or per tile (GEMM) and
# then used like Q4_1's. Q5_K the same with a fifth code bit from its own plane (bit 4 of the code bytes: u8
# codes up to 31). Q6_K: two high bits (bits 4-5: codes up to 63), zero point 32 like Q4_0's, and a signed
# scale d x sc per 16 weights (two int32 lanes), no min.
HOST_K_LAYOUTS = (GGUF_BLOCK_LAYOUTS["q4_k"], GGUF_BLOCK_LAYOUTS["q5_k"], GGUF_BLOCK_LAYOUTS["q6_k"])
MASK = 0x0F0F0F0F  # low nibble of every byte of a word
BATCH_BLOCK = 4  # rows of x per unrolled block of the batched path (accumulators in registers)
BATCH_W_ROWS = 2  # weight rows per x load of the batched path: x's loads serve 2 rows (-8..14% time)
PREFETCH_LOCALITY = {1: 3, 2: 2}  # cache level a software prefetch fills -> llvm.prefetch locality (t0, t1)


def _pair_fields(high: tirx.PrimExpr, lanes: int, width: int) -> tirx.PrimExpr:
    """Each lane's 8 top-bit fields of `width` bits (element e at bits width x e, above them zeros) as
    byte j = the fields of elements 2j and 2j + 1 (bits 0.. and width..), by two shift-or-mask steps."""

    def u(v: int) -> tirx.PrimExpr:
        return T.broadcast(T.uint32(v), lanes)

    x = (high | T.shift_left(high, u(16 - 4 * width))) & u(((1 << 4 * width) - 1) * 0x00010001)
    return (x | T.shift_left(x, u(8 - 2 * width))) & u(((1 << 2 * width) - 1) * 0x01010101)


def _nibbles(words, lanes: int) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(low, high) nibbles of `lanes` uint32 words as u8 vectors (one weight code per byte). `words` may be
    (words, high, width) for codes of 4 + width bits (GGUF Q5_K: 1, Q6_K: 2): `high` holds each lane's 8
    top-bit fields (its elements in k order, `width` bits each, zeros above), which become bits 4.. of the
    codes."""
    words, high, width = words if isinstance(words, tuple) else (words, None, 0)

    def u(v: int) -> tirx.PrimExpr:
        return T.broadcast(T.uint32(v), lanes)

    lo, hi = words & u(MASK), T.shift_right(words, u(4)) & u(MASK)
    if high is not None and width == 1:
        # bit 2j (lo) / 2j + 1 (hi) to bit 8j + 4 by one multiply: the other partial products land on even
        # bits off the targets, at most two on one, whose carry stops at an odd bit no product reaches
        spread = sum(1 << (4 + 6 * j) for j in range(4))
        lo = lo | ((high & u(0x55)) * u(spread) & u(0x10101010))
        hi = hi | ((high & u(0xAA)) * u(spread >> 1) & u(0x10101010))
    elif high is not None:  # element 2j's field to bits 4.. of byte j (lo), element 2j + 1's (hi)
        pairs, top = _pair_fields(high, lanes, width), u(((1 << width) - 1) * 0x10101010)
        lo, hi = lo | (T.shift_left(pairs, u(4)) & top), hi | (T.shift_left(pairs, u(4 - width)) & top)
    return T.reinterpret(f"uint8x{4 * lanes}", lo), T.reinterpret(f"uint8x{4 * lanes}", hi)


# `vpmaddubsw` / `vpmaddwd` by int32 lanes (u8 x i8 -> i16 pairs, i16 -> i32 pairs): AVX2, AVX-512BW
MADDUBS = {
    8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
    16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
}


def _dot_maddubs(words, xe, xo, xz, lanes: int) -> tirx.PrimExpr:
    ubsw, wd = (T.llvm_lookup_intrinsic_id(name) for name in MADDUBS[lanes])
    lo, hi = _nibbles(words, lanes)
    i16 = f"int16x{2 * lanes}"
    pairs = T.call_llvm_pure_intrin(ubsw, lo, xe, dtype=i16) + T.call_llvm_pure_intrin(
        ubsw, hi, xo, dtype=i16
    )
    # |pair sum| <= 4 * 63 * 127 < 2**15 (6-bit codes; x is never -128): no int16 saturation
    ones = T.broadcast(T.int16(1), 2 * lanes)
    return T.call_llvm_pure_intrin(wd, pairs, ones, dtype=f"int32x{lanes}") + xz


def _dot_vnni(words, xe, xo, xz, lanes: int) -> tirx.PrimExpr:
    # LLVM >= 21 declares the intrinsic on i8 vectors (<N x i8> operands); the 256-bit one is VEX-encoded
    # (AVX-VNNI) when the CPU has it, EVEX (AVX-512 VL) otherwise
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    lo, hi = _nibbles(words, lanes)
    first = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), xz, lo, xe, dtype=f"int32x{lanes}")
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), first, hi, xo, dtype=f"int32x{lanes}")


def _dot8_avx2(words, xe, xo, xz) -> tirx.PrimExpr:
    """8-bit codes c (u8, c - 128 the weight): `vpmaddubsw` on |c - 128| and x signed by c - 128 (u8 c
    times i8 x would saturate int16 pairs; |w| <= 128 does not: 2 * 128 * 127 < 2**15), so no zero-point
    term (`xz` is not read)."""
    del xo, xz
    w = T.reinterpret("int8x32", words ^ T.broadcast(T.uint32(0x80808080), 8))
    absw = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.abs"), w, T.bool(False), dtype="int8x32")
    signed_x = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), xe, w, dtype="int8x32"
    )
    pairs = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
        T.reinterpret("uint8x32", absw),
        signed_x,
        dtype="int16x16",
    )
    ones = T.broadcast(T.int16(1), 16)
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, ones, dtype="int32x8"
    )


def _dot8_vnni(words, xe, xo, xz, lanes: int) -> tirx.PrimExpr:
    """8-bit codes as u8 (4 per lane, element order) times x: one `vpdpbusd` from the zero-point term."""
    del xo
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    codes = T.reinterpret(f"uint8x{4 * lanes}", words)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), xz, codes, xe, dtype=f"int32x{lanes}")


def _spread_nibbles(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The 4 nibbles in v's low 16 bits moved to the low nibbles of its 4 bytes (u8 codes)."""
    parts = [T.shift_left(v & T.uint32(0xF << (4 * c)), T.uint32(4 * c)) for c in range(4)]
    return functools.reduce(operator.or_, parts)


def _spread_high(v: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
    """The 4 fields of `width` bits in v's low 4 x width bits moved to bits 4.. of its 4 bytes."""
    mask = (1 << width) - 1
    parts = [
        T.shift_left(v & T.uint32(mask << (width * c)), T.uint32(8 * c + 4 - width * c)) for c in range(4)
    ]
    return functools.reduce(operator.or_, parts)


def four_codes(qw, qh, row, w, h, width: int, word=None) -> tirx.PrimExpr:
    """The prefill GEMMs' repack: codes k = 8w + 4h .. 8w + 4h + 3 of weight row `row` as the 4 bytes of a
    uint32, from nibbles 4h..4h+3 of word w (`word`: that word, already loaded), and for K-quants with high
    bits (`width` 1: Q5_K, 2: Q6_K) bits 4.. from the high plane `qh`."""
    word = qw[row, w] if word is None else word
    nibbles = _spread_nibbles(T.shift_right(word, T.uint32(16) * T.Cast("uint32", h)))
    if not width:
        return nibbles
    per_word = 32 // width
    at = T.Cast("uint32", (8 * w + 4 * h) % per_word * width)
    return nibbles | _spread_high(T.shift_right(qh[row, (8 * w + 4 * h) // per_word], at), width)


def pack_four(qv, j) -> tirx.PrimExpr:
    """int8 values qv[4j .. 4j + 3] (int32 in -127..127) as the 4 bytes of a uint32, lowest first."""
    return functools.reduce(
        operator.or_,
        [T.shift_left(T.Cast("uint32", qv[4 * j + c]) & T.uint32(255), T.uint32(8 * c)) for c in range(4)],
    )


def quantize_x_group(k: int, gs: int, has_min: bool):
    """A TVMScript macro `(xf, m, g, amax, qv, xs, xm)` for the prefill GEMMs: group g (of `gs`) of row m of
    the flat fp32 x (rows of `k`) rounded to int8 into qv[gs], its scale amax / 127 into xs[m, g] and, for
    layouts with mins, the group's sum of x as rounded into xm[m, g] (an all-zero group: codes and scale 0).
    xs / xm are flat, K / gs per row."""
    n_groups = k // gs

    # fmt: off
    @T.macro
    def quantize(xf, m, g, amax, qv, xs, xm):
        amax[0] = T.float32(0)
        for i in range(gs):
            amax[0] = T.max(amax[0], T.abs(xf[m * k + g * gs + i]))
        for i in range(gs):
            qv[i] = T.Cast("int32", T.nearbyint(xf[m * k + g * gs + i] * T.Select(
                amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
        xs[m * n_groups + g] = amax[0] / T.float32(127)
        if has_min:  # the rounded x the codes see (cpu_q8_gemv: error follows |w|)
            xm[m * n_groups + g] = T.float32(0)
            for i in range(gs):
                xm[m * n_groups + g] = xm[m * n_groups + g] + T.Cast("float32", qv[i])
            xm[m * n_groups + g] = xm[m * n_groups + g] * xs[m * n_groups + g]
    # fmt: on

    return quantize


def weight_group_values(nr: int, n_wg: int, kq: bool, has_min: bool, six: bool):
    """A TVMScript macro `(qs, qm, qsub, ws, wm, t)` for the prefill GEMMs: the fp32 scale (and min) of each
    weight group of rows t * nr .. t * nr + nr - 1, laid out [group, nr rows]; K-quants' derived from the
    super-block's d (dmin) and sub-block bytes."""

    # fmt: off
    @T.macro
    def values(qs, qm, qsub, ws, wm, t):
        for g in range(n_wg):
            if kq:
                for j in T.vectorized(nr):
                    ws[g * nr + j] = k_group_scale(qs, qsub, t * nr + j, g, six)
                if has_min:
                    for j in T.vectorized(nr):
                        wm[g * nr + j] = k_group_min(qm, qsub, t * nr + j, g)
            else:
                for j in T.vectorized(nr):
                    ws[g * nr + j] = T.Cast("float32", qs[t * nr + j, g])
                if has_min:
                    for j in T.vectorized(nr):
                        wm[g * nr + j] = T.Cast("float32", qm[t * nr + j, g])
    # fmt: on

    return values


def _transpose_pattern(nr: int, b: int, upper: bool) -> list[int]:
    """Lane picks from the concatenation (row p, row p + b) for one butterfly step of an nr x nr transpose:
    the lower row keeps its lanes without bit b and takes the upper row's below them, the upper row the
    rest. After the steps b = nr/2 .. 1, row i holds what was column i."""
    if upper:
        return [lane + b if not lane & b else nr + lane for lane in range(nr)]
    return [lane if not lane & b else nr + lane - b for lane in range(nr)]


def transpose_in_registers(nr: int):
    """A TVMScript macro `(tr, tt)`: the nr x nr matrix in the local buffer tr (row i at i * nr, one vector)
    transposed in place by log2(nr) butterfly shuffle steps, tt the scratch; nr 8 or 16."""
    assert nr in (8, 16)
    pats = {b: (_transpose_pattern(nr, b, False), _transpose_pattern(nr, b, True)) for b in (8, 4, 2, 1)}

    def row(i):
        return T.ramp(i * nr, 1, nr)

    # fmt: off
    @T.macro
    def step(src, dst, b):  # one butterfly step over all row pairs (p, p + b)
        for i in T.unroll(nr // 2):
            lo_row: T.int32 = (i // b) * 2 * b + i % b
            dst[row(lo_row)] = T.Shuffle([src[row(lo_row)], src[row(lo_row + b)]], pats[b][0])
            dst[row(lo_row + b)] = T.Shuffle([src[row(lo_row)], src[row(lo_row + b)]], pats[b][1])

    @T.macro
    def transpose(tr, tt):
        if nr == 16:  # 4 steps: the columns end in tr
            step(tr, tt, 8)
            step(tt, tr, 4)
            step(tr, tt, 2)
            step(tt, tr, 1)
        else:  # 3 steps, then back into tr
            step(tr, tt, 4)
            step(tt, tr, 2)
            step(tr, tt, 1)
            for i in T.unroll(nr):
                tr[row(i)] = tt[row(i)]
    # fmt: on

    return transpose


def repack_tile(nr: int, n_words: int, width: int, eight: bool, post=None):
    """A TVMScript macro `(qw, qh, wp, t)` that repacks weight rows t * nr .. t * nr + nr - 1 for the
    prefill GEMMs: wp[(K/4) x nr] holds, per 4 k, the 4 u8 codes of each row (`four_codes`; GGUF Q8_0's
    words as they are), `post` applied to each word (None: as is). The rows are read in runs of nr
    words and transposed in registers (log2(nr) shuffle steps) rather than gathered a column (one word of
    each of nr rows) at a time; the last n_words % nr words are gathered."""
    post = post or (lambda v: v)
    full = n_words // nr * nr
    transpose = transpose_in_registers(nr)

    # fmt: off
    @T.macro
    def store(qw, qh, wp, t, w, word, j):
        if eight:
            wp[w * nr + j] = post(word)
        else:
            for h in T.unroll(2):  # k = 8w + 4h .. 8w + 4h + 3
                wp[(w * 2 + h) * nr + j] = post(four_codes(qw, qh, t * nr + j, w, h, width, word))

    @T.macro
    def repack(qw, qh, wp, t):
        for c in range(full // nr):
            tr = T.alloc_buffer((nr * nr,), "uint32", scope="local")
            tt = T.alloc_buffer((nr * nr,), "uint32", scope="local")
            for i in T.unroll(nr):
                tr[T.ramp(i * nr, 1, nr)] = qw[t * nr + i, T.ramp(c * nr, 1, nr)]
            transpose(tr, tt)
            for u in T.unroll(nr):  # tr row u: word c * nr + u of the nr weight rows
                for j in T.vectorized(nr):
                    store(qw, qh, wp, t, c * nr + u, tr[u * nr + j], j)
        for w in range(full, n_words):
            for j in T.vectorized(nr):
                store(qw, qh, wp, t, w, qw[t * nr + j, w], j)
    # fmt: on

    return repack


def scale_groups(q) -> tuple[int, int]:
    """(weights per weight scale, activations per activation scale) of a match for the prefill GEMMs: the
    layout's group for both, except K-quants: scales per 32 weights (Q6_K 16), x quantized per 32."""
    if q.q_sub is None:
        group = q.k // int(q.q_scale.shape[1])
        return group, group
    return (16 if q.q_min is None else 32), 32


def _qsub_byte(qsub, row, word, g) -> tirx.PrimExpr:
    """Byte g % 4 of q_sub word `word` of weight row `row`, as fp32."""
    return T.Cast("float32", T.shift_right(qsub[row, word], T.Cast("uint32", 8 * (g % 4))) & T.uint32(255))


def k_group_scale(qs, qsub, row, g, six: bool) -> tirx.PrimExpr:
    """A K-quant weight group's fp32 scale: Q4_K / Q5_K group g (of 32) d x sc, sc byte g % 8 of its
    super-block's 16 q_sub bytes; Q6_K group g (of 16) d x (byte g - 128)."""
    if six:
        return T.Cast("float32", qs[row, g // 16]) * (_qsub_byte(qsub, row, g // 4, g) - T.float32(128))
    return T.Cast("float32", qs[row, g // 8]) * _qsub_byte(qsub, row, g // 8 * 4 + g % 8 // 4, g)


def k_group_min(qm, qsub, row, g) -> tirx.PrimExpr:
    """Q4_K / Q5_K group g's fp32 min -dmin x m, m byte 8 + g % 8 of its super-block's q_sub bytes."""
    return -(T.Cast("float32", qm[row, g // 8]) * _qsub_byte(qsub, row, g // 8 * 4 + 2 + g % 8 // 4, g))


def check_layout(q, with_min: bool = False, with_q8: bool = False, with_k: bool = False) -> GroupLayout:
    """The match's storage layout, which must be one of HOST_Q4_LAYOUTS, or of HOST_Q4_MIN_LAYOUTS for a
    kernel that adds the min (`with_min`), of HOST_Q8_LAYOUTS for one that reads 8-bit codes (`with_q8`), of
    HOST_K_LAYOUTS for one that derives K-quants' group scales (`with_k`): the byte/nibble tricks below
    depend on it. The rules only match those, so this guards against a caller bypassing them."""
    allowed = HOST_Q4_LAYOUTS + (HOST_Q4_MIN_LAYOUTS if with_min else ())
    allowed += (HOST_Q8_LAYOUTS if with_q8 else ()) + (HOST_K_LAYOUTS if with_k else ())
    if q.layout not in allowed:
        raise ValueError(f"this host q4 kernel handles {allowed}, not {q.layout}")
    return q.layout


def quantize_x_vectors(k: int, zp: int, eight: bool, has_min: bool):
    """A TVMScript macro `(xf, m, g, qv, hv, xe, xo, xz, xs, xm)` for the decode GEMV: group g (32 values)
    of row m of the flat fp32 x rounded to int8 in 16-lane vectors, stored as the kernel reads it (see
    `q8_dot_gemv`): the codes in xe (and xo), and per int32 lane the zero-point term -zp x (sum of the codes
    it covers) in xz, the scale in xs, and with a min the scaled sum in xm. qv (32 int32) and hv (16 fp32)
    are scratch. Same values as one element at a time (max is exact, 127 / max the same fp32 division),
    without a division per element: this runs on one thread while the others wait."""
    n_chunks = k // (32 if eight else 64)
    per_lane = 4 if eight else 8  # codes an int32 lane covers (8-bit: 4 in order; 4-bit: 4 even + 4 odd)
    n_sums = 32 // per_lane  # lanes of the group
    rot = {b: rotation(16, b) for b in (8, 4, 2, 1)}

    def v16(buf, at):
        return buf[T.ramp(at, 1, 16)]

    def first_lane(m, g):  # the group's first int32 lane in xz / xs / xm
        return (m * n_chunks + g) * 8 if eight else (m * n_chunks + g // 2) * 8 + 4 * (g % 2)

    def lane_sums(qv):  # int32 x n_sums: lane u = qv[u * per_lane] + ... + qv[u * per_lane + per_lane - 1]
        parts = [
            T.Shuffle([v16(qv, 0), v16(qv, 16)], [u * per_lane + j for u in range(n_sums)])
            for j in range(per_lane)
        ]
        return functools.reduce(operator.add, parts)

    # fmt: off
    @T.macro
    def quantize(xf, m, g, qv, hv, xe, xo, xz, xs, xm):
        base: T.int32 = m * k + g * 32
        hv[T.ramp(0, 1, 16)] = T.max(T.abs(v16(xf, base)), T.abs(v16(xf, base + 16)))
        hv[T.ramp(0, 1, 16)] = T.max(v16(hv, 0), T.Shuffle([v16(hv, 0), v16(hv, 0)], rot[8]))
        hv[T.ramp(0, 1, 16)] = T.max(v16(hv, 0), T.Shuffle([v16(hv, 0), v16(hv, 0)], rot[4]))
        hv[T.ramp(0, 1, 16)] = T.max(v16(hv, 0), T.Shuffle([v16(hv, 0), v16(hv, 0)], rot[2]))
        hv[T.ramp(0, 1, 16)] = T.max(v16(hv, 0), T.Shuffle([v16(hv, 0), v16(hv, 0)], rot[1]))
        inv: T.float32 = T.Select(hv[0] > T.float32(0), T.float32(127) / hv[0], T.float32(0))
        for h in T.unroll(2):
            qv[T.ramp(16 * h, 1, 16)] = T.Cast("int32x16", T.nearbyint(
                v16(xf, base + 16 * h) * T.broadcast(inv, 16)))
        if eight:  # chunk g, codes in order
            for h in T.unroll(2):
                xe[T.ramp((m * n_chunks + g) * 32 + 16 * h, 1, 16)] = T.Cast("int8x16", v16(qv, 16 * h))
        else:  # chunk g // 2, bytes 16 (g % 2) ..: even k to xe, odd k to xo
            at: T.int32 = (m * n_chunks + g // 2) * 32 + 16 * (g % 2)
            xe[T.ramp(at, 1, 16)] = T.Cast("int8x16", T.Shuffle(
                [v16(qv, 0), v16(qv, 16)], list(range(0, 32, 2))))
            xo[T.ramp(at, 1, 16)] = T.Cast("int8x16", T.Shuffle(
                [v16(qv, 0), v16(qv, 16)], list(range(1, 32, 2))))
        xs[T.ramp(first_lane(m, g), 1, n_sums)] = T.broadcast(hv[0] / T.float32(127), n_sums)
        xz[T.ramp(first_lane(m, g), 1, n_sums)] = lane_sums(qv) * T.broadcast(T.int32(-zp), n_sums)
        if has_min:  # x as rounded for the codes: the product's error follows |w|, not |code|
            xm[T.ramp(first_lane(m, g), 1, n_sums)] = T.broadcast(hv[0] / T.float32(127), n_sums) * T.Cast(
                f"float32x{n_sums}", lane_sums(qv))
    # fmt: on

    return quantize


def row_sums_in_registers(nr: int):
    """A TVMScript macro `(tr)`: the nr rows of the local buffer tr (row i at i * nr, one vector) summed
    lane-wise into row 0, lane i = the sum of row i: log2(nr) butterfly steps, each adding two shuffles of
    a row pair (nr - 1 pairs in all; a horizontal sum per row costs about as many per row); nr 8 or 16."""
    assert nr in (8, 16)
    pats = {b: (_transpose_pattern(nr, b, False), _transpose_pattern(nr, b, True)) for b in (8, 4, 2, 1)}

    def row(i):
        return T.ramp(i * nr, 1, nr)

    # fmt: off
    @T.macro
    def step(tr, b):  # rows r and r + b -> row r (the lanes with bit b set: row r + b's)
        for r in T.unroll(b):
            tr[row(r)] = T.Shuffle([tr[row(r)], tr[row(r + b)]], pats[b][0]) + T.Shuffle(
                [tr[row(r)], tr[row(r + b)]], pats[b][1])

    @T.macro
    def row_sums(tr):
        if nr == 16:
            step(tr, 8)
        step(tr, 4)
        step(tr, 2)
        step(tr, 1)
    # fmt: on

    return row_sums


def rotation(lanes: int, b: int) -> list[int]:
    """Lane picks that rotate a vector by b lanes (a shuffle of the vector with itself)."""
    return [(lane + b) % lanes for lane in range(lanes)]


def _lane_sum(acc, base, lanes: int) -> tirx.PrimExpr:
    """acc[base] + ... + acc[base + lanes - 1] as a balanced tree (independent adds)."""
    terms = [acc[base + i] for i in range(lanes)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    return terms[0]


def steps_through(isa: str, layout: GroupLayout, k: int) -> bool:
    """Whether `q8_dot_gemv`'s `isa` path can step through K for `layout`: whole steps, or, for 4-bit
    codes without K-quants' super-blocks on a 512-bit x86 path, whole steps and one half step (a 64-chunk
    on 256-bit registers) at the end."""
    step = layout.elems_per_word * Q8_DOT_LANES[isa]
    if k % step == 0:
        return True
    wide = Q8_DOT_LANES[isa] == 16  # the x86 512-bit paths (arm64's have 8 lanes)
    return wide and layout.bits == 4 and layout not in HOST_K_LAYOUTS and k % (step // 2) == 0


@memo_kernel(derived=("q",))
def q8_dot_gemv(
    func: tirx.PrimFunc,
    q,
    *,
    isa: str = "avx2",
    rows: int = 1,
    tile: int = 16,
    prefetch: int = 0,
    prefetch_level: int = 1,
) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x, q_weight, q_scale, out, optional residual `other`) as the int8
    dot-product kernel for `isa` (a `cpu_isa.Q8_DOT_ISAS` key): same parameters, same result up to
    activation rounding.

    rows: weight rows per x load (1 streams the weights strictly in memory order, which the hardware
    prefetcher follows best: 8.2 GB/s vs 4.3 for 4 rows); tile: rows per parallel task; prefetch: bytes
    of the weight stream a software prefetch runs ahead of the loads (0: none), the scale stream the same
    number of rows ahead; prefetch_level: the cache level those lines go to (1: L1, which the activations
    and accumulators share, so a long distance evicts them; 2: L2). One row of x only: the batched path
    does several times the work per byte."""
    lay = check_layout(q, with_min=True, with_q8=True, with_k=True)
    kq = q.q_sub is not None  # K-quants: sub-blocks whose scale (and min) come from super-block values
    gs, zp, has_min, eight = 32 if kq else lay.group_size, lay.zero_point, q.q_min is not None, lay.bits == 8
    six = kq and not has_min  # Q6_K: a signed scale per 16 weights (2 lanes), zero point 32
    lanes = Q8_DOT_LANES[isa]
    span = lanes // 8  # chunks per step: 64 weights each with 4-bit codes, 32 (one group) with 8-bit
    n, k = q.n, q.k
    chunk = 32 if eight else 64
    assert steps_through(isa, lay, k) and n % tile == 0 and tile % rows == 0
    n_groups, n_words, n_chunks = k // gs, k // lay.elems_per_word, k // chunk
    n_steps = n_chunks // span
    # K an odd number of 64-chunks on a 512-bit path (SmolLM2's 576): the last chunk is a step of half width
    tail, half = n_chunks % span == 1, lanes // 2
    lanes_per_group = 8 if eight else 4
    step_groups = lanes // lanes_per_group
    m_shape = list(q.x.shape)[:-1]
    n_rows = functools.reduce(operator.mul, m_shape, 1)  # rows of x (PrimExpr when dynamic)
    x_shape, out_shape = [*m_shape, k], [*m_shape, n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)
    qs_shape = (n, int(q.q_scale.shape[1]))
    qsub_shape = (n, int(q.q_sub.shape[1])) if kq else (1, 1)
    scale_stream = not kq
    # Q5_K / Q6_K: each lane's 8 top-bit fields (`width` bits each) from the high plane (4 / width lanes
    # a word)
    width = lay.high_bits if q.q_high is not None else 0
    qh_shape = (n, int(q.q_high.shape[1])) if width else (1, 1)
    per_high = 4 // width if width else 1
    scale_lanes = [i // lanes_per_group for i in range(lanes)]
    lane_sum = _lane_sum
    if eight and isa.startswith("neon"):
        from .cpu_arm_dot import GEMV_DOTS8

        dot = GEMV_DOTS8[isa]
    elif eight:
        assert isa != "avx512bw", "8-bit codes take the avx2 path: vpsignb has no 512-bit form"
        dot = _dot8_avx2 if isa == "avx2" else functools.partial(_dot8_vnni, lanes=lanes)
    elif isa in MADDUBS_ISAS:
        dot = functools.partial(_dot_maddubs, lanes=lanes)
    elif isa.startswith("neon"):
        from .cpu_arm_dot import GEMV_DOTS  # arm64 steps on the same layout (imports this module)

        dot = GEMV_DOTS[isa]
    else:
        dot = functools.partial(_dot_vnni, lanes=lanes)
    # the half-width tail step: the same instructions on 256-bit registers (AVX-512 VL / AVX2)
    half_dot = functools.partial(_dot_maddubs if isa in MADDUBS_ISAS else _dot_vnni, lanes=half)

    def spread(values: tirx.PrimExpr, w: int = lanes) -> tirx.PrimExpr:
        """A step's per-group fp32 values (float32 x its groups), each over its lanes (w of them)."""
        if w // lanes_per_group == 1:
            return T.broadcast(values, w)
        return T.Shuffle([values] * lanes_per_group, scale_lanes[:w])

    def per_lane(buf, row, b, w: int = lanes) -> tirx.PrimExpr:
        """Step b's per-group values of `buf` (scales or mins) as fp32, each over its lanes (a step of w
        lanes: the tail's are the first groups of a full step's)."""
        groups = w // lanes_per_group
        if groups == 1:
            return spread(T.Cast("float32", buf[row, b]), w)
        return spread(T.Cast(f"float32x{groups}", buf[row, T.ramp(b * step_groups, 1, groups)]), w)

    assert gs == 32, gs  # x is quantized per 32 (every host layout's group, and K-quants' sub-block)
    quantize_x = quantize_x_vectors(k, zp, eight, has_min)
    steps_per_sb = 256 // (8 * lanes)  # K-quants: steps per super-block
    n_sb, k_min = k // 256, kq and has_min  # Q4_K / Q5_K: mins added per super-block (`k_mins`)

    def k_values(qsub, qs, qm, row, sb) -> tirx.PrimExpr:
        """A K-quant super-block's 16 per-sub-block values, fp32, in one vector: Q4_K / Q5_K the 8 scales
        d x sc then the 8 mins -dmin x m (its 16 q_sub bytes in that order); Q6_K the 16 scales d x sc."""
        words = qsub[row, T.ramp(sb * 4, 1, 4)]
        if six:
            signed = T.reinterpret("int8x16", words ^ T.broadcast(T.uint32(0x80808080), 4))
            return T.Cast("float32x16", signed) * T.broadcast(T.Cast("float32", qs[row, sb]), 16)
        d, dmin = T.Cast("float32", qs[row, sb]), T.Cast("float32", qm[row, sb]) * T.float32(-1.0)
        dd = T.Shuffle([T.broadcast(d, 8), T.broadcast(dmin, 8)], list(range(16)))
        return T.Cast("float32x16", T.reinterpret("uint8x16", words)) * dd

    def k_scales(ks, at, b) -> tirx.PrimExpr:
        """Step b's sub-block scales over their lanes from a row's `k_values` stored at ks[at]."""
        j = b % steps_per_sb
        if six:
            n_sub = lanes // 2
            return T.Shuffle([ks[T.ramp(at + j * n_sub, 1, n_sub)]] * 2, [i // 2 for i in range(lanes)])
        return spread(ks[T.ramp(at + j * step_groups, 1, step_groups)])

    def k_mins(ks, r, xk, m, b) -> tirx.PrimExpr:
        """Q4_K / Q5_K: the mins of weight row r's super-block (`k_values` at ks[16 r]) times x row m's group
        sums (`xk`), in the last `lanes` of the 16 (for 16 lanes the first 8 are scales times xk's zeros):
        once per super-block (step b its first), not per step."""
        off, sb = 16 - lanes, b // steps_per_sb
        return ks[T.ramp(r * 16 + off, 1, lanes)] * xk[T.ramp((m * n_sb + sb) * 16 + off, 1, lanes)]

    def term(qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, row, m, b, ks, at, w=lanes) -> tirx.PrimExpr:
        """Weight row `row`'s step `b` against row `m` of x: the integer dot products as fp32, times the
        weight and activation scales, plus the mins times the activation sums with a min (one expression:
        vector temporaries would become heap workspace). K-quants: the scales from the row's super-block
        values at ks[at] (`k_values`, stored once per super-block), the mins added per super-block. w: the
        step's lanes (half of them for the tail step)."""
        c = m * n_chunks + b * span  # the step's first chunk in x's quantized buffers
        words = qw[row, T.ramp(b * lanes, 1, w)]
        if width:
            # each lane's 8 x width bits, zero-extended (one vpmovzx{b,w}d from memory)
            high = qh[row, T.ramp(b * (lanes // per_high), 1, lanes // per_high)]
            high = T.Cast(f"uint32x{lanes}", T.reinterpret(f"uint{8 * width}x{lanes}", high))
            words = (words, high, width)
        start = xz[T.ramp(c * 8, 1, w)] if zp else T.broadcast(T.int32(0), w)  # the zero-point term
        d = (dot if w == lanes else half_dot)(
            words, xe[T.ramp(c * 32, 1, w * 4)], xo[T.ramp(c * 32, 1, w * 4)], start
        )
        if kq:
            scales, mins = k_scales(ks, at, b), None
        else:
            scales, mins = per_lane(qs, row, b, w), per_lane(qm, row, b, w) if has_min else None
        scaled = T.Cast(f"float32x{w}", d) * (scales * xs[T.ramp(c * 8, 1, w)])
        return scaled + mins * xm[T.ramp(c * 8, 1, w)] if mins is not None else scaled

    w_rows = BATCH_W_ROWS if tile % BATCH_W_ROWS == 0 else 1
    # prefetch distances in elements, clamped to each buffer's last element (an address past the end would
    # not fault, but the buffer would be lying about its size); one scale prefetch per 64-byte line
    pf_words, scale_bytes = prefetch // 4, int(scale_dtype[5:]) // 8
    pf_scales = pf_words * n_groups // n_words
    pf_every = max(1, 64 // (step_groups * scale_bytes))
    # Q5_K / Q6_K: the high-bit plane is a second weight stream, prefetched as far ahead (once per line)
    has_high, n_hwords, step_hwords = width > 0, qh_shape[1], lanes // per_high
    pf_high, high_every = pf_words * n_hwords // n_words, max(1, 16 // step_hwords)
    if prefetch_level not in PREFETCH_LOCALITY:
        raise ValueError(f"prefetch_level must be one of {sorted(PREFETCH_LOCALITY)}, got {prefetch_level}")
    locality = PREFETCH_LOCALITY[prefetch_level]

    # fmt: off
    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer(qs_shape, scale_dtype), qm: T.Buffer(qs_shape, scale_dtype),
               qsub: T.Buffer(qsub_shape, "uint32"), qh: T.Buffer(qh_shape, "uint32"),
               other: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        xm = T.alloc_buffer((n_rows * n_chunks * 8 if has_min else 1,), "float32")  # a lane's sum of x
        # Q4_K / Q5_K: per super-block 8 zeros, then its 8 group sums of x (`k_mins`)
        xk = T.alloc_buffer((n_rows * n_sb * 16 if k_min else 1,), "float32")
        xe = T.alloc_buffer((n_rows * n_chunks * 32,), "int8")  # even k of each 64-chunk (8-bit: all k)
        xo = T.alloc_buffer((n_rows * n_chunks * 32 if not eight else 1,), "int8")  # odd k
        xz = T.alloc_buffer((n_rows * n_chunks * 8,), "int32")  # -zp * sum of the activations a lane covers
        xs = T.alloc_buffer((n_rows * n_chunks * 8,), "float32")  # activation scale of a lane's group
        qv = T.alloc_buffer((32,), "int32")  # global scope + under 1 KB: on the stack
        hv = T.alloc_buffer((16,), "float32")
        # 1. quantize x per 32-group (K values per row: small next to the N x K weights, if vectorized)
        for m in range(n_rows):
            for g in range(n_groups):
                quantize_x(xf, m, g, qv, hv, xe, xo, xz, xs, xm)
            if k_min:  # group g of super-block sb: the 4 lanes of chunk 4sb + g // 2 from lane 4 (g % 2)
                for sb in range(n_sb):
                    for g in range(8):
                        xk[(m * n_sb + sb) * 16 + g] = T.float32(0)
                        xk[(m * n_sb + sb) * 16 + 8 + g] = _lane_sum(
                            xm, (m * n_chunks + sb * 4 + g // 2) * 8 + 4 * (g % 2), 4)
        # 2. rows of W: `lanes` fp32 lane accumulators per row, summed at the end. One row of x (decode of
        # one sequence): W streamed once, in order. Several rows (batched decode): each pair of W rows is
        # applied to every row of x while it sits in L1 (one pass over W, not one per row), BATCH_BLOCK rows
        # of x at a time in unrolled register accumulators, the rest one by one. Every (x row, W row) takes
        # the one-row kernel's expression (`term`) in its order, so batched results are bit-identical
        if n_rows > 1:
            for t in T.parallel(n // tile):
                # global scope + under 1 KB: a stack alloca (a "local" buffer here is heap workspace per task)
                acc_b = T.alloc_buffer((w_rows * BATCH_BLOCK * lanes,), "float32")
                ks_b = T.alloc_buffer((w_rows * 16 if kq else 1,), "float32")  # K-quants: `k_values` per row
                for r0 in range(tile // w_rows):
                    for mb in range(n_rows // BATCH_BLOCK):
                        for j in T.unroll(w_rows * BATCH_BLOCK):
                            acc_b[T.ramp(j * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for b in range(n_steps):
                            if kq:  # a K-quant super-block's values once, for its steps
                                if b % steps_per_sb == 0:
                                    for r in T.unroll(w_rows):
                                        ks_b[T.ramp(r * 16, 1, 16)] = k_values(
                                            qsub, qs, qm, t * tile + r0 * w_rows + r, b // steps_per_sb)
                                    if k_min:
                                        for mi in T.unroll(BATCH_BLOCK):
                                            for r in T.unroll(w_rows):
                                                acc_b[T.ramp((r * BATCH_BLOCK + mi) * lanes, 1, lanes)] = (
                                                    acc_b[T.ramp((r * BATCH_BLOCK + mi) * lanes, 1, lanes)]
                                                    + k_mins(ks_b, r, xk, mb * BATCH_BLOCK + mi, b))
                            for mi in T.unroll(BATCH_BLOCK):
                                for r in T.unroll(w_rows):
                                    acc_b[T.ramp((r * BATCH_BLOCK + mi) * lanes, 1, lanes)] = acc_b[T.ramp(
                                        (r * BATCH_BLOCK + mi) * lanes, 1, lanes)] + term(
                                        qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, t * tile + r0 * w_rows + r,
                                        mb * BATCH_BLOCK + mi, b, ks_b, r * 16)
                        if tail:  # into the first half of each accumulator
                            for mi in T.unroll(BATCH_BLOCK):
                                for r in T.unroll(w_rows):
                                    acc_b[T.ramp((r * BATCH_BLOCK + mi) * lanes, 1, half)] = acc_b[T.ramp(
                                        (r * BATCH_BLOCK + mi) * lanes, 1, half)] + term(
                                        qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, t * tile + r0 * w_rows + r,
                                        mb * BATCH_BLOCK + mi, n_steps, ks_b, r * 16, half)
                        for r in T.unroll(w_rows):
                            for mi in T.unroll(BATCH_BLOCK):
                                o_b: T.int32 = (mb * BATCH_BLOCK + mi) * n + t * tile + r0 * w_rows + r
                                s_b: T.float32 = lane_sum(acc_b, (r * BATCH_BLOCK + mi) * lanes, lanes)
                                if has_other:
                                    oth_b = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                    if other_first:
                                        of[o_b] = oth_b[o_b] + s_b
                                    else:
                                        of[o_b] = s_b + oth_b[o_b]
                                else:
                                    of[o_b] = s_b
                    for m in range(n_rows - n_rows % BATCH_BLOCK, n_rows):
                        for r in T.unroll(w_rows):
                            acc_b[T.ramp(r * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for b in range(n_steps):
                            if kq:
                                if b % steps_per_sb == 0:
                                    for r in T.unroll(w_rows):
                                        ks_b[T.ramp(r * 16, 1, 16)] = k_values(
                                            qsub, qs, qm, t * tile + r0 * w_rows + r, b // steps_per_sb)
                                        if k_min:
                                            acc_b[T.ramp(r * lanes, 1, lanes)] = acc_b[T.ramp(
                                                r * lanes, 1, lanes)] + k_mins(ks_b, r, xk, m, b)
                            for r in T.unroll(w_rows):
                                acc_b[T.ramp(r * lanes, 1, lanes)] = acc_b[T.ramp(r * lanes, 1, lanes)] + (
                                    term(qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm,
                                         t * tile + r0 * w_rows + r, m, b, ks_b, r * 16))
                        if tail:
                            for r in T.unroll(w_rows):
                                acc_b[T.ramp(r * lanes, 1, half)] = acc_b[T.ramp(r * lanes, 1, half)] + term(
                                    qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, t * tile + r0 * w_rows + r, m,
                                    n_steps, ks_b, r * 16, half)
                        for r in T.unroll(w_rows):
                            o_t: T.int32 = m * n + t * tile + r0 * w_rows + r
                            s_t: T.float32 = lane_sum(acc_b, r * lanes, lanes)
                            if has_other:
                                oth_t = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                if other_first:
                                    of[o_t] = oth_t[o_t] + s_t
                                else:
                                    of[o_t] = s_t + oth_t[o_t]
                            else:
                                of[o_t] = s_t
        else:
            for t in T.parallel(n // tile):
                acc = T.alloc_buffer((rows * lanes,), "float32")  # stack, as acc_b
                ks = T.alloc_buffer((rows * 16 if kq else 1,), "float32")  # K-quants: `k_values` per row
                for m in range(n_rows):
                    for r0 in range(tile // rows):
                        for r in T.unroll(rows):
                            acc[T.ramp(r * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for b in range(n_steps):
                            if pf_words > 0:
                                # the hardware prefetcher alone keeps too few lines in flight for one core
                                # (T.address_of a 1-D view: the 2-D index would not cross rows)
                                qw_flat = T.decl_buffer((n * n_words,), "uint32", data=qw.data)
                                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                    qw_flat[T.min((t * tile + r0 * rows) * n_words + b * lanes + pf_words,
                                                  n * n_words - 1)]), 0, locality, 1))
                                if scale_stream:  # one fp16 scale per 32-group (not Q4_K's super-blocks)
                                    if b % pf_every == 0:
                                        qs_flat = T.decl_buffer((n * n_groups,), scale_dtype, data=qs.data)
                                        T.evaluate(T.call_llvm_intrin(
                                            "void", "llvm.prefetch.p0", T.address_of(qs_flat[T.min(
                                                (t * tile + r0 * rows) * n_groups + b * step_groups
                                                + pf_scales, n * n_groups - 1)]), 0, locality, 1))
                                if has_high:
                                    if b % high_every == 0:
                                        qh_flat = T.decl_buffer((n * n_hwords,), "uint32", data=qh.data)
                                        T.evaluate(T.call_llvm_intrin(
                                            "void", "llvm.prefetch.p0", T.address_of(qh_flat[T.min(
                                                (t * tile + r0 * rows) * n_hwords + b * step_hwords + pf_high,
                                                n * n_hwords - 1)]), 0, locality, 1))
                            if kq:  # a K-quant super-block's values once, for its steps
                                if b % steps_per_sb == 0:
                                    for r in T.unroll(rows):
                                        ks[T.ramp(r * 16, 1, 16)] = k_values(
                                            qsub, qs, qm, t * tile + r0 * rows + r, b // steps_per_sb)
                                        if k_min:
                                            acc[T.ramp(r * lanes, 1, lanes)] = acc[T.ramp(
                                                r * lanes, 1, lanes)] + k_mins(ks, r, xk, m, b)
                            for r in T.unroll(rows):
                                # one expression, no vector temporaries: TVMScript would give each its own
                                # buffer, which LowerTVMBuiltin turns into heap workspace (1.7x slower)
                                acc[T.ramp(r * lanes, 1, lanes)] = acc[T.ramp(r * lanes, 1, lanes)] + term(
                                    qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, t * tile + r0 * rows + r, m, b,
                                    ks, r * 16)
                        if tail:
                            for r in T.unroll(rows):
                                acc[T.ramp(r * lanes, 1, half)] = acc[T.ramp(r * lanes, 1, half)] + term(
                                    qw, qs, qm, qsub, qh, xe, xo, xz, xs, xm, t * tile + r0 * rows + r, m,
                                    n_steps, ks, r * 16, half)
                        for r in T.unroll(rows):
                            if has_other:
                                oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                                if other_first:
                                    of[m * n + t * tile + r0 * rows + r] = oth[
                                        m * n + t * tile + r0 * rows + r] + lane_sum(acc, r * lanes, lanes)
                                else:
                                    of[m * n + t * tile + r0 * rows + r] = lane_sum(
                                        acc, r * lanes, lanes) + oth[m * n + t * tile + r0 * rows + r]
                            else:
                                of[m * n + t * tile + r0 * rows + r] = lane_sum(acc, r * lanes, lanes)
    # fmt: on

    return with_params_of(func, q, kernel)


def with_params_of(func: tirx.PrimFunc, q, kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """`kernel`'s parameters (named x, qw, qs, [qm, qsub,] other, out) in `func`'s order and with `func`'s
    attributes (a private Relax kernel has no global symbol). Those the match lacks (a residual `other`, a
    min `qm`, K-quant bytes `qsub`) are dropped: the body never reads them (their branches were resolved
    when parsing)."""
    role = {"x": q.x, "qw": q.q_weight, "qs": q.q_scale, "out": q.out, "other": q.other}
    role |= {
        "qm": getattr(q, "q_min", None),
        "qsub": getattr(q, "q_sub", None),
        "qh": getattr(q, "q_high", None),
    }
    mine = {p.name: p for p in kernel.params}
    missing = [name for name, theirs in role.items() if theirs is not None and name not in mine]
    if missing:
        raise ValueError(f"this kernel has no {missing} parameter")
    by_role = [(theirs, mine[name]) for name, theirs in role.items() if theirs is not None]
    order = [next(m for theirs, m in by_role if theirs.same_as(p)) for p in func.params]
    attrs = dict(func.attrs.items()) if func.attrs is not None else {}
    attrs.update({"tirx.is_scheduled": True, "tirx.noalias": True})
    return tirx.PrimFunc(order, kernel.body, kernel.ret_type).with_attrs(attrs)
