"""Paged-KV attention kernels for the host CPU, replacing TVM's scalar `*_cpu` attention kernels (the swap:
compile/host_attention.py).

TVM's CPU kernels run every (sequence, query head, query row) one after another on one thread, with scalar
loops over the head dimension and an online-softmax rescale of the output after every key; the ragged
prefill kernel scores every key for every query (masked ones too) and the paged prefill kernel walks the
whole cache capacity per query row. Ours run tasks in parallel and visit only the keys a query sees.
Decode (`_attend`): a task is a group of query heads of one query row; q, o and the keys' partial dot
products stay in registers (a block of `lanes` keys summed into one score vector by a butterfly, not a
horizontal sum per key), the softmax runs per chunk of keys (scores, one max, one rescale of o, then
o += p * v per key), and K / V rows can be prefetched a chunk ahead (`AttentionKnobs.prefetch`): cold
decode over a long cache is bound by the latency of its short runs of rows. A sequence with a long cache
(alone or in a batch) instead splits its keys into ranges over all heads (`AttentionKnobs.splits`), merged
at the end.
Prefill (`_attend_block`): a task is 16 query rows of every query head of one KV head, so each chunk of
keys is transposed and converted once for all of them and the scores are vectors over keys (a GEMM-like
inner loop with no horizontal sum per key).

Same parameters and outputs (o and the log2-sum-exp) as TVM's kernels, up to fp32 summation order.
Only rotary_mode 0 is supported (rope applied before the cache, as our model does); the kernels assert it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import DataType, tirx
from tvm.script import tirx as T

from ..kernel_memo import memo_kernel
from .cpu_q8_gemv import rotation, row_sums_in_registers, transpose_in_registers

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class AttentionKnobs:
    """The kernels' tunable sizes (`phi3 tune` searches them; compile/knobs.py picks them per CPU)."""

    lanes: int = 8  # fp32 lanes per vector op; LLVM splits 8 for SSE, joins 16 on AVX-512
    chunk: int = 16  # keys per softmax rescale
    prefetch: int = 0  # chunks ahead whose K and V rows are prefetched into L2 (0: none)
    splits: int = 0  # decode of one sequence: key ranges run as tasks over all heads, then merged (0: off)


NO_ROPE = "the host attention kernels expect rope applied before the KV cache (rotary_mode 0)"


# 2^f = 1 + f * P(f) on |f| <= 1/2 (Cephes' exp2f polynomial, relative error ~1.3e-7)
_EXP2_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
)


def _exp2_nonpositive(x, lanes: int = 1):
    """2^x for x <= 0 (a scalar, or a vector of `lanes`) in plain arithmetic, so a vectorized loop stays
    vector: LLVM has no vector exp2 on x86 and splits `exp2` into one libm call per lane (the prefill's
    softmax made 300k calls per layer)."""
    suffix = f"x{lanes}" if lanes > 1 else ""

    def c(value):
        return T.broadcast(T.float32(value), lanes) if lanes > 1 else T.float32(value)

    x = T.max(x, c(-126))  # 2^-126, the smallest normal: a weight below that is negligible
    n = T.floor(x + c(0.5))
    f = x - n
    p = c(_EXP2_POLY[0])
    for coef in _EXP2_POLY[1:]:
        p = p * f + c(coef)
    bias = T.broadcast(T.int32(127), lanes) if lanes > 1 else T.int32(127)
    shift = T.broadcast(T.int32(23), lanes) if lanes > 1 else T.int32(23)
    scale = T.reinterpret("float32" + suffix, T.shift_left(T.Cast("int32" + suffix, n) + bias, shift))
    return (p * f + c(1)) * scale


