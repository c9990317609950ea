"""dlight-style schedule rules for the host CPU (llvm target), for `dl.ApplyDefaultSchedule`.

The pipeline hands us, per Linear, one PrimFunc: an optional `dequantize` block (q4 words + scales -> fp32
weight), an `NT_matmul` block `C[m.., n] += x[m.., k] * W[n, k]` and optional injective epilogue blocks
(residual add). The rules, most specific first (`cpu_schedule_rules`):

- `CPUQ8DotGEMV` (presets with `cpu.q4_activations = "int8"`, x86 with AVX2 or better): the q4 GEMVs below
  with int8 activations and integer dot products (`cpu_q8_gemv`; AVX-512 VNNI, AVX-VNNI or AVX2, chosen
  from the target's CPU features by `cpu_isa`), one weight row streamed at a time.
- `CPUDequantGEMV`: q4 dequant + matmul (+ residual add) with 1..4 rows of x, or decode's (batch, 1) rows.
  The function is re-emitted (same parameters, same result up to fp32 summation order) so that the scale and
  the -7 zero point are applied once per 32-group instead of once per weight, and a vector holds 8
  consecutive packed words whose nibble c is isolated by a constant mask (x pre-scaled by 16^-c): the inner
  loop is and, convert, fma per 8 weights. 4 weight rows share each x vector load; rows are split across
  threads in tiles of 16. Hot-cache, 1 thread, AVX2: 10.8 GB/s of q4 weights vs 4.5 for `CPUGEMV`.
- `CPUGEMV`: any other matmul with few rows (fp32 weights of q0 models, or q4 shapes the above declines):
  dequantize inlined, rfactor over the SIMD lanes, 4 rows per x load, rows split across threads.
- `CPUQ8VNNIGEMM` (int8-activation presets, CPUs with VNNI): q4 matmuls with many rows (prefill) with int8
  activations and 512- or 256-bit `vpdpbusd` (`cpu_q8_gemm`), or arm64's `smmla` / `sdot` (`cpu_arm_dot`).
- `CPUQ4OuterGEMM`: q4 matmuls with many rows (prefill): outer-product register blocks (`cpu_q4_gemm`), 8 or
  16 fp32 lanes wide (AVX2 / AVX-512, `cpu_isa`).
- `CPUGEMM`: other matmuls with many (dynamic seq_len: prefill) rows: each thread dequantizes a tile of 16
  weight rows once into an L2-resident fp32 scratch tile and reuses it for every row of x (dot-product
  micro-kernel, 4 weight rows per x vector load).
- `CPUElementwise`: injective-only kernels (rope, silu*mul, reshapes): one loop nest, vectorized, threaded
  only when large. Scatters through an index buffer (KV-cache append) are left alone.
- dlight's in-tree `cpu.Reduction` for RMSNorm / softmax.

Vector width follows the CPU LLVM targets (`mcpu`): 8 fp32 lanes with AVX2, 16 with AVX-512.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial
from tvm.target import Target, codegen

from ..quantization import GroupLayout, KQuantLayout
from .cpu_isa import (
    MADDUBS_ISAS,
    Q4_GEMM_LANES,
    Q8_GEMM_LANES,
    q4_gemm_isa,
    q8_dot_isas,
    q8_gemm_isa,
)
from .cpu_parallel_guard import parallel_if_enough
from .cpu_q8_gemv import HOST_K_LAYOUTS, HOST_Q4_LAYOUTS, HOST_Q4_MIN_LAYOUTS, HOST_Q8_LAYOUTS
from .knobs import DEFAULTS, Knobs, gemm_rows, shape_key

# what the int8-activation rules (CPUQ8DotGEMV, CPUQ8VNNIGEMM) take; the fp32 ones take HOST_Q4_LAYOUTS
INT8_LAYOUTS = HOST_Q4_LAYOUTS + HOST_Q4_MIN_LAYOUTS + HOST_Q8_LAYOUTS + HOST_K_LAYOUTS

ARM_GEMM_NR = 8  # weight rows per tile of the arm64 int8 GEMM (4 smmla row pairs / 2 sdot quads)

# ---------------------------------------------------------------------------------------------------------
# target facts


def simd_lanes_f32(target: Target) -> int:
    """fp32 lanes of the widest vector register the target's CPU has (LLVM feature query)."""
    try:
        if codegen.llvm_cpu_has_features(["avx512f"], target):
            return 16
        if codegen.llvm_cpu_has_features(["avx2"], target) or codegen.llvm_cpu_has_features(["avx"], target):
            return 8
    except Exception:  # noqa: BLE001 - non-x86 triples: the feature names don't exist there
        pass
    return 4  # SSE / NEON width


def has_avx2(target: Target) -> bool:
    """Whether the target's CPU has AVX2 (the int8 dot-product kernel's vpmaddubsw/vpmaddwd)."""
    try:
        return bool(codegen.llvm_cpu_has_features(["avx2"], target))
    except Exception:  # noqa: BLE001 - non-x86 triples
        return False


def _is_llvm(target: Target) -> bool:
    return target.kind.name == "llvm"


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | tirx.PrimExpr:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else ext


# ---------------------------------------------------------------------------------------------------------
# matmul pattern analysis


@dataclass
class _MatmulInfo:
    """The matmul block after inlining, in the NT layout produced by LegalizeOps (+ FuseTransposeMatmul)."""

    block: s_tir.schedule.SBlockRV
    m_loops: list  # spatial loops over the rows of x (batch, seq); may be dynamic or absent
    n_loop: s_tir.schedule.LoopRV
    k_loop: s_tir.schedule.LoopRV
    m_extents: list  # int or PrimExpr per m loop
    n: int
    k: int
    epilogues: list  # SBlockRVs of injective blocks after the matmul
    decode_like: bool  # rows of x are (batch, 1): decode with a dynamic batch that is 1 in practice


def _region_vars(region) -> set:
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    used = set()
    for rng in region.region:
        used |= collect_vars_used_in_prim_expr(rng.min)
        used |= collect_vars_used_in_prim_expr(rng.extent)
    return used


