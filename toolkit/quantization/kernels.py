"""Compiled host kernels for the numpy-heavy parts of group quantization, bit-identical to the numpy code
they stand in for: the clip search's per-group choice (`clip_search`) and RTN codes packed into words
(`group_quant.quantize`).

The clip search scores every ratio of a group in float32 exactly as the numpy loop does, then checks the
winner against RTN with the exact codes and a float64 sum: the same operations in the same order, a group's
errors summed the way numpy sums 8 to 128 contiguous values (8 running sums, then a fixed tree), and no fused
multiply-add (LLVM would contract `w - q * s`), so it picks the same scales bit for bit. numpy makes a dozen
passes over memory per ratio; the kernel reads a group once per batch of ratios, in registers.

Each kernel is built once per process and layout on first use (TVM, then a second or two of LLVM).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import GroupLayout

LANES = 8  # numpy's pairwise sum keeps 8 running sums
_MAX_GROUP = 128  # numpy's pairwise block: longer runs are split in halves first


_numpy_only = 0  # > 0: inside numpy_only()


@contextmanager
def numpy_only() -> Iterator[None]:
    """The numpy paths instead of the kernels (bit-identical) while the block runs, and TVM not imported
    for them: GPTQ's peak memory is its limit, and the kernels' process (TVM's compiler, LLVM) adds about
    0.5 GB of peak RSS there, for seconds against its minutes."""
    global _numpy_only
    _numpy_only += 1
    try:
        yield
    finally:
        _numpy_only -= 1


def active() -> bool:
    """Whether the compiled kernels stand in for the numpy code (everywhere but inside `numpy_only`)."""
    return _numpy_only == 0


def supports(group_size: int) -> bool:
    """Whether the clip kernel sums a group in numpy's order (a multiple of 8, at most 128 values)."""
    return group_size % LANES == 0 and 0 < group_size <= _MAX_GROUP


def packs(layout: GroupLayout) -> bool:
    """Whether the quantize kernel packs this layout (4-bit codes, eight to a uint32 word)."""
    return layout.bits == 4 and np.dtype(layout.storage) == np.uint32 and layout.group_size % 8 == 0


def _squared_error(mi: float):
    from tvm.script import tirx as T

    def squared_error(w, s):
        # an expression, not Let bindings: TVM's vectorizer miscomputes a Let inside a vectorized loop
        d = w - T.min(T.max(T.nearbyint(w / s), T.float32(-mi)), T.float32(mi)) * s
        return d * d

    return squared_error


def _to_scale(scale_dtype: str):
    from tvm.script import tirx as T

    def to_scale(x):
        # the stored scale's rounding (numpy: .astype(scale dtype)), back in float32
        return T.Cast("float32", T.Cast("float16", x)) if scale_dtype == "float16" else x

    return to_scale


def _to_grid(scale_dtype: str):
    from tvm.script import tirx as T

    def to_grid(x):
        # group_quant.round_to_f16_grid: the runtime's fp16 arithmetic, on float32 bits
        if scale_dtype != "float16":
            return x
        u = T.reinterpret("uint32", x)
        u = (u + (T.uint32(0xFFF) + ((u >> T.uint32(13)) & T.uint32(1)))) & T.uint32(0xFFFFE000)
        return T.reinterpret("float32", u)

    return to_grid


def _code(mi: float, scale_dtype: str):
    from tvm.script import tirx as T

    to_grid = _to_grid(scale_dtype)

    def code(w, s):
        # group_quant.group_codes: round(fp(fp(w / s) + max_int)), clamped; max_int for a zero scale
        shifted = to_grid(to_grid(w / s) + T.float32(mi))
        c = T.min(T.max(T.nearbyint(shifted), T.float32(0)), T.float32(2 * mi))
        return T.if_then_else(s == T.float32(0), T.float32(mi), c)

    return code


def _exact_error(mi: float, zero_point: int, scale_dtype: str):
    from tvm.script import tirx as T

    code, to_grid = _code(mi, scale_dtype), _to_grid(scale_dtype)

    def exact_error(w, s):
        # group_quant.dequantize_groups of the codes: the values the runtime sees
        d = w - to_grid((code(w, s) - T.float32(zero_point)) * s)
        return d * d

    return exact_error


def _largest(m):
    """The largest of LANES local values (a vector max's lanes folded; exact, so any order)."""
    from tvm.script import tirx as T

    return T.max(T.max(T.max(m[0], m[1]), T.max(m[2], m[3])), T.max(T.max(m[4], m[5]), T.max(m[6], m[7])))


def _load(func, name: str):
    """Compile a PrimFunc for this host, without FMA (numpy rounds a product before it adds), and load it."""
    import tvm

    from ..targets import load_preset

    target = dict(load_preset("host").target_dict)
    target.pop("num-cores", None)
    target["mattr"] = [*target.get("mattr", []), "-fma"]
    lib = tvm.compile(tvm.IRModule({name: func}), target=tvm.target.Target(target))
    with tempfile.TemporaryDirectory(prefix="phi3-quant-kernel-") as folder:
        path = Path(folder) / f"{name}.so"
        lib.export_library(str(path))
        return tvm.runtime.load_module(str(path))[name]  # mapped: the file may go


def _build_search(
    group_size: int, max_int: int, zero_point: int, scale_dtype: str, n_coarse: int, n_fine: int
):
    from tvm.script import tirx as T

    chunks = group_size // LANES
    mi = float(max_int)

    squared_error = _squared_error(mi)
    to_scale = _to_scale(scale_dtype)
    exact_error = _exact_error(mi, zero_point, scale_dtype)

    n_most = max(n_coarse, n_fine)

    # fmt: off
    @T.macro
    def errors(wg, wt, b, g, sc, n, acc, err):
        """err[c] for the n scales sc[c]: every candidate's sums advance with each chunk of the group read
        once (n independent chains for the core to overlap)."""
        for i in range(n * LANES):
            acc[i] = T.float32(0)
        for k in range(chunks):
            for c in T.unroll(n):
                for j in T.vectorized(LANES):
                    acc[c * LANES + j] = acc[c * LANES + j] + squared_error(
                        wg[b, g, k * LANES + j], sc[c]) * wt[g, k * LANES + j]
        for c in range(n):
            err[c] = T.if_then_else(
                sc[c] > T.float32(0),
                ((acc[c * LANES] + acc[c * LANES + 1]) + (acc[c * LANES + 2] + acc[c * LANES + 3]))
                + ((acc[c * LANES + 4] + acc[c * LANES + 5]) + (acc[c * LANES + 6] + acc[c * LANES + 7])),
                T.float32(float("inf")),  # an all-zero group: RTN (code 7) is exact
            )

    @T.macro
    def exact(wg, wt, b, g, s, acc64, out, i):
        """out[i]: the exact squared error of scale s, summed in float64 (clip_search._exact_errors)."""
        for j in T.vectorized(LANES):
            acc64[j] = T.float64(0)
        for k in range(chunks):
            for j in T.vectorized(LANES):
                acc64[j] = acc64[j] + T.Cast("float64", exact_error(wg[b, g, k * LANES + j], s)
                                              * wt[g, k * LANES + j])
        out[i] = (((acc64[0] + acc64[1]) + (acc64[2] + acc64[3]))
                  + ((acc64[4] + acc64[5]) + (acc64[6] + acc64[7])))

    @T.prim_func
    def search(wg_h: T.handle, wt_h: T.handle, ma_h: T.handle, co_h: T.handle, fi_h: T.handle,
               out_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "search"})
        B = T.int64()
        G = T.int64()
        wg = T.match_buffer(wg_h, (B, G, group_size), "float32", align=4)
        wt = T.match_buffer(wt_h, (G, group_size), "float32", align=4)
        ma = T.match_buffer(ma_h, (B, G), "float32", align=4)  # out: max |w| per group
        co = T.match_buffer(co_h, (n_coarse,), "float32", align=4)
        fi = T.match_buffer(fi_h, (n_fine,), "float32", align=4)
        out = T.match_buffer(out_h, (B, G), "float32", align=4)
        acc = T.alloc_buffer((n_most * LANES,), "float32", scope="local")
        sc = T.alloc_buffer((n_most,), "float32", scope="local")  # candidate scales
        ratio = T.alloc_buffer((n_most,), "float32", scope="local")
        err = T.alloc_buffer((n_most,), "float32", scope="local")
        best = T.alloc_buffer((2,), "float32", scope="local")  # ratio, error
        acc64 = T.alloc_buffer((LANES,), "float64", scope="local")
        kept = T.alloc_buffer((2,), "float64", scope="local")  # exact errors: best, RTN
        mx = T.alloc_buffer((LANES,), "float32", scope="local")

        for b, g in T.grid(B, G):
            for j in T.vectorized(LANES):
                mx[j] = T.float32(0)
            for k in range(chunks):
                for j in T.vectorized(LANES):
                    mx[j] = T.max(mx[j], T.fabs(wg[b, g, k * LANES + j]))
            ma[b, g] = _largest(mx)
            # coarse ratios (the first is 1.0), then offsets around the best of them; strict comparisons:
            # ties keep the earlier (larger) ratio
            for c in range(n_coarse):
                ratio[c] = co[c]
                sc[c] = to_scale(ma[b, g] * co[c] / T.float32(mi))
            errors(wg, wt, b, g, sc, n_coarse, acc, err)
            best[0] = ratio[0]
            best[1] = err[0]
            for c in range(1, n_coarse):
                if err[c] < best[1]:
                    best[0] = ratio[c]
                    best[1] = err[c]
            if n_fine > 0:
                for c in range(n_fine):
                    ratio[c] = T.min(T.max(best[0] + fi[c], T.float32(0)), T.float32(1))
                    sc[c] = to_scale(ma[b, g] * ratio[c] / T.float32(mi))
                errors(wg, wt, b, g, sc, n_fine, acc, err)
                for c in range(n_fine):
                    if err[c] < best[1]:
                        best[0] = ratio[c]
                        best[1] = err[c]
            # the float32 error is a proxy: RTN (ratio 1) stays wherever the exact error is not smaller. When
            # the proxy already chose ratio 1, both exact errors are of the same scale (ma * 1 is ma): RTN
            if best[0] == T.float32(1):
                out[b, g] = T.float32(1)
            else:
                exact(wg, wt, b, g, to_scale(ma[b, g] * best[0] / T.float32(mi)), acc64, kept, 0)
                exact(wg, wt, b, g, to_scale(ma[b, g] / T.float32(mi)), acc64, kept, 1)
                out[b, g] = T.if_then_else(kept[0] >= kept[1], T.float32(1), best[0])
    # fmt: on

    return _load(search, "search")