def heads_per_task(h_qo: int) -> int:
    """Query heads one task handles: the largest divisor of H_qo up to 8 that still leaves 8 tasks per
    query row (threads need tasks: SmolLM2's 9 heads in 3 tasks left one of 2 threads half idle). Heads run
    innermost, so a task reads its heads' K (then V) rows of a page as one run (Phi-3: 4 heads x 16 rows x
    96 dims = 24 KB) and consecutive query heads of a GQA group reuse the K rows from L1."""
    return max(x for x in range(1, 9) if h_qo % x == 0 and h_qo // x >= min(8, h_qo))


def _attend(d: int, nh: int, group: int, row_offset, head_stride: int, knobs: AttentionKnobs, dtype: str):
    """A macro: for query heads h0 .. h0 + nh of one query row, o = softmax(q . K[lo:hi]) V[lo:hi] and the
    log2-sum-exp. Key j of KV head g has its K row at flat offset `row_offset(j, ctx) + g * head_stride`
    in `k` (`row_offset` is a Python function of TIR values) and its V row at the same offset + `v_shift`
    in `v`. q / out rows of the heads are contiguous (q_off + i * d); lse entries too.

    With `knobs.prefetch` P > 0, each head's K and V rows of the chunk P ahead are prefetched into L2, one
    64-byte line per key and vector step of the current chunk's loops (spread out: a burst of them stalls
    on the miss buffers): a task reads a few KB per head and page, then jumps to the next page, runs too
    short for the hardware prefetcher to keep enough lines in flight (decode is then latency-bound)."""
    lanes, chunk, ahead = knobs.lanes, knobs.chunk, knobs.prefetch
    line = 64 * 8 // DataType(dtype).bits  # cache elements per 64-byte line
    blocked = chunk % lanes == 0 and lanes in (8, 16)
    row_sums = row_sums_in_registers(lanes) if blocked else None
    vd = d // lanes
    vec = f"float32x{lanes}"

    def tree_sum(buf, a):  # buf[a] + ... + buf[a + lanes - 1], pairwise (short dependency chains)
        terms = [buf[a + i] for i in range(lanes)]
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
        return terms[0]

    def lane(base):  # the lanes consecutive elements from `base`
        return T.ramp(base, 1, lanes)

    # fmt: off
    @T.macro
    def attend(q, q_off, k, v, v_shift, ctx, h0, lo, hi, scale, out, o_off, lse, lse_off):
        # small fixed-size buffers: stack allocas (or one pool workspace), never per-key allocations
        qv = T.alloc_buffer((nh * d,), "float32")
        ov = T.alloc_buffer((nh * d,), "float32")
        ot = T.alloc_buffer((d,), "float32")  # the head's o row (constant offsets only: registers)
        qt = T.alloc_buffer((d,), "float32")  # the head's scaled q row (registers too)
        at = T.alloc_buffer((lanes,), "float32")  # one key's partial dot products (a register)
        tr = T.alloc_buffer((lanes * lanes,), "float32", scope="local")  # lanes keys' partial dot products
        s = T.alloc_buffer((chunk,), "float32")  # scores, then softmax weights, of the chunk's keys
        ko = T.alloc_buffer((chunk,), "int32")  # flat offsets of the chunk's K rows (KV head 0)
        kp = T.alloc_buffer((chunk,), "int32")  # ... and of the rows `ahead` chunks on (clamped to the last)
        m = T.alloc_buffer((nh,), "float32")  # running max per head
        l = T.alloc_buffer((nh,), "float32")  # running sum per head
        for j in T.vectorized(nh * d):
            qv[j] = T.Cast("float32", q[q_off + j]) * scale
            ov[j] = T.float32(0)
        for i in range(nh):
            m[i] = T.float32(-5e4)  # TVM's kernels start from m = -5e4, sum = 1: no keys gives o = 0
            l[i] = T.float32(1)
        for ch in range((hi - lo + chunk - 1) // chunk):
            n: T.int32 = T.min(chunk, hi - lo - ch * chunk)
            for r in range(chunk if blocked else n):  # blocked: keys past the end read the last one again
                ko[r] = row_offset(T.min(lo + ch * chunk + r, hi - 1), ctx)
            if ahead > 0:
                for r in range(chunk):
                    kp[r] = row_offset(T.min(lo + (ch + ahead) * chunk + r, hi - 1), ctx)
            for i in range(nh):
                hk: T.int32 = (h0 + i) // group * head_stride
                for u in T.unroll(vd):
                    qt[lane(u * lanes)] = qv[lane(i * d + u * lanes)]
                new_m: T.float32 = m[i]
                if blocked:
                    # lanes keys at a time: each key's partial dot products in one row of tr, the rows'
                    # sums by a butterfly into one vector of scores (no horizontal sum per key)
                    for blk in range(chunk // lanes):
                        for r in T.unroll(lanes):
                            for u in T.unroll(vd):
                                if ahead > 0 and u * lanes % line == 0:
                                    T.evaluate(T.call_llvm_intrin(
                                        "void", "llvm.prefetch.p0",
                                        T.address_of(k[kp[blk * lanes + r] + hk + u * lanes]), 0, 2, 1))
                                if u == 0:
                                    tr[lane(r * lanes)] = qt[lane(0)] * T.Cast(
                                        vec, k[lane(ko[blk * lanes + r] + hk)])
                                else:
                                    tr[lane(r * lanes)] = tr[lane(r * lanes)] + qt[lane(u * lanes)] * T.Cast(
                                        vec, k[lane(ko[blk * lanes + r] + hk + u * lanes)])
                        row_sums(tr)
                        s[lane(blk * lanes)] = tr[lane(0)]
                    for r in range(n):
                        new_m = T.max(new_m, s[r])
                else:
                    # a key's K row front to back into one register; keys are independent chains
                    for r in range(n):
                        for u in T.unroll(vd):
                            if ahead > 0 and u * lanes % line == 0:  # spread out: one line per key and step
                                T.evaluate(T.call_llvm_intrin(
                                    "void", "llvm.prefetch.p0", T.address_of(k[kp[r] + hk + u * lanes]), 0, 2,
                                    1))
                            if u == 0:
                                at[lane(0)] = qt[lane(0)] * T.Cast(vec, k[lane(ko[r] + hk)])
                            else:
                                at[lane(0)] = at[lane(0)] + qt[lane(u * lanes)] * T.Cast(
                                    vec, k[lane(ko[r] + hk + u * lanes)])
                        s[r] = tree_sum(at, 0)
                        new_m = T.max(new_m, s[r])
                alpha: T.float32 = _exp2_nonpositive(m[i] - new_m)  # one rescale per chunk, not per key
                m[i] = new_m
                l[i] = l[i] * alpha
                for r in T.vectorized(chunk):  # keys past n: exp2(-126), never read below
                    s[r] = _exp2_nonpositive(T.if_then_else(r < n, s[r] - new_m, T.float32(-126)))
                for r in range(n):
                    l[i] = l[i] + s[r]
                # keys outer: each V row read front to back into vd independent FMA chains
                for u in T.unroll(vd):
                    ot[lane(u * lanes)] = ov[lane(i * d + u * lanes)] * T.broadcast(alpha, lanes)
                for r in range(n):
                    for u in T.unroll(vd):
                        if ahead > 0 and u * lanes % line == 0:
                            T.evaluate(T.call_llvm_intrin(
                                "void", "llvm.prefetch.p0", T.address_of(v[kp[r] + hk + v_shift + u * lanes]),
                                0, 2, 1))
                        ot[lane(u * lanes)] = ot[lane(u * lanes)] + T.broadcast(s[r], lanes) * T.Cast(
                            vec, v[lane(ko[r] + hk + v_shift + u * lanes)])
                for u in T.unroll(vd):
                    ov[lane(i * d + u * lanes)] = ot[lane(u * lanes)]
        for i in range(nh):
            for j in T.vectorized(d):
                out[o_off + i * d + j] = T.Cast(out.dtype, ov[i * d + j] / l[i])
            lse[lse_off + i] = m[i] + T.log2(l[i])
    # fmt: on

    return attend


def _fold(x, n):
    """Task order 0, n-1, 1, n-2, ... over the query blocks: a thread's contiguous share of the tasks then
    mixes short and long causal rows."""
    return T.if_then_else(x % 2 == 0, x // 2, n - 1 - x // 2)


PREFILL_ROWS = 16  # query rows per prefill task: they share each chunk's K / V conversion


def _attend_block(
    d: int, h_qo: int, group: int, row_offset, head_stride: int, knobs: AttentionKnobs, dtype: str, bounds
):
    """A macro for prefill: o = softmax(q . K) V and the log2-sum-exp for `nr` <= PREFILL_ROWS consecutive
    query rows of every query head of KV head g (GQA: the `group` heads share the keys), each row over its
    keys [lo, hi) = `bounds(i, bctx)` (i: the row's index in the task).

    Keys go in chunks of `knobs.chunk`: a chunk's K rows are transposed once into [d, chunk] (fp32, by
    lanes x lanes blocks in registers) and its V rows converted into [chunk, d], then used by every row and
    head of the task. Per register block of rows the scores are a few vectors over the chunk's keys, one
    FMA per query element and vector of keys (no horizontal sum per key as in `_attend`); then per row one
    masked max and one rescale per chunk, and o += p V with the weights broadcast, the row's o in
    registers. The running sums stay lane-wise until the end. q / out rows start at q_base / o_base, h_qo
    x d apart; lse entries at lse_base, h_qo apart; K and V rows are addressed as in `_attend`."""
    rows = PREFILL_ROWS
    lanes = knobs.lanes
    assert lanes in (8, 16)
    chunk = max(knobs.chunk, lanes) // lanes * lanes
    nv = chunk // lanes  # score vectors per row and chunk
    rb = max(1, 8 // nv)  # rows per register block: 8 score vectors live
    assert rows % rb == 0
    vd = d // lanes
    vec = f"float32x{lanes}"
    neg = T.float32(-1e30)  # a masked score
    rot = {b: rotation(lanes, b) for b in (8, 4, 2, 1)}
    transpose = transpose_in_registers(lanes)

    def lane(base):
        return T.ramp(base, 1, lanes)

    def bc(x):
        return T.broadcast(x, lanes)

    def s_(i, u):  # score vector u of register-block row i
        return lane(i * chunk + u * lanes)

    # fmt: off
    @T.macro
    def attend(q, q_base, k, v, v_shift, ctx, g, nr, bctx, scale, out, o_base, lse, lse_base):
        qs = T.alloc_buffer((group * rows * d,), "float32")  # the rows' scaled q, [head, row, d]
        os = T.alloc_buffer((group * rows * d,), "float32")  # their o
        lv = T.alloc_buffer((group * rows * chunk,), "float32")  # running sums, lane-wise
        m = T.alloc_buffer((group * rows,), "float32")  # running max
        lo = T.alloc_buffer((rows,), "int32")
        hi = T.alloc_buffer((rows,), "int32")
        kt = T.alloc_buffer((d * chunk,), "float32")  # the chunk's K, transposed
        ko = T.alloc_buffer((chunk,), "int32")  # flat offsets of its K rows
        vc = T.alloc_buffer((chunk * d,), "float32")  # its V
        tr = T.alloc_buffer((lanes * lanes,), "float32", scope="local")
        tt = T.alloc_buffer((lanes * lanes,), "float32", scope="local")
        sc = T.alloc_buffer((rb * chunk,), "float32")  # scores of a register block (registers)
        pw = T.alloc_buffer((rb * chunk,), "float32")  # their softmax weights
        al = T.alloc_buffer((rb,), "float32")  # the block's rescale factors
        hv = T.alloc_buffer((lanes,), "float32")  # a row's max, every lane
        ac = T.alloc_buffer((d,), "float32")  # a row's o (registers)
        tot = T.alloc_buffer((2,), "float32")
        span = T.alloc_buffer((2,), "int32")  # the task's keys: first, end
        span[0] = T.int32(2**30)
        span[1] = T.int32(0)
        for i in range(rows):
            lo[i] = T.int32(0)
            hi[i] = T.int32(0)
            if i < nr:
                lo[i] = bounds(i, bctx)[0]
                hi[i] = bounds(i, bctx)[1]
                if hi[i] > lo[i]:
                    span[0] = T.min(span[0], lo[i])
                    span[1] = T.max(span[1], hi[i])
        for hq in range(group):
            for i in range(rows):
                m[hq * rows + i] = T.float32(-5e4)  # TVM's start: no keys gives o = 0
                for j in T.vectorized(chunk):
                    lv[(hq * rows + i) * chunk + j] = T.float32(0)
                for j in T.vectorized(d):
                    os[(hq * rows + i) * d + j] = T.float32(0)
                    qs[(hq * rows + i) * d + j] = T.if_then_else(
                        i < nr, T.Cast("float32", q[q_base + i * h_qo * d + hq * d + j]) * scale,
                        T.float32(0))
        for c in range((T.max(span[1] - span[0], 0) + chunk - 1) // chunk):
            j0: T.int32 = span[0] + c * chunk
            for jj in range(chunk):  # keys past the end: the last one again (masked below)
                ko[jj] = row_offset(T.min(j0 + jj, span[1] - 1), ctx) + g * head_stride
                for dd in T.vectorized(d):
                    vc[jj * d + dd] = T.Cast("float32", v[ko[jj] + v_shift + dd])
            for ub in range(nv):
                for db in range(vd):
                    for i in T.unroll(lanes):
                        tr[lane(i * lanes)] = T.Cast(vec, k[lane(ko[ub * lanes + i] + db * lanes)])
                    transpose(tr, tt)
                    for u in T.unroll(lanes):
                        kt[lane((db * lanes + u) * chunk + ub * lanes)] = tr[lane(u * lanes)]
            for hq in range(group):
                for blk in range(rows // rb):
                    r0: T.int32 = hq * rows + blk * rb  # the block's first row of m / lv / qs / os
                    for i in T.unroll(rb):
                        for u in T.unroll(nv):
                            sc[s_(i, u)] = bc(T.float32(0))
                    for dd in range(d):
                        for i in T.unroll(rb):
                            for u in T.unroll(nv):
                                sc[s_(i, u)] = sc[s_(i, u)] + bc(qs[(r0 + i) * d + dd]) * kt[
                                    lane(dd * chunk + u * lanes)]
                    for i in T.unroll(rb):
                        for u in T.unroll(nv):
                            sc[s_(i, u)] = T.Select(
                                (T.ramp(j0 + u * lanes, 1, lanes) >= bc(lo[blk * rb + i]))
                                & (T.ramp(j0 + u * lanes, 1, lanes) < bc(hi[blk * rb + i])),
                                sc[s_(i, u)], bc(neg))
                        hv[lane(0)] = sc[s_(i, 0)]
                        for u in T.unroll(1, nv):
                            hv[lane(0)] = T.max(hv[lane(0)], sc[s_(i, u)])
                        if lanes == 16:
                            hv[lane(0)] = T.max(hv[lane(0)], T.Shuffle([hv[lane(0)], hv[lane(0)]], rot[8]))
                        hv[lane(0)] = T.max(hv[lane(0)], T.Shuffle([hv[lane(0)], hv[lane(0)]], rot[4]))
                        hv[lane(0)] = T.max(hv[lane(0)], T.Shuffle([hv[lane(0)], hv[lane(0)]], rot[2]))
                        hv[lane(0)] = T.max(hv[lane(0)], T.Shuffle([hv[lane(0)], hv[lane(0)]], rot[1]))
                        new_m: T.float32 = T.max(m[r0 + i], hv[0])
                        al[i] = _exp2_nonpositive(m[r0 + i] - new_m)
                        m[r0 + i] = new_m
                        for u in T.unroll(nv):
                            pw[s_(i, u)] = T.Select(
                                sc[s_(i, u)] > bc(neg), _exp2_nonpositive(sc[s_(i, u)] - bc(new_m), lanes),
                                bc(T.float32(0)))
                            lv[lane((r0 + i) * chunk + u * lanes)] = (
                                lv[lane((r0 + i) * chunk + u * lanes)] * bc(al[i]) + pw[s_(i, u)])
                    for i in range(rb):  # o = o * alpha + p V: d / lanes independent chains
                        if blk * rb + i < nr:
                            for u in T.unroll(vd):
                                ac[lane(u * lanes)] = os[lane((r0 + i) * d + u * lanes)] * bc(al[i])
                            for jj in T.unroll(chunk):
                                for u in T.unroll(vd):
                                    ac[lane(u * lanes)] = ac[lane(u * lanes)] + bc(pw[i * chunk + jj]) * vc[
                                        lane(jj * d + u * lanes)]
                            for u in T.unroll(vd):
                                os[lane((r0 + i) * d + u * lanes)] = ac[lane(u * lanes)]
        for hq in range(group):
            for i in range(nr):
                tot[0] = T.float32(0)
                for j in range(chunk):
                    tot[0] = tot[0] + lv[(hq * rows + i) * chunk + j]
                tot[1] = T.if_then_else(tot[0] > T.float32(0), tot[0], T.float32(1))
                for j in T.vectorized(d):
                    out[o_base + i * h_qo * d + hq * d + j] = T.Cast(
                        out.dtype, os[(hq * rows + i) * d + j] / tot[1])
                lse[lse_base + i * h_qo + hq] = m[hq * rows + i] + T.log2(tot[1])
    # fmt: on

    return attend


class _Pages:
    """Addressing of the paged cache [P, 2, H_kv, page_size, d] (flat): logical key j of a sequence -> its
    K row; with a sliding window the sequence's keys are its sink tokens, then the window."""

    def __init__(self, h_kv: int, d: int, page_size: int, sliding_window: bool):
        self.h_kv, self.d, self.page_size, self.sliding = h_kv, d, page_size, sliding_window
        self.v_shift = h_kv * page_size * d  # V of a page follows its K
        self.head_stride = page_size * d

    def seq_pos(self, j, b, length_info):
        if not self.sliding:
            return j
        return T.if_then_else(j < length_info[2, b], j, j - length_info[2, b] + length_info[1, b])

    def n_keys(self, n_pages, b, length_info):
        if not self.sliding:
            return (n_pages - 1) * self.page_size + length_info[b]
        return (n_pages - 1) * self.page_size + length_info[0, b] - length_info[1, b] + length_info[2, b]

    def declare(self, pages_h, indptr_h, values_h, length_info_h, k_rope_h, batch, dtype):
        """Match the paged-cache parameters of TVM's kernels (k_rope_pos_offset: rope, unused here) ->
        (pages, indptr, values, length_info). Call at the top of the PrimFunc, before any decl_buffer."""
        pages = T.match_buffer(pages_h, (T.int32(), 2, self.h_kv, self.page_size, self.d), dtype)
        indptr = T.match_buffer(indptr_h, (batch + 1,), "int32", elem_offset=T.int32())
        values = T.match_buffer(values_h, (T.int32(),), "int32", elem_offset=T.int32())
        T.match_buffer(k_rope_h, (batch,), "int32", elem_offset=T.int32())
        shape = (3, batch) if self.sliding else (batch,)
        length_info = T.match_buffer(length_info_h, shape, "int32", elem_offset=T.int32())
        return pages, indptr, values, length_info

    def keys_of(self, b, indptr, length_info):
        """Number of keys sequence b has in its pages (0 without pages)."""
        begin, end = indptr[b], indptr[b + 1]
        return T.if_then_else(begin != end, self.n_keys(end - begin, b, length_info), 0)

    def row_offset(self, j, ctx):
        """Flat offset of key j's K row of KV head 0."""
        values, begin, b, length_info = ctx
        pos = self.seq_pos(j, b, length_info)
        page = values[begin + pos // self.page_size]
        return (page * 2 * self.h_kv * self.page_size + pos % self.page_size) * self.d


def _flat(buf):
    """A 1-D view of a dense buffer (the kernels index rows by flat offsets)."""
    size = 1
    for x in buf.shape:
        size = size * x
    return T.decl_buffer((size,), buf.dtype, data=buf.data)


SPLIT_MIN_KEYS = 128  # keys per split below which a sequence keeps the head tasks
# ... when a head task holds less than a GQA group: its K / V rows are read once per query head there, and a
# key range over all heads reads them once (SmolLM2's 9 single-head tasks over 3 KV heads; Zen 4)
SPLIT_MIN_KEYS_GQA = 16


def split_min_keys(h_kv: int, h_qo: int) -> int:
    """Keys per split from which a sequence's decode runs key ranges instead of head tasks."""
    return SPLIT_MIN_KEYS_GQA if heads_per_task(h_qo) < h_qo // h_kv else SPLIT_MIN_KEYS


@memo_kernel
def decode_attention_cpu(
    h_kv: int,
    h_qo: int,
    d: int,
    dtype: str,
    sliding_window: bool,
    page_size: int,
    mask_window: int = 0,
    knobs: AttentionKnobs = AttentionKnobs(),
) -> tirx.PrimFunc:
    """TVM's `batch_decode_paged_kv_cpu[_sliding_window]`: one query row per sequence against its pages.
    `mask_window` W > 0 (plain kernel only): the query, the last key, sees the last W keys (HF's window
    0 <= q - k < W over a cache that keeps every token, so positions stay absolute).

    With `knobs.splits` S > 0, a sequence with at least S * `split_min_keys` keys runs S tasks of
    consecutive key ranges over all heads (each writes its o and log2-sum-exp per head), then merges them: a
    thread then streams whole pages front to back, where head tasks read a few KB per page and jump on (runs
    too short for the hardware prefetchers). The choice is the sequence's own, at any batch size, so a
    sequence decodes to the same numbers alone or in a batch."""
    assert d % knobs.lanes == 0 and h_qo % h_kv == 0
    group, pg, nh = h_qo // h_kv, _Pages(h_kv, d, page_size, sliding_window), heads_per_task(h_qo)
    attend = _attend(d, nh, group, pg.row_offset, pg.head_stride, knobs, dtype)
    splits = knobs.splits
    min_keys = splits * split_min_keys(h_kv, h_qo)
    attend_all = _attend(d, h_qo, group, pg.row_offset, pg.head_stride, knobs, dtype) if splits else None

    # fmt: off
    @T.macro
    def split_keys(B, qf, pf, of, lf, values, indptr, length_info, sm_scale):
        """Sequences with at least `min_keys` keys: `splits` tasks each, of consecutive key ranges over all
        heads, then merged by their log2-sum-exp. Per sequence the same ranges at any batch size, so a
        sequence's numbers do not depend on what else is in the batch."""
        po = T.alloc_buffer((B * splits * h_qo * d,), "float32")  # each range's o, [seq, split, head, d]
        pl = T.alloc_buffer((B * splits * h_qo,), "float32")  # ... and log2-sum-exp
        for t in T.parallel(B * splits):
            b: T.int32 = t // splits
            s: T.int32 = t % splits
            n: T.int32 = pg.keys_of(b, indptr, length_info)
            lo: T.int32 = T.max(n - mask_window, 0) if mask_window > 0 else 0
            if n - lo >= min_keys:
                per: T.int32 = (n - lo + splits - 1) // splits
                attend_all(qf, b * h_qo * d, pf, pf, pg.v_shift, (values, indptr[b], b, length_info), 0,
                           T.min(lo + s * per, n), T.min(lo + (s + 1) * per, n), sm_scale * T.float32(LOG2E),
                           po, t * h_qo * d, pl, t * h_qo)
        acc = T.alloc_buffer((d,), "float32")
        w = T.alloc_buffer((splits,), "float32")
        for b in range(B):
            n: T.int32 = pg.keys_of(b, indptr, length_info)
            lo: T.int32 = T.max(n - mask_window, 0) if mask_window > 0 else 0
            if n - lo >= min_keys:
                for h in range(h_qo):
                    base: T.int32 = b * splits * h_qo + h
                    mx: T.float32 = pl[base]
                    for s in range(1, splits):
                        mx = T.max(mx, pl[base + s * h_qo])
                    tot: T.float32 = T.float32(0)
                    for s in range(splits):
                        w[s] = _exp2_nonpositive(pl[base + s * h_qo] - mx)
                        tot = tot + w[s]
                    for j in T.vectorized(d):
                        acc[j] = T.float32(0)
                    for s in range(splits):
                        for j in T.vectorized(d):
                            acc[j] = acc[j] + w[s] * po[(base + s * h_qo) * d + j]
                    for j in T.vectorized(d):
                        of[(b * h_qo + h) * d + j] = T.Cast(of.dtype, acc[j] / tot)
                    lf[b * h_qo + h] = mx + T.log2(tot)

    @T.macro
    def head_tasks(B, qf, pf, of, lf, values, indptr, length_info, sm_scale, short_only):
        """Each task: `nh` query heads of one sequence over all its keys (with `short_only`, only sequences
        with fewer than `min_keys` keys; the others are split_keys')."""
        for task in T.parallel(B * (h_qo // nh)):
            b: T.int32 = task // (h_qo // nh)
            h0: T.int32 = task % (h_qo // nh) * nh
            begin: T.int32 = indptr[b]
            n: T.int32 = pg.keys_of(b, indptr, length_info)
            lo: T.int32 = T.max(n - mask_window, 0) if mask_window > 0 else 0
            if not short_only or n - lo < min_keys:
                attend(qf, (b * h_qo + h0) * d, pf, pf, pg.v_shift, (values, begin, b, length_info), h0,
                       lo, n, sm_scale * T.float32(LOG2E), of, (b * h_qo + h0) * d, lf, b * h_qo + h0)

    @T.prim_func(private=True)
    def kernel(q_handle: T.handle, pages_handle: T.handle, indptr_handle: T.handle, values_handle: T.handle,
               length_info_handle: T.handle, k_rope_pos_offset_handle: T.handle,
               q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
               rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        Q = T.match_buffer(q_handle, (B, h_qo, d), dtype)
        pages, indptr, values, length_info = pg.declare(
            pages_handle, indptr_handle, values_handle, length_info_handle, k_rope_pos_offset_handle,
            B, dtype)
        T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=T.int32())  # rope: unused
        output = T.match_buffer(output_handle, (B, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_qo), "float32")
        qf, pf, of, lf = _flat(Q), _flat(pages), _flat(output), _flat(lse)
        assert rotary_mode == 0, NO_ROPE
        if splits > 0:
            # each sequence takes key ranges or head tasks by its own length; a loop none needs is skipped
            n_long = T.alloc_buffer((1,), "int32")
            n_long[0] = 0
            for b in range(B):
                n: T.int32 = pg.keys_of(b, indptr, length_info)
                lo: T.int32 = T.max(n - mask_window, 0) if mask_window > 0 else 0
                if n - lo >= min_keys:
                    n_long[0] = n_long[0] + 1
            if n_long[0] > 0:
                split_keys(B, qf, pf, of, lf, values, indptr, length_info, sm_scale)
            if n_long[0] < B:
                head_tasks(B, qf, pf, of, lf, values, indptr, length_info, sm_scale, True)
        else:
            head_tasks(B, qf, pf, of, lf, values, indptr, length_info, sm_scale, False)
    # fmt: on

    return kernel


@memo_kernel
def prefill_paged_attention_cpu(
    h_kv: int,
    h_qo: int,
    d: int,
    dtype: str,
    sliding_window: bool,
    page_size: int,
    window: int,
    mask_window: int = 0,
    knobs: AttentionKnobs = AttentionKnobs(),
) -> tirx.PrimFunc:
    """TVM's `batch_prefill_paged_kv_cpu[_sliding_window]`: a chunk of query rows per sequence against the
    keys already in its pages (all of them, or with causal + sliding window those the window reaches).
    `mask_window` W > 0 (plain kernel only): query row i sits at absolute position n - n_q + i when causal
    (the pages hold the chunk too) and n + i when not (the pages hold only the keys before the chunk, TVM's
    split of a chunk into ragged + paged attention); it sees keys from that position - W + 1 on."""
    assert d % knobs.lanes == 0 and h_qo % h_kv == 0
    group, pg, rows = h_qo // h_kv, _Pages(h_kv, d, page_size, sliding_window), PREFILL_ROWS
    w = window if sliding_window else 0

    # TVM's mask, causal: keys < n - n_q + i + 1 for query row i; causal + window w: keys >= n - (w - i - 1)
    def first_key(n, i):
        return T.max(n - T.max(w - i - 1, 0), 0) if w > 0 else 0

    def end_key(n, n_q, i):
        return n if w > 0 else T.min(n, n - n_q + i + 1)

    def window_first(causal, n, n_q, i, lo):
        if mask_window <= 0:
            return lo
        q_pos = T.if_then_else(causal > 0, n - n_q + i, n + i)
        return T.max(lo, q_pos - mask_window + 1)

    def bounds(i, bctx):  # row i of the task's block: row row0 + i of the sequence's chunk
        causal, n, n_q, row0 = bctx
        lo = window_first(causal, n, n_q, row0 + i, T.if_then_else(causal > 0, first_key(n, row0 + i), 0))
        return lo, T.max(T.if_then_else(causal > 0, end_key(n, n_q, row0 + i), n), lo)

    attend = _attend_block(d, h_qo, group, pg.row_offset, pg.head_stride, knobs, dtype, bounds)

    # fmt: off
    @T.prim_func(private=True)
    def kernel(q_handle: T.handle, q_indptr_handle: T.handle, pages_handle: T.handle, indptr_handle: T.handle,
               values_handle: T.handle, length_info_handle: T.handle, k_rope_pos_offset_handle: T.handle,
               q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
               causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
               sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B, total = T.int32(), T.int32()
        Q = T.match_buffer(q_handle, (total, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32", elem_offset=T.int32())
        pages, indptr, values, length_info = pg.declare(
            pages_handle, indptr_handle, values_handle, length_info_handle, k_rope_pos_offset_handle,
            B, dtype)
        T.match_buffer(q_rope_position_handle, (total,), "int32", elem_offset=T.int32())  # rope: unused
        output = T.match_buffer(output_handle, (total, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (total, h_qo), "float32")
        qf, pf, of, lf = _flat(Q), _flat(pages), _flat(output), _flat(lse)
        assert rotary_mode == 0, NO_ROPE
        for b in range(B):
            begin: T.int32 = indptr[b]
            n: T.int32 = pg.keys_of(b, indptr, length_info)
            n_q: T.int32 = q_indptr[b + 1] - q_indptr[b]
            n_blk: T.int32 = (n_q + rows - 1) // rows
            for t in T.parallel(h_kv * n_blk):
                g: T.int32 = t // n_blk
                row0: T.int32 = _fold(t % n_blk, n_blk) * rows
                first: T.int32 = (q_indptr[b] + row0) * h_qo + g * group
                attend(qf, first * d, pf, pf, pg.v_shift, (values, begin, b, length_info), g,
                       T.min(rows, n_q - row0), (causal, n, n_q, row0), sm_scale * T.float32(LOG2E),
                       of, first * d, lf, first)
    # fmt: on

    return kernel


@memo_kernel
def prefill_ragged_attention_cpu(
    h_kv: int, h_qo: int, d: int, dtype: str, mask_window: int = 0, knobs: AttentionKnobs = AttentionKnobs()
) -> tirx.PrimFunc:
    """TVM's `batch_prefill_ragged_kv` (cpu): a chunk of query rows per sequence against that chunk's own
    keys and values (contiguous [len, H_kv, d]), causal or not. `mask_window` W > 0: a causal query row sees
    at most the last W of them (itself included)."""
    assert d % knobs.lanes == 0 and h_qo % h_kv == 0
    group, rows = h_qo // h_kv, PREFILL_ROWS

    def row_offset(j, base):
        return (base + j) * h_kv * d

    def bounds(i, bctx):  # row i of the task's block: row row0 + i of the sequence's chunk
        causal, n, n_q, row0 = bctx
        hi = T.if_then_else(causal > 0, T.min(n, n - n_q + row0 + i + 1), n)
        if mask_window <= 0:
            return 0, hi
        return T.if_then_else(causal > 0, T.max(hi - mask_window, 0), 0), hi

    attend = _attend_block(d, h_qo, group, row_offset, d, knobs, dtype, bounds)

    # fmt: off
    @T.prim_func(private=True)
    def kernel(q_handle: T.handle, q_indptr_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
               kv_indptr_handle: T.handle, q_rope_position_handle: T.handle,
               k_rope_pos_offset_handle: T.handle,
               output_handle: T.handle, lse_handle: T.handle, causal: T.int32, rotary_mode: T.int32,
               rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        off_q, off_kv, off_qrope, off_krope = T.int32(), T.int32(), T.int32(), T.int32()
        Q = T.match_buffer(q_handle, (qo_len, h_qo, d), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32", elem_offset=off_q)
        K = T.match_buffer(k_handle, (kv_len, h_kv, d), dtype)
        V = T.match_buffer(v_handle, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(kv_indptr_handle, (B + 1,), "int32", elem_offset=off_kv)
        T.match_buffer(q_rope_position_handle, (qo_len,), "int32", elem_offset=off_qrope)  # rope: unused
        T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=off_krope)
        output = T.match_buffer(output_handle, (qo_len, h_qo, d), dtype)
        lse = T.match_buffer(lse_handle, (qo_len, h_qo), "float32")
        qf, kf, vf, of, lf = _flat(Q), _flat(K), _flat(V), _flat(output), _flat(lse)
        assert rotary_mode == 0, NO_ROPE
        for b in range(B):
            n: T.int32 = kv_indptr[b + 1] - kv_indptr[b]
            n_q: T.int32 = q_indptr[b + 1] - q_indptr[b]
            n_blk: T.int32 = (n_q + rows - 1) // rows
            for t in T.parallel(h_kv * n_blk):
                g: T.int32 = t // n_blk
                row0: T.int32 = _fold(t % n_blk, n_blk) * rows
                first: T.int32 = (q_indptr[b] + row0) * h_qo + g * group
                attend(qf, first * d, kf, vf, 0, kv_indptr[b], g, T.min(rows, n_q - row0),
                       (causal, n, n_q, row0), sm_scale * T.float32(LOG2E), of, first * d, lf, first)
    # fmt: on

    return kernel