def _analyze_matmul(sch: s_tir.Schedule) -> _MatmulInfo | None:
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline_contiguous_spatial(sch, infos)
    if infos is None or not infos:
        return None
    main: SBlockInfo = infos[0]
    epilogues = infos[1:]
    if not all(e.is_injective() for e in epilogues):
        return None
    kinds = main.dom_kind()
    if kinds.count("R") != 1 or not kinds.endswith("R") or len(kinds) < 2:
        return None
    stmt = sch.get(main.block_rv)
    if len(stmt.writes) != 1 or len(stmt.reads) < 2:
        return None
    if not isinstance(stmt.body, tirx.BufferStore) or not isinstance(stmt.body.value, tirx.Add):
        return None
    iters = list(stmt.iter_vars)
    k_var = iters[-1].var
    n_var = iters[-2].var
    m_vars = [it.var for it in iters[:-2]]
    # x reads use the m iters and k but not n; weight reads (q_weight, q_scale or W) use n (and k) but no m
    x_reads, w_reads = [], []
    for read in stmt.reads:
        if read.source.same_as(stmt.writes[0].source):
            continue
        used = _region_vars(read)
        if n_var in used and not (used & set(m_vars)):
            w_reads.append(read)
        elif n_var not in used:
            x_reads.append(read)
        else:
            return None
    if len(x_reads) != 1 or not w_reads:
        return None
    if k_var not in _region_vars(x_reads[0]):
        return None
    # the output must be C[m.., n]
    out_used = _region_vars(stmt.writes[0])
    if n_var not in out_used or k_var in out_used:
        return None
    n_ext, k_ext = main.iters[-2].dom, main.iters[-1].dom
    if not isinstance(n_ext, int) or not isinstance(k_ext, int):
        return None
    loops = sch.get_loops(main.block_rv)
    if len(loops) != len(iters):
        return None
    m_exts = [info.dom for info in main.iters[:-2]]
    decode_like = _decode_like(list(x_reads[0].source.shape)[:-1])
    return _MatmulInfo(
        block=main.block_rv,
        m_loops=list(loops[:-2]),
        n_loop=loops[-2],
        k_loop=loops[-1],
        m_extents=m_exts,
        n=n_ext,
        k=k_ext,
        epilogues=[e.block_rv for e in epilogues],
        decode_like=decode_like,
    )


def _decode_like(row_shape: list) -> bool:
    """x rows shaped (batch, 1, ..): decode, whose dynamic batch is 1 in practice; prefill is (1, seq_len)."""
    return (
        len(row_shape) >= 2
        and not isinstance(row_shape[0], tirx.IntImm)
        and all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in row_shape[1:])
    )


def _static_m(info: _MatmulInfo) -> int | None:
    total = 1
    for e in info.m_extents:
        if not isinstance(e, int):
            return None
        total *= e
    return total


# ---------------------------------------------------------------------------------------------------------
# rules


class CPUGEMV(ScheduleRule):
    """Matmul with few rows of x (decode): weights streamed once, `rows` rows in flight per x vector load.

    Loop nest per thread (rows split across threads):
      for n_tile (parallel): for m: for rows-group: for k_outer: for k_unroll: for row (unrolled):
        acc[row, lanes] += x[m, k lanes] * W(row, k lanes)          (vectorized over lanes)
      then a horizontal sum of the lane accumulators (+ epilogue) per row.
    """

    def __init__(
        self, lanes: int | None = None, rows: int = 4, k_unroll: int = 2, tile_rows: int = 16, max_m: int = 4
    ) -> None:
        self.lanes = lanes
        self.rows = rows
        self.k_unroll = k_unroll
        self.tile_rows = tile_rows
        self.max_m = max_m

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        sch = s_tir.Schedule(func)
        info = _analyze_matmul(sch)
        if info is None:
            return None
        m_static = _static_m(info)
        if m_static is None:
            if not info.decode_like:
                return None
        elif m_static > self.max_m:
            return None
        lanes = self.lanes or simd_lanes_f32(target) * 2  # two registers per accumulator: hides FMA latency
        while lanes > 1 and info.k % lanes:
            lanes //= 2
        if lanes < 4:
            return None
        rows = self.rows
        tile_rows = self.tile_rows
        while tile_rows > rows and info.n % tile_rows:
            tile_rows //= 2
        if info.n % tile_rows:
            tile_rows = rows if info.n % rows == 0 else 1
            rows = min(rows, tile_rows)
        block = info.block
        if info.m_loops:
            m = sch.fuse(*info.m_loops) if len(info.m_loops) > 1 else info.m_loops[0]
        else:
            m = sch.add_unit_loop(block)
        n_o, n_i = sch.split(info.n_loop, [None, tile_rows])
        k_o, k_l = sch.split(info.k_loop, [None, lanes])
        sch.reorder(n_o, m, n_i, k_o, k_l)
        rf = sch.rfactor(k_l, factor_axis=len(sch.get(block).writes[0].region))
        # rf block loops: n_o, m, n_i, k_o, k_l (k_l is spatial now)
        loops = sch.get_loops(rf)
        n_o_, m_, n_i_, k_o_, k_l_ = loops[-5:]
        k_unroll = self.k_unroll if (info.k // lanes) % self.k_unroll == 0 else 1
        n_io, n_ii = sch.split(n_i_, [None, rows])
        k_oo, k_oi = sch.split(k_o_, [None, k_unroll])
        sch.reorder(n_io, k_oo, k_oi, n_ii, k_l_)
        sch.vectorize(k_l_)
        sch.unroll(n_ii)
        sch.unroll(k_oi)
        sch.reverse_compute_at(block, n_io)
        for epi in info.epilogues:
            try:
                sch.reverse_compute_at(epi, n_io)
            except Exception:  # noqa: BLE001 - an epilogue that isn't per-row stays a separate loop nest
                pass
        sch.parallel(n_o_)
        sch.decompose_reduction(rf, k_oo)
        return sch


# ---------------------------------------------------------------------------------------------------------
# q4 dequant-GEMV, regrouped: scale and the zero point applied once per group, not per weight


def _kind(e) -> str:
    return type(e).__name__


def _dtype(e) -> str:
    return str(e.ty.dtype) if hasattr(e, "ty") else str(e.dtype)


def _strip_cast(e, dtype: str | None = None):
    if _kind(e) == "Cast" and (dtype is None or _dtype(e) == dtype):
        return e.value
    return e


def _is_load_of(e, buf) -> bool:
    return _kind(e) == "TensorLoad" and e.source.same_as(buf)


def _is_const(e, value: float) -> bool:
    return _kind(e) in ("IntImm", "FloatImm") and float(e.value) == value


def _has_load(expr) -> bool:
    """Whether a PrimExpr reads a buffer anywhere inside it."""
    if _kind(expr) == "TensorLoad":
        return True
    for attr in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, attr, None)
        if child is not None and not isinstance(child, (int, float, str)) and _has_load(child):
            return True
    args = getattr(expr, "args", None)
    return bool(args) and any(_has_load(a) for a in args)