def _call(fn, *args) -> None:
    """Call a kernel on numpy arrays without copies (and scalars as they are). numpy's arrays are 16-byte
    aligned; the kernels' buffers declare only float alignment."""
    import tvm_ffi

    fn(*[tvm_ffi.from_dlpack(a, require_alignment=4) if isinstance(a, np.ndarray) else a for a in args])


_lock = threading.Lock()
_kernels: dict[tuple, object] = {}


def _kernel(build, *key):
    """The kernel `build(*key)` returns, built once per process (whichever row-block thread asks first)."""
    with _lock:
        if (build, *key) not in _kernels:
            _kernels[(build, *key)] = build(*key)
        return _kernels[(build, *key)]


def clip_ratios(
    wg: np.ndarray,
    weights: np.ndarray | None,
    coarse: tuple[float, ...],
    fine: tuple[float, ...],
    scale_dtype: np.dtype,
    layout: GroupLayout,
) -> tuple[np.ndarray, np.ndarray]:
    """(the clipping ratio per group (B, G), max |w| per group) of grouped float32 weights `wg` (B, G, group
    size) that `clip_search` picks: the best coarse ratio (the first is 1.0), refined by the `fine` offsets,
    and 1.0 (RTN) wherever that is not strictly better by the exact error."""
    b, g, gs = wg.shape
    key = (gs, layout.max_int, layout.zero_point, np.dtype(scale_dtype).name, len(coarse), len(fine))
    fn = _kernel(_build_search, *key)
    wt = np.ones((g, gs), np.float32) if weights is None else np.ascontiguousarray(weights, np.float32)
    out = np.empty((b, g), np.float32)
    max_abs = np.empty((b, g), np.float32)
    args = [
        np.ascontiguousarray(wg, np.float32),
        wt,
        max_abs,
        np.array([np.float32(r) for r in coarse], np.float32),
        np.array([np.float32(f) for f in fine], np.float32),
        out,
    ]
    _call(fn, *args)
    return out, max_abs


