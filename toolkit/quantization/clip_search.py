"""Better-than-round-to-nearest scales for the same q4 storage: a per-group search over clipping ratios.

Round-to-nearest (RTN) sets scale = max|w| / 7, so a single outlier stretches the grid for the other 31
weights of its group. Clipping (scale = ratio * max|w| / 7, ratio < 1) trades a larger error on the outlier
for a finer grid everywhere else. Per group we try a coarse grid of ratios (1.0 = RTN first), then two
ratios half a step either side of the best, scoring each by squared reconstruction error in float32; the
winner is re-checked with the exact codes and dequantized values the runtime sees, and RTN is kept wherever
it is not strictly worse. So no group ever loses to RTN.
The error can be weighted per input channel by E[x_k^2] of the activations feeding the layer (the expected
output error of a Linear is sum_k E[x_k^2] (w_k - w'_k)^2 for uncorrelated inputs).

Only the scales change: `quantize(w, scheme, scales=...)` gives an ordinary q4f16_1 / q4f32_1 tensor.
"""

from __future__ import annotations

import numpy as np

from ..row_blocks import parallel_row_blocks
from . import GroupLayout, QuantScheme, get_scheme, kernels
from . import group_quant as gq

# Coarse grid (1.0 = RTN first, so ties keep RTN), then +-half a step around each group's best coarse ratio.
# Below ~0.55 clipping only loses on real weights (SmolLM2: no group picked the lowest ratios).
COARSE_RATIOS: tuple[float, ...] = tuple(np.round(np.arange(1.0, 0.5, -0.05), 3))
FINE_OFFSETS: tuple[float, ...] = (-0.025, 0.025)
# 64 rows x 3072 float32 = 768 KB: the per-candidate temporaries stay in L2
_ROW_BLOCK = 64


def _candidate_errors(
    wg: np.ndarray, s: np.ndarray, weights: np.ndarray | None, buf: np.ndarray, max_int: int
) -> np.ndarray:
    """Squared error per group of scales `s` (B, G) (float32 values of the stored dtype), float32 arithmetic.

    Uses clip(rint(w / s), -7, 7) rather than the bit-exact fp16 codes: 3x cheaper, and the choice it makes is
    re-checked exactly against RTN afterwards.
    """
    s3 = s[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(wg, s3, out=buf)
    np.rint(buf, out=buf)
    np.clip(buf, -max_int, max_int, out=buf)
    buf *= s3
    np.subtract(wg, buf, out=buf)
    np.square(buf, out=buf)
    if weights is not None:
        buf *= weights
    err = buf.sum(axis=-1)
    return np.where(s > 0, err, np.inf)  # s == 0 only for all-zero groups, where RTN (code 7) is exact


def _exact_errors(
    wg: np.ndarray, s: np.ndarray, weights: np.ndarray | None, layout: GroupLayout
) -> np.ndarray:
    d = wg - gq.dequantize_groups(gq.group_codes(wg, s, layout), s, layout)
    d *= d
    if weights is not None:
        d *= weights
    return d.sum(axis=-1, dtype=np.float64)


def search_scales(
    w: np.ndarray,
    scheme: QuantScheme | str = "q4f16_1",
    act_sq: np.ndarray | None = None,
    coarse: tuple[float, ...] = COARSE_RATIOS,
    fine: tuple[float, ...] = FINE_OFFSETS,
    row_block: int = _ROW_BLOCK,
) -> np.ndarray:
    """Per-group scales (N, G) in the scheme's scale dtype minimising the (weighted) squared error.

    `act_sq` (K,): optional per-input-channel weights (mean squared activation); None = plain squared error.
    `row_block`: rows per task (tasks run in threads); GPTQ searches one group column at a time, where a
    single block of all rows avoids the per-task overhead.
    Every group ends with an error (exact codes, exact dequantized values) no larger than RTN's.
    """
    scheme = get_scheme(scheme)
    if scheme.kind != "group":
        raise ValueError(f"{scheme.name} does not quantize weights")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if not coarse or coarse[0] != 1.0:
        raise ValueError("the coarse ratios must start with 1.0 (round-to-nearest)")
    dtype = np.dtype(scheme.scale_dtype)
    n, k = w.shape
    layout = scheme.layout
    g = layout.num_groups(k)
    weights = None
    if act_sq is not None:
        if act_sq.shape != (k,):
            raise ValueError(f"act_sq has shape {act_sq.shape}, expected ({k},)")
        padded = np.zeros(g * layout.group_size, np.float32)
        padded[:k] = act_sq
        weights = padded.reshape(g, layout.group_size)
    out = np.empty((n, g), dtype)
    parallel_row_blocks(
        lambda r0: _search_block(w, r0, r0 + row_block, dtype, weights, coarse, fine, out, layout),
        n,
        row_block,
    )
    return out


def _best_ratios(wg, weights, coarse, fine, max_int, scales_for) -> np.ndarray:
    """The candidate loop in numpy (float32 proxy errors): the best ratio per group. `kernels.clip_ratios`
    makes the same choice bit for bit (with the RTN check), for group sizes it supports."""
    buf = np.empty_like(wg)
    best_ratio = np.ones(wg.shape[:-1], np.float32)
    best_err = _candidate_errors(wg, scales_for(np.float32(1.0)).astype(np.float32), weights, buf, max_int)
    for ratio in coarse[1:]:
        err = _candidate_errors(wg, scales_for(ratio).astype(np.float32), weights, buf, max_int)
        better = err < best_err  # strict: ties keep the larger ratio
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
        best_err = np.minimum(err, best_err)
    centre = best_ratio.copy()
    for off in fine:
        ratio = np.clip(centre + np.float32(off), 0.0, 1.0)
        err = _candidate_errors(wg, scales_for(ratio).astype(np.float32), weights, buf, max_int)
        better = err < best_err
        best_ratio = np.where(better, ratio, best_ratio)
        best_err = np.minimum(err, best_err)
    return best_ratio


def _search_block(w, r0, r1, dtype, weights, coarse, fine, out, layout: GroupLayout) -> None:
    """Best scales for rows r0 : r1 of `w`, written into `out`."""
    wg = gq._grouped(w[r0:r1], dtype, layout)
    max_int = layout.max_int

    def scales_for(ratio):
        # ratio 1.0 reproduces rtn_scales exactly (max * 1 / max_int, one rounding)
        return (max_abs * np.float32(ratio) / np.float32(max_int)).astype(dtype)

    if kernels.active() and kernels.supports(layout.group_size):  # the same choice (and max), compiled
        ratios, max_abs = kernels.clip_ratios(wg, weights, coarse, fine, dtype, layout)
        out[r0:r1] = scales_for(ratios)
        return
    max_abs = np.abs(wg).max(axis=-1)
    rtn = scales_for(np.float32(1.0))
    best = scales_for(_best_ratios(wg, weights, coarse, fine, max_int, scales_for))
    # the float32 error is a proxy; keep RTN wherever the exact (runtime) error is not strictly smaller
    keep_rtn = _exact_errors(wg, best, weights, layout) >= _exact_errors(wg, rtn, weights, layout)
    out[r0:r1] = np.where(keep_rtn, rtn, best)
