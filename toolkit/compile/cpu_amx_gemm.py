"""q4 dequant-GEMM for prefill on AMX tiles (`tdpbssd`): the int8 GEMM of `cpu_q8_gemm` with the dot
products done by the tile unit of Sapphire-Rapids-class CPUs.

One `tdpbssd` multiplies a tile of 16 rows of x (int8, one weight group of K per row) by the group's codes
of 16 weight rows, laid out as `cpu_q8_gemm` lays them for `vpdpbusd` ([K/4, 16 rows, 4 k]: the B-tile
layout), into 16 x 16 int32 sums: 16 x 16 x 32 multiply-adds per instruction where `vpdpbusd` does 16 x 4.
Both operands are signed, so each code gets its zero point taken off while repacking (codes are below 128,
and (c | 0x80) - zp never borrows across bytes) and the sums need no zero-point term. Each group's sums are
stored to memory and scaled into fp32 accumulators, one vector per row of x over the 16 weight rows, as
`cpu_q8_gemm` does: weight scale x activation scale, plus min x the group's sum of x for layouts with mins
(GGUF Q4_1, Q4_K, Q5_K). x is quantized per 32-group as for `vpdpbusd`, into blocks of 16 rows stored
tile by tile ([row block, weight group, 16 rows, group bytes]) so each A tile is one contiguous run; rows
past the last are zeros.

Linux hands out the tile registers only to a process that asks (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XTILEDATA)`; without it the first tile instruction raises SIGILL): the kernel asks on every call, which
costs one system call and is a no-op once granted, and fails with an error where the OS refuses. Each
parallel task loads its own tile configuration (tile state is per thread) and releases it at the end.

Per block of x rows the tile products run one group ahead of the scaling (group g's product is stored
while group g - 1's is scaled, from a second buffer); the fp32 sums stay in registers.

Numerics: the integer sums are exact and the same as `cpu_q8_gemm`'s; the result equals it up to fp32
summation order."""

from __future__ import annotations

import functools
import operator

from tvm import tirx
from tvm.script import tirx as T

from ..hostinfo import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA
from ..kernel_memo import memo_kernel
from .cpu_q8_gemv import (
    check_layout,
    pack_four,
    quantize_x_group,
    repack_tile,
    scale_groups,
    weight_group_values,
    with_params_of,
)

TILE_ROWS = 16  # rows of x per A tile, and weight rows per B tile (16 int32 columns of 64 bytes)
TMM_C, TMM_A, TMM_B = 0, 1, 2  # the tile registers used: sums, x, codes
NO_TILES = (
    "the OS refused this process the AMX tile registers (Linux grants them on request from 5.16): this "
    "library's prefill kernels were built for a CPU with AMX and need them"
)