def _equal(analyzer, a, b) -> bool:
    try:
        return analyzer.can_prove_equal(a, b)
    except Exception:  # noqa: BLE001 - dtype mismatch etc.: not provably equal
        return False


@dataclass
class _Q4Matmul:
    """A PrimFunc that is exactly: q4 dequantize -> NT matmul -> optional `+ other` epilogue."""

    x: object  # param buffers
    q_weight: object
    q_scale: object
    out: object
    other: object | None
    other_first: bool
    n: int
    k: int
    layout: GroupLayout  # the storage layout of q_weight / q_scale (one of HOST_Q4_LAYOUTS)
    q_min: object | None = None  # per-group offsets of a layout with a min (GGUF Q4_1: code * scale + min)
    q_sub: object | None = None  # GGUF K-quants' sub-block scale (and min) bytes (q_scale, q_min: d, dmin)
    q_high: object | None = None  # GGUF Q5_K's / Q6_K's top code bits, 32 / 16 codes per word


def _group_load(e, analyzer, vn, vk, group_size: int):
    """The buffer of `e` if it is (a float32 cast of) buf[n, k // group_size], else None."""
    e = _strip_cast(e, "float32")
    if _kind(e) != "TensorLoad" or len(e.indices) != 2:
        return None
    if not (_equal(analyzer, e.indices[0], vn) and _equal(analyzer, e.indices[1], vk // group_size)):
        return None
    return e.source


def _elementwise_store(stmt):
    """(store, vn, vk) if `stmt` is a 2-D spatial block writing float32 W[vn, vk], else None."""
    if len(stmt.iter_vars) != 2 or any(int(iv.iter_type) != 0 for iv in stmt.iter_vars):
        return None
    store = stmt.body
    if _kind(store) != "BufferStore" or str(store.buffer.dtype) != "float32":
        return None
    vn, vk = (iv.var for iv in stmt.iter_vars)
    if len(store.indices) != 2 or not (store.indices[0].same_as(vn) and store.indices[1].same_as(vk)):
        return None
    return store, vn, vk


def _match_dequant(stmt, analyzer, layout: GroupLayout):
    """(q_weight, q_scale, q_min or None, W) if `stmt` is the dequantize of `layout`:
    W[n, k] = (((qw[n, k // epw] >> bits*(k % epw)) & mask) - zero_point) * s[n, k // group_size]
    (for MLC's q4: ((qw[n, k//8] >> 4*(k%8)) & 15) - 7) * s[n, k//32]; GGUF's Q4_0 subtracts 8), or with
    a min: code * s[n, k // group_size] + m[n, k // group_size] (GGUF's Q4_1, zero point 0)."""
    spatial = _elementwise_store(stmt)
    if spatial is None:
        return None
    store, vn, vk = spatial
    val, q_min = store.value, None
    if layout.has_min:
        if _kind(val) != "Add" or layout.zero_point != 0:
            return None
        val, offset = (val.a, val.b) if _kind(val.a) == "Mul" else (val.b, val.a)
        q_min = _group_load(offset, analyzer, vn, vk, layout.group_size)
        if q_min is None:
            return None
    if _kind(val) != "Mul":
        return None
    code, scale = val.a, val.b
    if layout.has_min:  # no zero point to subtract: the code is one factor, the scale the other
        if _group_load(code, analyzer, vn, vk, layout.group_size) is not None:
            code, scale = scale, code
    else:
        if _kind(code) != "Sub":
            code, scale = scale, code
        if _kind(code) != "Sub" or not _is_const(code.b, float(layout.zero_point)):
            return None
        code = code.a
    q_scale = _group_load(scale, analyzer, vn, vk, layout.group_size)
    epw = layout.elems_per_word
    q_weight = _field_load(code, analyzer, vn, vk // epw, (vk % epw) * layout.bits, layout.code_mask)
    if q_scale is None or q_weight is None or str(q_weight.dtype) != layout.storage:
        return None
    return q_weight, q_scale, q_min, store.buffer


def _field_load(e, analyzer, vn, word_index, shift, mask: int):
    """The buffer of `e` if it is (a float32 cast of) (buf[n, word_index] >> shift) & mask, else None."""
    band = _strip_cast(e, "float32")
    if _kind(band) != "BitwiseAnd" or not _is_const(band.b, mask):
        return None
    shr = band.a
    if _kind(shr) != "RShift":
        return None
    word = shr.a
    if _kind(word) != "TensorLoad" or len(word.indices) != 2:
        return None
    if not (_equal(analyzer, word.indices[0], vn) and _equal(analyzer, word.indices[1], word_index)):
        return None
    if not _equal(analyzer, _strip_cast(shr.b), shift):
        return None
    return word.source


def _match_k_dequant(stmt, analyzer, high_bits: int):
    """(q_weight, q_scale (d), q_min (dmin), q_sub, q_high or None, W) if `stmt` is GGUF Q4_K's
    (`high_bits` 0) or Q5_K's (1) dequantize as quantization/tvm_layers writes it: W[n, k] = (d[n, sb] *
    sc) * code - dmin[n, sb] * m, sb = k // 256, sc / m the bytes t and 8 + t (t = k % 256 // 32) of the
    super-block's 4 q_sub words; Q5_K's code = nibble | high bit << 4 (q_high: 32 bits per word)."""
    spatial = _elementwise_store(stmt)
    if spatial is None:
        return None
    store, vn, vk = spatial
    val = store.value
    if _kind(val) != "Sub" or _kind(val.a) != "Mul" or _kind(val.b) != "Mul":
        return None
    scaled, code = val.a.a, val.a.b
    if _kind(scaled) != "Mul":
        return None
    word, shift = (vk // 256) * 4 + (vk % 256) // 128, (vk % 128) // 32 * 8
    q_scale = _group_load(scaled.a, analyzer, vn, vk, 256)
    q_sub = _field_load(scaled.b, analyzer, vn, word, shift, 255)
    q_high = None
    if high_bits:  # Cast(float32, nibble | (high bit << 4))
        code = _strip_cast(code, "float32")
        if _kind(code) != "BitwiseOr" or _kind(code.b) != "LShift" or not _is_const(code.b.b, 4):
            return None
        q_high = _field_load(code.b.a, analyzer, vn, vk // 32, vk % 32, 1)
        code = code.a
        if q_high is None:
            return None
    q_weight = _field_load(code, analyzer, vn, vk // 8, (vk % 8) * 4, 15)
    q_min = _group_load(val.b.a, analyzer, vn, vk, 256)
    sub_min = _field_load(val.b.b, analyzer, vn, word + 2, shift, 255)
    if None in (q_scale, q_sub, q_weight, q_min) or not (sub_min is not None and sub_min.same_as(q_sub)):
        return None
    return q_weight, q_scale, q_min, q_sub, q_high, store.buffer


def _match_k6_dequant(stmt, analyzer):
    """(q_weight, q_scale (d), None, q_sub, q_high, W) if `stmt` is GGUF Q6_K's dequantize as
    quantization/tvm_layers writes it: W[n, k] = (d[n, k // 256] * (sc - 128)) * (code - 32), sc the byte
    k // 16 of the row's q_sub bytes (4 per word), code = nibble | (2 high bits << 4) (16 per q_high word)."""
    spatial = _elementwise_store(stmt)
    if spatial is None:
        return None
    store, vn, vk = spatial
    val = store.value
    if _kind(val) != "Mul" or _kind(val.a) != "Mul" or _kind(val.b) != "Sub" or not _is_const(val.b.b, 32):
        return None
    scaled, code = val.a, _strip_cast(val.b.a, "float32")
    if _kind(scaled.b) != "Sub" or not _is_const(scaled.b.b, 128):
        return None
    q_scale = _group_load(scaled.a, analyzer, vn, vk, 256)
    q_sub = _field_load(scaled.b.a, analyzer, vn, vk // 64, (vk // 16) % 4 * 8, 255)
    if _kind(code) != "BitwiseOr" or _kind(code.b) != "LShift" or not _is_const(code.b.b, 4):
        return None
    q_high = _field_load(code.b.a, analyzer, vn, vk // 16, (vk % 16) * 2, 3)
    q_weight = _field_load(code.a, analyzer, vn, vk // 8, (vk % 8) * 4, 15)
    if None in (q_scale, q_sub, q_high, q_weight):
        return None
    return q_weight, q_scale, None, q_sub, q_high, store.buffer


def _match_q4_matmul(
    func: tirx.PrimFunc, layouts: tuple[GroupLayout, ...] = HOST_Q4_LAYOUTS
) -> _Q4Matmul | None:
    """The q4 matmul of `func` if its dequantize reads exactly one of `layouts`; None for anything else
    (another group size, code width or zero point included), so that a generic rule schedules it instead."""
    from tvm import sym

    analyzer = sym.Analyzer()
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))] if _has_root(sch) else []
    if len(blocks) not in (2, 3):
        return None
    for layout in layouts:
        if isinstance(layout, KQuantLayout):
            deq = (
                _match_k_dequant(blocks[0], analyzer, layout.high_bits)
                if layout.has_min
                else _match_k6_dequant(blocks[0], analyzer)
            )
        else:
            deq = _match_dequant(blocks[0], analyzer, layout)
            deq = None if deq is None else (*deq[:3], None, None, deq[3])
        if deq is not None:
            break
    else:
        return None
    q_weight, q_scale, q_min, q_sub, q_high, w_buf = deq
    mm = blocks[1]
    store = mm.body
    if _kind(store) != "BufferStore" or mm.init is None:
        return None
    ivs = list(mm.iter_vars)
    if len(ivs) < 3 or int(ivs[-1].iter_type) != 2 or any(int(iv.iter_type) != 0 for iv in ivs[:-1]):
        return None
    vk, vn = ivs[-1].var, ivs[-2].var
    if len(store.indices) != len(ivs) - 1 or not all(
        i.same_as(iv.var) for i, iv in zip(store.indices, ivs[:-1], strict=True)
    ):
        return None
    val = store.value
    if _kind(val) != "Add" or not _is_load_of(val.a, store.buffer):
        return None
    prod = val.b
    if _kind(prod) != "Mul":
        return None
    xl, wl = prod.a, prod.b
    if _is_load_of(xl, w_buf):
        xl, wl = wl, xl
    if not _is_load_of(wl, w_buf) or _kind(xl) != "TensorLoad":
        return None
    if not (wl.indices[0].same_as(vn) and wl.indices[1].same_as(vk)):
        return None
    m_vars = [iv.var for iv in ivs[:-2]]
    if len(xl.indices) != len(m_vars) + 1 or not all(
        a.same_as(b) for a, b in zip(xl.indices, [*m_vars, vk], strict=True)
    ):
        return None
    x = xl.source
    if str(x.dtype) != "float32":
        return None
    out, other, other_first = store.buffer, None, False
    if len(blocks) == 3:
        epi = blocks[2]
        st = epi.body
        if _kind(st) != "BufferStore" or any(int(iv.iter_type) != 0 for iv in epi.iter_vars):
            return None
        evars = [iv.var for iv in epi.iter_vars]
        if len(st.indices) != len(evars) or not all(
            i.same_as(v) for i, v in zip(st.indices, evars, strict=True)
        ):
            return None
        add = st.value
        if _kind(add) != "Add":
            return None
        a, b = add.a, add.b
        loads_ok = all(
            _kind(t) == "TensorLoad"
            and len(t.indices) == len(evars)
            and all(i.same_as(v) for i, v in zip(t.indices, evars, strict=True))
            for t in (a, b)
        )
        if not loads_ok:
            return None
        if a.source.same_as(store.buffer):
            other = b.source
        elif b.source.same_as(store.buffer):
            other, other_first = a.source, True
        else:
            return None
        out = st.buffer
        if str(other.dtype) != "float32" or len(other.shape) != len(out.shape):
            return None
    params = list(func.params)
    needed = [x, q_weight, q_scale, out] + [b for b in (q_min, q_sub, q_high, other) if b is not None]
    if not all(any(p.same_as(b) for p in params) for b in needed) or len(params) != len(needed):
        return None
    n, k = int(w_buf.shape[0]), int(w_buf.shape[1])
    if q_sub is not None:  # K-quant planes in the layout's own order
        planes = (q_weight, q_high, q_sub, q_scale, q_min)
        stored = tuple(tuple(int(d) for d in b.shape) for b in planes if b is not None)
        expected = tuple(layout.param_shapes((n, k)))
    else:
        stored = tuple(tuple(int(d) for d in b.shape) for b in (q_weight, q_scale, q_min) if b is not None)
        expected = tuple(layout.quantized_shapes((n, k)))
        expected += expected[1:] if layout.has_min else ()  # the min array is shaped like the scales
    if k % layout.group_size or stored != expected:
        return None
    if q_min is not None and str(q_min.dtype) != str(q_scale.dtype):
        return None
    return _Q4Matmul(x, q_weight, q_scale, out, other, other_first, n, k, layout, q_min, q_sub, q_high)


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _regrouped_q4_gemv(
    func: tirx.PrimFunc, q: _Q4Matmul, words_per_vector: int = 1, chains: int = 1, layout: str = "nibble"
) -> tirx.PrimFunc:
    """The same function written so the inner loop is `p += x * float(code)` and the scale and the -7 zero
    point are applied per 32-group. Two lane layouts:

    "nibble": vector lanes = the 8 nibbles of one word (x64 for 2 words ...), per 32-group g:
        xg[m, g, c]   = sum_w x[m, 32g + 8w + c]                          (lane-wise group sums of x)
        P[m, n, g, c] = sum_w x[m, 32g + 8w + c] * nibble(n, 32g + 8w + c)
        A[m, n, c]    = sum_g scale[n, g] * (P[m, n, g, c] - 7 * xg[m, g, c])
    "word": vector lanes = L consecutive words (one contiguous load); nibble c of every lane is isolated by a
      constant mask, `word & (15 << 4c)` = code * 16^c, so x is pre-scaled by 16^-c (exact, a power of two):
        xt[m, c, j]    = x[m, 8j + c] * 16^-c     (c = 7: the code is `word >> 28`, no pre-scale)
        xs[m, j]       = sum_c x[m, 8j + c]
        P[m, n, b, l]  = sum_c xt[m, c, Lb + l] * float(masked(n, Lb + l, c))
        A[m, n, l]     = sum_b scale[n, (Lb + l) / 4] * (P[m, n, b, l] - 7 * xs[m, Lb + l])
      which costs and, convert, fma per 8 weights instead of broadcast, shift, and, convert, fma.
    Then C[m.., n] = sum_lanes A[m, n, lane] (+ epilogue `other`).
    Exact algebra; only the order of fp32 additions differs from the original."""
    from tvm import te

    lay = q.layout
    assert lay in HOST_Q4_LAYOUTS, "written for 4-bit codes, 8 per uint32, groups of 32"
    epw, bits, word_dtype = lay.elems_per_word, lay.bits, lay.storage
    g_count = q.k // lay.group_size
    zero_point = tirx.const(float(lay.zero_point), "float32")
    placeholders = {}
    for p in func.params:
        placeholders[p] = te.placeholder(list(p.shape), str(p.dtype), name=p.name)

    def ph(buf):
        return next(t for b, t in placeholders.items() if b.same_as(buf))

    x, qw, qs = ph(q.x), ph(q.q_weight), ph(q.q_scale)
    m_shape = list(q.x.shape)[:-1]
    nd = len(m_shape)
    # at most one row dim of x is not 1 (checked by the caller): it is the row index m
    row_dim = next((i for i, d in enumerate(m_shape) if not (isinstance(d, tirx.IntImm) and int(d) == 1)), 0)
    m_total = m_shape[row_dim]
    zero = tirx.const(0, "int64")

    def x_at(m, kk):
        return x[(*(m if i == row_dim else zero for i in range(nd)), kk)]

    if layout == "word":
        lanes = 8 * words_per_vector  # words per vector load (= fp32 lanes)
        words = q.k // epw
        top = epw - 1  # the top code of a word is shifted down instead of masked in place
        radix = float(2**bits)

        def pow16inv(c):  # 16^-c for c = 0..6, 1 for c = 7 (the top nibble is shifted down instead)
            e = tirx.const(1.0, "float32")
            for i in range(1, top):
                e = tirx.Select(c == i, tirx.const(radix**-i, "float32"), e)
            return e

        def masked_code(word, c):
            val = tirx.Select(
                c < top,
                word & (tirx.const(lay.code_mask, word_dtype) << (c * bits).astype(word_dtype)),
                word >> tirx.const(lay.storage_bits - bits, word_dtype),
            )
            return val.astype("int32").astype("float32")  # < 2^31: the int32 convert is exact

        xt = te.compute(
            (m_total, epw, words), lambda m, c, j: x_at(m, epw * j + c) * pow16inv(c), name="x_scaled_t"
        )
        cr = te.reduce_axis((0, epw), "c")
        xs = te.compute(
            (m_total, words), lambda m, j: te.sum(x_at(m, epw * j + cr), axis=cr), name="x_word_sum"
        )
        c2 = te.reduce_axis((0, epw), "c")
        pmat = te.compute(
            (m_total, q.n, words // lanes, lanes),
            lambda m, n, b, l: te.sum(
                xt[m, c2, lanes * b + l] * masked_code(qw[n, lanes * b + l], c2), axis=c2
            ),
            name="nibble_dot",
        )
        bb = te.reduce_axis((0, words // lanes), "b")
        acc = te.compute(
            (m_total, q.n, lanes),
            lambda m, n, l: te.sum(
                qs[n, (lanes * bb + l) // lay.words_per_group].astype("float32")
                * (pmat[m, n, bb, l] - zero_point * xs[m, lanes * bb + l]),
                axis=bb,
            ),
            name="lane_acc",
        )
    else:
        lanes = epw * words_per_vector  # one vector = `words_per_vector` packed words, 8 nibbles each
        steps = lay.words_per_group // words_per_vector  # vectors per group
        gs = lay.group_size

        def nibble(n, kk):
            word = qw[n, kk // epw]
            code = (word >> ((kk % epw) * bits).astype(word_dtype)) & tirx.const(lay.code_mask, word_dtype)
            return code.astype("float32")

        w_ = te.reduce_axis((0, steps), "w")
        xg = te.compute(
            (m_total, g_count, lanes),
            lambda m, g, c: te.sum(x_at(m, gs * g + lanes * w_ + c), axis=w_),
            name="x_group_sum",
        )
        per_chain = steps // chains  # `chains` independent accumulators per row break the FMA latency chain
        w2 = te.reduce_axis((0, per_chain), "w")
        pmat = te.compute(
            (m_total, q.n, g_count, chains, lanes),
            lambda m, n, g, h, c: te.sum(
                x_at(m, gs * g + lanes * (h * per_chain + w2) + c)
                * nibble(n, gs * g + lanes * (h * per_chain + w2) + c),
                axis=w2,
            ),
            name="nibble_dot",
        )
        gg = te.reduce_axis((0, g_count), "g")

        def chain_sum(m, n, g, c):
            total = pmat[m, n, g, 0, c]
            for h in range(1, chains):
                total = total + pmat[m, n, g, h, c]
            return total

        acc = te.compute(
            (m_total, q.n, lanes),
            lambda m, n, c: te.sum(
                qs[n, gg].astype("float32") * (chain_sum(m, n, gg, c) - zero_point * xg[m, gg, c]),
                axis=gg,
            ),
            name="lane_acc",
        )
    cc = te.reduce_axis((0, lanes), "c")

    def m_of(idx):
        return idx[row_dim]

    out_shape = [*m_shape, q.n]
    mm = te.compute(out_shape, lambda *i: te.sum(acc[m_of(i[:nd]), i[nd], cc], axis=cc), name="NT_matmul")
    result = mm
    if q.other is not None:
        other = ph(q.other)
        result = te.compute(
            out_shape,
            (lambda *i: other[i] + mm[i]) if q.other_first else (lambda *i: mm[i] + other[i]),
            name="T_add",
        )
    args = [result if p.same_as(q.out) else placeholders[p] for p in func.params]
    new = te.create_prim_func(args)
    # keep exactly the original attributes: create_prim_func adds global_symbol="main", which a private
    # PrimFunc of a Relax module must not get (every kernel would export the same symbol)
    old_attrs = dict(func.attrs.items()) if func.attrs is not None else {}
    for key in list(new.attrs.keys()) if new.attrs is not None else []:
        if key not in old_attrs:
            new = new.without_attr(key)
    return new.with_attrs(old_attrs) if old_attrs else new


class CPUDequantGEMV(ScheduleRule):
    """q4 dequant + NT matmul (+ residual add) with few rows of x, re-emitted by `_regrouped_q4_gemv` so the
    scale and the -7 zero point are applied once per 32-group. layout "word" (default when K allows: vectors
    of consecutive words, and + convert + fma per 8 weights) measured 1.4x faster than "nibble" (vectors of
    the nibbles of one word), which is 1.7x faster than the per-weight form (`CPUGEMV`), hot caches, AVX2."""

    def __init__(
        self,
        rows: int = 4,
        tile_rows: int = 16,
        max_m: int = 4,
        words_per_vector: int | None = None,
        chains: int = 1,
        layout: str = "auto",
    ):
        if layout not in ("auto", "word", "nibble"):
            raise ValueError("layout must be auto, word or nibble")
        self.layout = layout
        self.rows = rows
        self.chains = chains
        self.tile_rows = tile_rows
        self.max_m = max_m
        if words_per_vector not in (None, 1, 2):
            raise ValueError("words_per_vector must be 1 (8 lanes) or 2 (16 lanes)")
        self.words_per_vector = words_per_vector  # default: a full SIMD register (8 fp32 lanes per word)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        q = _match_q4_matmul(func)
        if q is None:
            return None
        if not _few_rows(list(q.x.shape)[:-1], self.max_m):
            return None  # e.g. dynamic seq_len: prefill, CPUGEMM's job
        rows, tile = self.rows, self.tile_rows
        while tile > rows and q.n % tile:
            tile //= 2
        if q.n % tile:
            return None
        epw = q.layout.elems_per_word
        wpv = self.words_per_vector or max(1, min(2, simd_lanes_f32(target) // epw))
        layout = self.layout
        if layout == "auto":
            layout = "word" if (q.k // epw) % (epw * wpv) == 0 else "nibble"
        elif layout == "word" and (q.k // epw) % (epw * wpv):
            return None
        steps = q.layout.words_per_group // wpv
        chains = self.chains if steps % self.chains == 0 and steps // self.chains >= 2 else 1
        if layout == "word":
            chains = 1
        sch = s_tir.Schedule(_regrouped_q4_gemv(func, q, wpv, chains, layout))
        b_acc = sch.get_sblock("lane_acc")
        b_dot = sch.get_sblock("nibble_dot")
        b_mm = sch.get_sblock("NT_matmul")
        m, n, c, g = sch.get_loops(b_acc)
        n_o, n_i = sch.split(n, [None, tile])
        n_io, n_ii = sch.split(n_i, [None, rows])
        sch.reorder(n_o, m, n_io, g, n_ii, c)
        sch.compute_at(b_dot, g)
        sch.set_scope(b_dot, 0, "local")
        # dot loops below g: rows, [chain], lanes, reduction; the reduction goes outermost so that one
        # x vector load feeds `rows` rows
        if chains > 1:
            d_n, d_h, d_c, d_w = sch.get_loops(b_dot)[-4:]
            sch.reorder(d_w, d_h, d_n, d_c)
            sch.unroll(d_h)
        else:  # compute_at dropped the unit chain loop
            d_n, d_c, d_w = sch.get_loops(b_dot)[-3:]
            sch.reorder(d_w, d_n, d_c)
        sch.unroll(d_w)
        sch.unroll(d_n)
        sch.vectorize(d_c)
        sch.unroll(n_ii)
        sch.vectorize(c)
        sch.set_scope(b_acc, 0, "local")
        sch.reverse_compute_at(b_mm, n_io)
        try:
            sch.reverse_compute_at(sch.get_sblock("T_add"), n_io)
        except Exception:  # noqa: BLE001 - no epilogue
            pass
        sch.parallel(n_o)
        sch.decompose_reduction(b_acc, g)
        sch.decompose_reduction(b_dot, d_w)
        if layout == "word":
            xt_loops = sch.get_loops(sch.get_sblock("x_scaled_t"))
            if (q.k // epw) % 8 == 0:
                sch.vectorize(sch.split(xt_loops[-1], [None, 8])[1])
        else:
            sch.vectorize(sch.get_loops(sch.get_sblock("x_group_sum"))[2])
        return sch


class CPUQ8DotGEMV(ScheduleRule):
    """The same q4 dequant-GEMVs as `CPUDequantGEMV`, computed with int8 activations and integer dot
    products (`cpu_q8_gemv.q8_dot_gemv`, llama.cpp's Q4 x Q8 scheme) in the widest instruction-set path
    the target's CPU has (`cpu_isa`: AVX-512 VNNI, AVX-VNNI, AVX2), or in `isa` when given (declined where
    the CPU lacks it). A shape the widest path can't step through (K not a multiple of 128 for 512 bits)
    takes the next one. Rows of W are streamed one at a time, strictly in memory order: Phi-3-mini shapes,
    1 thread, cold caches: 8.2 GB/s of q4 weights against 4.3 with 4 rows interleaved (the hardware
    prefetcher loses track of 4 short streams)."""

    def __init__(
        self,
        rows: int | None = None,
        tile: int | None = None,
        max_m: int = 4,
        isa: str | None = None,
        knobs: Knobs | None = None,
        prefetch: int | None = None,
        prefetch_level: int | None = None,
    ) -> None:
        """`rows` / `tile` / `prefetch` / `prefetch_level` fix those sizes; else they come from `knobs`
        (compile/knobs.py), else its DEFAULTS."""
        self.rows, self.tile, self.max_m, self.isa, self.knobs = rows, tile, max_m, isa, knobs
        self.prefetch, self.prefetch_level = prefetch, prefetch_level

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        from .cpu_q8_gemv import q8_dot_gemv, steps_through

        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        isas = [i for i in q8_dot_isas(target) if self.isa in (None, i)]
        if not isas:
            return None
        q = _match_q4_matmul(func, INT8_LAYOUTS)
        if q is None or not _few_rows(list(q.x.shape)[:-1], self.max_m):
            return None
        sizes = self.knobs.gemv(q.n, q.k) if self.knobs is not None else DEFAULTS["q4_gemv"]
        rows, tile = self.rows or sizes["rows"], self.tile or sizes["tile"]
        prefetch = sizes["prefetch"] if self.prefetch is None else self.prefetch
        level = sizes["prefetch_level"] if self.prefetch_level is None else self.prefetch_level
        if q.n % tile or tile % rows:
            return None
        # a path that can't step through K takes the next narrower one; 8-bit codes skip AVX-512BW's
        isa = next(
            (
                i
                for i in isas
                if steps_through(i, q.layout, q.k) and not (i == "avx512bw" and q.layout.bits == 8)
            ),
            None,
        )
        if isa is None:
            return None
        return s_tir.Schedule(
            q8_dot_gemv(func, q, isa=isa, rows=rows, tile=tile, prefetch=prefetch, prefetch_level=level)
        )


class CPUQ8VNNIGEMM(ScheduleRule):
    """q4 dequant + matmul (+ residual add) with many rows of x (prefill), int8 activations and AMX tiles
    (`cpu_amx_gemm.q8_amx_gemm`: 16 rows of x by 16 weight rows per tile product) or else the widest
    `vpdpbusd` the CPU has (`cpu_q8_gemm.q8_vnni_gemm`), else `vpmaddubsw` in the same kernel, 512-bit with
    AVX-512BW, else AVX2's (codes up to 6 bits: GGUF's Q8_0 keeps `CPUQ4OuterGEMM`'s fp32 tiles, as do fp32
    activations). Register block: 12 rows of x by 16 weight rows on 512 bits (32 registers), 6 by 8 on 256
    bits (AVX-VNNI CPUs without AVX-512 have 16), 3 rows for `vpmaddubsw` (`knobs.gemm_rows`). On arm64 the
    same with `smmla` (i8mm) or `sdot` (DotProd) (`cpu_arm_dot.q8_arm_gemm`): 4 rows of x by 8 weight
    rows, 8 int32 + 8 fp32 accumulator registers of the 32."""

    def __init__(self, max_m: int = 4, knobs: Knobs | None = None) -> None:
        self.max_m, self.knobs = max_m, knobs

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        from .cpu_q8_gemm import q8_vnni_gemm

        isa = q8_gemm_isa(target) if isinstance(func, tirx.PrimFunc) and _is_llvm(target) else None
        if isa is None:
            return None
        lanes = ARM_GEMM_NR if isa.startswith("neon") else Q8_GEMM_LANES[isa]
        q = _match_q4_matmul(func, INT8_LAYOUTS)
        if q is None or q.n % lanes or _few_rows(list(q.x.shape)[:-1], self.max_m):
            return None
        if isa == "amx":
            from .cpu_amx_gemm import q8_amx_gemm

            return s_tir.Schedule(q8_amx_gemm(func, q))
        if isa.startswith("neon"):
            from .cpu_arm_dot import gemm_fits, q8_arm_gemm  # nibble codes only: not Q8_0

            if not gemm_fits(q, isa=isa, nr=lanes):
                return None
            return s_tir.Schedule(q8_arm_gemm(func, q, isa=isa, mr=4, nr=lanes))
        if isa in MADDUBS_ISAS and q.layout.bits == 8:  # Q8_0's codes would saturate the int16 pairs
            return None
        mr = gemm_rows(isa)
        if self.knobs is not None:  # a 256-bit path has 16 registers: at most 6 rows of x
            mr = min(self.knobs.get("q8_gemm", shape_key(q.n, q.k))["mr"], 12 if lanes == 16 else 6)
        return s_tir.Schedule(
            q8_vnni_gemm(func, q, mr=mr, lanes=lanes, isa=isa if isa in MADDUBS_ISAS else "vnni")
        )


class CPUQ4OuterGEMM(ScheduleRule):
    """q4 dequant + matmul (+ residual add) with many rows of x (prefill): `cpu_q4_gemm.q4_outer_gemm`, an
    outer-product register block of 6 rows of x by 2 vectors of weight rows over a transposed fp32 tile,
    in the target's vector width (`cpu_isa.q4_gemm_isa`: 16 rows of 8 lanes with AVX2, 32 of 16 lanes with
    AVX-512). Phi-3-mini qkv, 128 rows, 1 thread, AVX2: 81 GFLOP/s against 34 for `CPUGEMM`'s dot-product
    form."""

    def __init__(self, mr: int = 6, max_m: int = 4) -> None:
        self.mr, self.max_m = mr, max_m

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        from .cpu_q4_gemm import q4_outer_gemm

        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        q = _match_q4_matmul(func)
        if q is None or _few_rows(list(q.x.shape)[:-1], self.max_m):
            return None
        widths = [Q4_GEMM_LANES[q4_gemm_isa(target)], 8]  # weight rows per tile: 2 vectors, else 1
        lanes, nr = next(((w, m * w) for w in widths for m in (2, 1) if q.n % (m * w) == 0), (0, 0))
        if not nr:
            return None
        return s_tir.Schedule(q4_outer_gemm(func, q, mr=self.mr, nr=nr, lanes=lanes))


def _few_rows(m_shape: list, max_m: int) -> bool:
    """x has at most one row dim that isn't 1 and it is decode's dynamic batch or a static count <= max_m."""
    if sum(1 for d in m_shape if not (isinstance(d, tirx.IntImm) and int(d) == 1)) > 1:
        return False
    if all(isinstance(d, tirx.IntImm) for d in m_shape):
        total = 1
        for d in m_shape:
            total *= int(d)
        return total <= max_m
    return _decode_like(m_shape)


class CPUGEMM(ScheduleRule):
    """NT matmul with many (typically dynamic: prefill) rows of x, optionally behind a dequantize block.

    Per thread-task: a tile of `tile_rows` weight rows is dequantized once into a fp32 scratch tile
    (L2-resident) and reused by every row of x; the micro-kernel keeps `rows` weight rows x `lanes` in vector
    accumulators (rfactor over the lanes) so each x vector load feeds `rows` FMAs.
    """

    def __init__(self, lanes: int | None = None, rows: int = 4, tile_rows: int = 16, m_rows: int = 1) -> None:
        self.lanes = lanes
        self.rows = rows
        self.tile_rows = tile_rows
        self.m_rows = m_rows

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        stmts = [sch.get(b) for b in blocks]
        mm_idx = [i for i, st in enumerate(stmts) if any(int(iv.iter_type) == 2 for iv in st.iter_vars)]
        if len(mm_idx) != 1:
            return None
        i_mm = mm_idx[0]
        producers, consumers = blocks[:i_mm], blocks[i_mm + 1 :]
        if len(producers) > 1 or any(
            any(int(iv.iter_type) != 0 for iv in sch.get(b).iter_vars) for b in producers + consumers
        ):
            return None
        # reuse the GEMV analysis on a copy where the dequantize is inlined, to check the matmul shape
        probe = s_tir.Schedule(func)
        info = _analyze_matmul(probe)
        if info is None:
            return None
        lanes = self.lanes or simd_lanes_f32(target)
        if info.k % lanes:
            return None
        rows, tile = self.rows, self.tile_rows
        while tile > rows and info.n % tile:
            tile //= 2
        if info.n % tile:
            tile = rows = 1
        block = blocks[i_mm]
        loops = sch.get_loops(block)
        if len(loops) != len(stmts[i_mm].iter_vars):
            return None
        m_loops, n_loop, k_loop = loops[:-2], loops[-2], loops[-1]
        m = sch.fuse(*m_loops) if len(m_loops) > 1 else (m_loops[0] if m_loops else sch.add_unit_loop(block))
        n_o, n_i = sch.split(n_loop, [None, tile])
        k_o, k_l = sch.split(k_loop, [None, lanes])
        sch.reorder(n_o, m, n_i, k_o, k_l)
        rf = sch.rfactor(k_l, factor_axis=len(stmts[i_mm].writes[0].region))
        r_n_o, r_m, r_n_i, r_k_o, r_k_l = sch.get_loops(rf)[-5:]
        n_io, n_ii = sch.split(r_n_i, [None, rows])
        if self.m_rows > 1:
            # rows of x x rows of W per micro-kernel; a dynamic M leaves a guarded tail
            m_o, m_i = sch.split(r_m, [None, self.m_rows])
            sch.reorder(m_o, n_io, r_k_o, m_i, n_ii, r_k_l)
            sch.unroll(m_i)
        else:
            sch.reorder(n_io, r_k_o, n_ii, r_k_l)
        sch.vectorize(r_k_l)
        sch.unroll(n_ii)
        sch.reverse_compute_at(block, n_io)
        for epi in consumers:
            try:
                sch.reverse_compute_at(epi, n_io)
            except Exception:  # noqa: BLE001 - an epilogue that isn't per-row stays a separate loop nest
                _schedule_elementwise(sch, epi, lanes)
        if producers:
            deq = producers[0]
            sch.compute_at(deq, r_n_o)
            d_loops = sch.get_loops(deq)[-2:]
            d_k = d_loops[-1]
            d_ext = _extent(sch, d_k)
            if isinstance(d_ext, int) and d_ext % lanes == 0:
                _, d_kl = sch.split(d_k, [None, lanes])
                sch.vectorize(d_kl)
        sch.parallel(r_n_o)
        sch.decompose_reduction(rf, r_k_o)
        return sch


def _schedule_elementwise(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse all loops of an injective block, vectorize the innermost `lanes`, parallelize the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = _extent(sch, fused)
    if isinstance(ext, int) and ext < lanes:
        return
    outer, inner = sch.split(fused, [None, lanes])
    sch.parallel(outer)
    sch.vectorize(inner)


class CPUElementwise(ScheduleRule):
    """Injective-only PrimFuncs (rope, silu*mul, casts, adds): inline into one loop nest, vectorize the
    innermost `lanes`, and use threads only when there is enough work to pay for the launch
    (`cpu_parallel_guard`: decided at run time when the size is symbolic)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_llvm(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(i.is_injective() for i in infos):
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1:
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        store = sch.get(block).body
        if not loops or _kind(store) != "BufferStore" or any(_has_load(i) for i in store.indices):
            return None  # scatter through an index buffer (KV-cache append): leave it serial and scalar
        lanes = simd_lanes_f32(target)
        inner_ext = _extent(sch, loops[-1])
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        vectorizable = isinstance(inner_ext, int) and inner_ext % lanes == 0
        if vectorizable:
            outer, inner = sch.split(fused, [None, lanes])
            sch.vectorize(inner)
        else:
            outer = fused
        parallel_if_enough(sch, outer, lanes if vectorizable else 1)
        return sch


def cpu_schedule_rules(
    target: Target, q4_activations: str = "float32", knobs: Knobs | None = None
) -> list[ScheduleRule]:
    """The rules for `dl.ApplyDefaultSchedule`, most specific first. `q4_activations="int8"` (a preset
    setting) computes q4 GEMVs with int8 activations where the CPU has AVX2; `knobs` sizes those kernels.

    Kernels no rule accepts (attention, KV-cache kernels, which come scheduled) are left as they are."""
    from tvm.s_tir.dlight.cpu import Reduction

    from ..targets import Q4_ACTIVATIONS
    from .cpu_row_reduction import CPURowReduction

    if q4_activations not in Q4_ACTIVATIONS:
        raise ValueError(f"q4_activations must be one of {Q4_ACTIVATIONS}, got {q4_activations!r}")
    int8 = [CPUQ8DotGEMV(knobs=knobs), CPUQ8VNNIGEMM(knobs=knobs)] if q4_activations == "int8" else []
    return [
        *int8,
        CPUDequantGEMV(),
        CPUGEMV(),
        CPUQ4OuterGEMM(),
        CPUGEMM(),
        CPUElementwise(),
        CPURowReduction(simd_lanes_f32(target)),
        Reduction(),
    ]