def _build_quantize(group_size: int, max_int: int, scale_dtype: str, given_scales: bool):
    from tvm.script import tirx as T

    mi = float(max_int)
    code = _code(mi, scale_dtype)
    to_scale = _to_scale(scale_dtype)
    words = group_size // 8

    def masked_code(wg, b, g, i, s, k):
        # padding past column k packs as 0 (MLC's layout)
        return T.Cast("uint32", T.if_then_else(g * group_size + i < k, code(wg[b, g, i], s), T.float32(0)))

    def word(c, i):
        # group_quant.pack: code e of word i at bits 4e
        out = c[i * 8]
        for e in range(1, 8):
            out = out | (c[i * 8 + e] << T.uint32(4 * e))
        return out

    # fmt: off
    @T.prim_func
    def quantize(wg_h: T.handle, s_h: T.handle, q_h: T.handle, k: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "quantize"})
        B = T.int64()
        G = T.int64()
        wg = T.match_buffer(wg_h, (B, G, group_size), "float32", align=4)
        sb = T.match_buffer(s_h, (B, G), "float32", align=4)  # given scales in, else RTN's out
        q = T.match_buffer(q_h, (B, G * words), "uint32", align=4)
        mx = T.alloc_buffer((LANES,), "float32", scope="local")
        s = T.alloc_buffer((1,), "float32", scope="local")  # the group's scale, loaded once
        c = T.alloc_buffer((group_size,), "uint32", scope="local")
        # the max and the codes run on vectors of a group's values; expressions only inside them (a Let
        # inside a vectorized loop is miscomputed, as `_squared_error` says)
        for b, g in T.grid(B, G):
            if not given_scales:  # group_quant.rtn_scales: max|w| / max_int in the scale dtype
                for j in T.vectorized(LANES):
                    mx[j] = T.float32(0)
                for i in range(group_size // LANES):
                    for j in T.vectorized(LANES):
                        mx[j] = T.max(mx[j], T.fabs(wg[b, g, i * LANES + j]))
                sb[b, g] = to_scale(_largest(mx) / T.float32(mi))
            s[0] = sb[b, g]
            for i in T.vectorized(group_size):
                c[i] = masked_code(wg, b, g, i, s[0], k)
            for i in range(words):
                q[b, g * words + i] = word(c, i)
    # fmt: on

    return _load(quantize, "quantize")


def quantize_groups(
    wg: np.ndarray, k: int, scales: np.ndarray | None, scale_dtype: np.dtype, layout: GroupLayout
) -> tuple[np.ndarray, np.ndarray]:
    """`group_quant.quantize` of one row block, grouped (B, G, group size) float32 values of the model dtype
    over `k` real columns: (packed words (B, G * group size / 8) uint32, scales (B, G) in `scale_dtype`).
    `scales` given: those (values of `scale_dtype`), else RTN's."""
    b, g, gs = wg.shape
    dtype = np.dtype(scale_dtype)
    fn = _kernel(_build_quantize, gs, layout.max_int, dtype.name, scales is not None)
    s = (
        np.empty((b, g), np.float32)
        if scales is None
        else np.ascontiguousarray(scales, dtype).astype(np.float32)
    )
    q = np.empty((b, g * gs // 8), np.uint32)
    _call(fn, np.ascontiguousarray(wg, np.float32), s, q, k)
    return q, s.astype(dtype)


def _build_group(group_size: int, fp16: bool):
    from tvm.script import tirx as T

    # fmt: off
    @T.prim_func
    def group(w_h: T.handle, wg_h: T.handle, big_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "group"})
        B = T.int64()
        K = T.int64()
        G = T.int64()
        w = T.match_buffer(w_h, (B, K), "float32", align=4)
        wg = T.match_buffer(wg_h, (B, G, group_size), "float32", align=4)
        big = T.match_buffer(big_h, (B,), "float32", align=4)
        for b in range(B):
            big[b] = T.float32(0)
            for g, i in T.grid(G, group_size):
                # zero padding past column K; fp16: astype(float16) and back
                col = g * group_size + i
                x = T.if_then_else(col < K, w[b, T.min(col, K - 1)], T.float32(0))
                wg[b, g, i] = T.Cast("float32", T.Cast("float16", x)) if fp16 else x
                if fp16:  # the largest magnitude; a NaN sticks (numpy's max of a row with one is NaN)
                    big[b] = T.if_then_else(T.isnan(wg[b, g, i]) or T.isnan(big[b]), T.float32(float("nan")),
                                            T.max(big[b], T.fabs(wg[b, g, i])))
    # fmt: on

    return _load(group, "group")


def grouped(w: np.ndarray, dtype: np.dtype, layout: GroupLayout) -> np.ndarray:
    """`group_quant._grouped`: (N, K) -> (N, G, group size) float32 values of the model dtype, zero-padded
    along K, the same values and the same refusal of weights beyond float16."""
    n, k = w.shape
    fp16 = np.dtype(dtype) == np.float16
    fn = _kernel(_build_group, layout.group_size, fp16)
    wg = np.empty((n, layout.num_groups(k), layout.group_size), np.float32)
    big = np.zeros(n, np.float32)
    rows = np.ascontiguousarray(w, np.float32)
    _call(fn, rows, wg, big)
    top = big.max(initial=0.0)
    if fp16 and not top <= 65504:
        raise ValueError(f"weight magnitude {top} does not fit float16")
    return wg