def tile_config(wg: int) -> list[int]:
    """The 64-byte tile configuration (palette 1) as 8 little-endian uint64 words: C 16 rows x 64 bytes,
    A 16 rows x `wg` bytes (one weight group of int8 x), B `wg` / 4 rows x 64 bytes; every other byte zero
    (ldtilecfg reads all 64)."""
    shapes = {TMM_C: (TILE_ROWS, 64), TMM_A: (TILE_ROWS, wg), TMM_B: (wg // 4, 64)}
    values = [0] * 64
    values[0] = 1
    for tmm, (rows, colsb) in shapes.items():
        values[16 + 2 * tmm], values[17 + 2 * tmm], values[48 + tmm] = colsb % 256, colsb // 256, rows
    return [int.from_bytes(bytes(values[8 * i : 8 * i + 8]), "little") for i in range(8)]


def _config_word(words: list[int], i) -> tirx.PrimExpr:
    """Word `i` of the configuration (a constant once the loop over i is unrolled)."""
    expr = T.uint64(words[-1])
    for j in range(len(words) - 2, -1, -1):
        expr = T.Select(i == j, T.uint64(words[j]), expr)
    return expr


@memo_kernel(derived=("q",))
def q8_amx_gemm(func: tirx.PrimFunc, q) -> tirx.PrimFunc:
    """`func` (a `_Q4Matmul` match `q`: x [.., M, K], q_weight, q_scale, out, optional residual) as the AMX
    kernel: same parameters, same result as `cpu_q8_gemm.q8_vnni_gemm` up to fp32 summation order."""
    NR = MR = TILE_ROWS  # noqa: N806 - constants of the kernel below
    HALF = MR // 2  # noqa: N806
    lay = check_layout(q, with_min=True, with_q8=True, with_k=True)
    kq = q.q_sub is not None
    epw, zp = lay.elems_per_word, lay.zero_point
    has_min = q.q_min is not None
    six = kq and not has_min
    wg, gs = scale_groups(q)
    per_wg, qpg = gs // wg, wg // 4  # weight groups per activation group; int32 words of 4 k per group
    eight = lay.bits == 8
    n, k = q.n, q.k
    assert n % NR == 0 and k % gs == 0 and wg % 4 == 0
    n_groups, n_words, n_quads, n_wg = k // gs, k // epw, k // 4, k // wg
    m_shape = list(q.x.shape)[:-1]
    n_rows = functools.reduce(operator.mul, m_shape, 1)
    n_blocks = (n_rows + MR - 1) // MR
    x_shape, out_shape = [*m_shape, k], [*m_shape, n]
    has_other, other_first = q.other is not None, q.other_first
    scale_dtype = str(q.q_scale.dtype)
    qs_shape = (n, int(q.q_scale.shape[1]))
    qsub_shape = (n, int(q.q_sub.shape[1])) if kq else (1, 1)
    width = lay.high_bits if q.q_high is not None else 0
    qh_shape = (n, int(q.q_high.shape[1])) if width else (1, 1)
    config = tile_config(wg)
    # (c | 0x80) - zp, then the top bit flipped back: c - zp per byte, no borrow (c < 128, zp <= 128)
    flip, zp4 = T.uint32(0x80808080), T.uint32(0x01010101 * zp)
    quantize = quantize_x_group(k, gs, has_min)
    group_values = weight_group_values(NR, n_wg, kq, has_min, six)
    if eight:  # 4 codes c (x - 128 stored as c): c - 128 is the top bit flipped
        repack = repack_tile(NR, n_words, width, eight, lambda v: v ^ flip)
    else:
        repack = repack_tile(NR, n_words, width, eight, (lambda v: ((v | flip) - zp4) ^ flip) if zp else None)

    # fmt: off
    @T.macro
    def scale(acc, r0, cb, ws, wm, xs, xm, g, mo):  # rows r0 .. r0 + HALF - 1 of group g's stored C tile
        for i in T.unroll(HALF):
            acc[T.ramp(i * NR, 1, NR)] = acc[T.ramp(i * NR, 1, NR)] + T.Cast(
                f"float32x{NR}", cb[T.ramp(g % 2 * MR * NR + (r0 + i) * NR, 1, NR)]) * (
                ws[T.ramp(g * NR, 1, NR)] * T.broadcast(xs[(mo * MR + r0 + i) * n_groups + g // per_wg], NR))
            if has_min:
                acc[T.ramp(i * NR, 1, NR)] = acc[T.ramp(i * NR, 1, NR)] + wm[
                    T.ramp(g * NR, 1, NR)] * T.broadcast(xm[(mo * MR + r0 + i) * n_groups + g], NR)

    @T.macro
    def write(acc, r0, mo, t, of, other):
        for i in T.unroll(HALF):
            if mo * MR + r0 + i < n_rows:
                for j in T.vectorized(NR):
                    if has_other:
                        oth = T.decl_buffer((n_rows * n,), "float32", data=other.data)
                        if other_first:
                            of[(mo * MR + r0 + i) * n + t * NR + j] = (
                                oth[(mo * MR + r0 + i) * n + t * NR + j] + acc[i * NR + j])
                        else:
                            of[(mo * MR + r0 + i) * n + t * NR + j] = (
                                acc[i * NR + j] + oth[(mo * MR + r0 + i) * n + t * NR + j])
                    else:
                        of[(mo * MR + r0 + i) * n + t * NR + j] = acc[i * NR + j]

    @T.prim_func(private=True)
    def kernel(x: T.Buffer(x_shape, "float32"), qw: T.Buffer((n, n_words), "uint32"),
               qs: T.Buffer(qs_shape, scale_dtype), qm: T.Buffer(qs_shape, scale_dtype),
               qsub: T.Buffer(qsub_shape, "uint32"), qh: T.Buffer(qh_shape, "uint32"),
               other: T.Buffer(out_shape, "float32"), out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xf = T.decl_buffer((n_rows * k,), "float32", data=x.data)
        of = T.decl_buffer((n_rows * n,), "float32", data=out.data)
        # x by tiles: [row block, weight group, 16 rows, qpg words of 4 int8]
        xb = T.alloc_buffer((n_blocks * MR * n_quads,), "uint32", align=64)
        xs = T.alloc_buffer((n_blocks * MR * n_groups,), "float32")  # a row's group scale
        xm = T.alloc_buffer((n_blocks * MR * n_groups if has_min else 1,), "float32")  # its group sum of x
        assert T.call_extern("int64", "syscall", T.int64(SYS_ARCH_PRCTL), T.int64(ARCH_REQ_XCOMP_PERM),
                             T.int64(XFEATURE_XTILEDATA)) == T.int64(0), NO_TILES
        # 1. quantize x per 32-group (rows in parallel); rows past the last are zeros
        for m in T.parallel(n_blocks * MR):
            amax = T.alloc_buffer((1,), "float32", scope="local")
            qv = T.alloc_buffer((gs,), "int32", scope="local")
            for g in range(n_groups):
                if m < n_rows:
                    quantize(xf, m, g, amax, qv, xs, xm)
                else:
                    for i in range(gs):
                        qv[i] = 0
                    xs[m * n_groups + g] = T.float32(0)
                    if has_min:
                        xm[m * n_groups + g] = T.float32(0)
                for j in range(gs // 4):
                    xb[((m // MR * n_wg + (g * gs + 4 * j) // wg) * MR + m % MR) * qpg + j % qpg] = pack_four(
                        qv, j)
        # 2. per tile of 16 weight rows: repack as signed codes, then for each block of 16 rows of x one
        # tile product per weight group
        for t in T.parallel(n // NR):
            cfg = T.alloc_buffer((8,), "uint64", align=64)
            wp = T.alloc_buffer((n_quads * NR,), "uint32", align=64)  # [K/4, 16 rows]: 4 int8 codes per word
            ws = T.alloc_buffer((n_wg * NR,), "float32")  # [weight groups, 16 rows] weight scales
            wm = T.alloc_buffer((n_groups * NR if has_min else 1,), "float32")  # and mins
            cb = T.alloc_buffer((2 * MR * NR,), "int32", align=64)  # two C tiles, stored for scaling
            # the fp32 sums in two halves: below TVM's 1 KiB limit for stack buffers, so LLVM keeps them in
            # registers (one buffer of 16 x 16 went to a heap workspace: a load and a store per row and group)
            acc0 = T.alloc_buffer((HALF * NR,), "float32")
            acc1 = T.alloc_buffer((HALF * NR,), "float32")
            for i in T.unroll(8):
                cfg[i] = _config_word(config, i)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            repack(qw, qh, wp, t)
            group_values(qs, qm, qsub, ws, wm, t)
            for mo in range(n_blocks):
                for i in T.unroll(HALF):
                    acc0[T.ramp(i * NR, 1, NR)] = T.broadcast(T.float32(0), NR)
                    acc1[T.ramp(i * NR, 1, NR)] = T.broadcast(T.float32(0), NR)
                # one group ahead: group gg's tile product is stored while group gg - 1's is scaled
                for gg in range(n_wg + 1):
                    if gg < n_wg:
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.uint8(TMM_C)))
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(TMM_A),
                            T.address_of(xb[(mo * n_wg + gg) * MR * qpg]), T.int64(wg)))
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tileloadd64", T.uint8(TMM_B), T.address_of(wp[gg * qpg * NR]),
                            T.int64(64)))
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tdpbssd", T.uint8(TMM_C), T.uint8(TMM_A), T.uint8(TMM_B)))
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.x86.tilestored64", T.uint8(TMM_C),
                            T.address_of(cb[gg % 2 * MR * NR]), T.int64(64)))
                    if gg > 0:
                        scale(acc0, 0, cb, ws, wm, xs, xm, gg - 1, mo)
                        scale(acc1, HALF, cb, ws, wm, xs, xm, gg - 1, mo)
                write(acc0, 0, mo, t, of, other)
                write(acc1, HALF, mo, t, of, other)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))
    # fmt: on

    return with_params_of(func, q, kernel)
