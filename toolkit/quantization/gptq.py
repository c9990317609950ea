"""GPTQ for MLC group quantization: round column by column, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs.

For a Linear y = x W^T with calibration inputs X (T, K), the output error ||X W^T - X W'^T||^2 is a quadratic
form in the weight error with Hessian H = X^T X. GPTQ (Frantar et al., 2022) quantizes column k, then adjusts
the remaining columns by the optimal (least-squares) correction -err_k * Hinv[k, k+1:] / Hinv[k, k], with the
rows of Hinv taken from the upper Cholesky factor of H^-1 (which equals the sequence of inverses of the
shrinking Hessians). H gets `damp` * mean(diag H) added to its diagonal: calibration texts are short (a few
hundred tokens), so H is rank-deficient for wide layers and needs the ridge to be invertible and stable.

Storage is the scheme's own: groups of `group_size` consecutive K elements share a scale, fixed when the
column loop reaches the group's first column (from the weights as already corrected, the usual GPTQ choice),
either round-to-nearest or the activation-weighted clip search (`clip_search.search_scales` with
act_sq = diag H). Every column is rounded with the exact arithmetic of `group_quant` (model-dtype rounding,
MLC's +zero_point before rint), so the returned dequantized matrix lies on the scheme's grid and
`group_quant.quantize(w_hat, scheme, scales)` packs exactly those codes.
"""

from __future__ import annotations

import numpy as np

from . import QuantScheme, get_scheme
from . import group_quant as gq
from .clip_search import search_scales

GPTQ_SCALES = ("rtn", "weighted")
DEFAULT_DAMP = 0.01
# columns per lazy-update block: the rank-1 updates stay inside the block, the rest gets one matmul per block
_BLOCK = 128
# rows per chunk of the lazy-update matmul where chunked (the row-blocked head): fixed, so the bits do not
# depend on how rows are grouped. The decoder Linears update all rows at once, as before: BLAS sums depend on
# the matrix height, and GPTQ carries a flipped code into every later layer (SmolLM2 perplexity moved from
# 68.5 to 71.9 with 1024-row chunks everywhere, for about 190 MB less at gate_up)
_UPDATE_ROWS = 1024


def hessian(x: np.ndarray, col_block: int = 1024) -> np.ndarray:
    """H = X^T X / T of the inputs x (T, K) of a Linear (the 1/T only sets the scale of `damp`), summed in
    float64 and stored float32: the factorisation runs in float32 anyway (`_inverse_cholesky`), and a whole
    float64 H is 512 MB at K = 8192. Built `col_block` columns at a time, so the float64 part stays small."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    k = x.shape[1]
    h = np.empty((k, k), np.float32)
    for c0 in range(0, k, col_block):
        h[:, c0 : c0 + col_block] = (x.T @ x[:, c0 : c0 + col_block]) / max(x.shape[0], 1)
    return h


def _inverse_cholesky(h: np.ndarray, damp: float, overwrite: bool = False) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (H^-1 = U^T U), float32.

    float32 (as GPTQ's reference code): at Phi-3-mini's down_proj (K = 8192) each K x K matrix is 256 MB.
    torch's LAPACK wrappers (cholesky, cholesky_inverse), not numpy's: numpy's cholesky and solve held
    6-11 matrix-sized work buffers (+2.8 GB at K = 8192, measured), torch's about one. H^-1 and U are written
    into H's own buffer (`out=`, the same LAPACK calls, bit for bit): two K x K matrices at the peak (H and
    its factor L), one afterwards. The first factorisation stays out of place: a failed one must leave H
    intact for the retry with a larger ridge.
    `overwrite`: a float32 `h` may be used (and changed) in place instead of copied; the result is then
    `h` itself."""
    import torch

    h = np.array(h, np.float32, copy=not (overwrite and h.dtype == np.float32 and h.flags.c_contiguous))
    k = h.shape[0]
    idx = np.arange(k)
    dead = np.diagonal(h) <= 0  # inputs that are zero in every calibration token: nothing to weigh
    h[idx[dead], idx[dead]] = 1.0
    ridge = damp * float(np.mean(np.diagonal(h), dtype=np.float64))
    h[idx, idx] += ridge
    th = torch.from_numpy(h)  # shares h's memory
    for attempt in range(6):  # a ridge too small for the round-off: grow it until H is positive definite
        lower, info = torch.linalg.cholesky_ex(th)
        if int(info) == 0:
            break
        h[idx, idx] += ridge * 10**attempt
    else:
        raise ValueError("the Hessian is not positive definite even with a large ridge")
    torch.cholesky_inverse(lower, out=th)  # H^-1 = L^-T L^-1, over H
    del lower
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(th, upper=True, out=(th, info))
    if int(info) != 0:
        raise ValueError("the inverse Hessian is not positive definite (float32 round-off); raise damp")
    return h


def _factor(
    h: np.ndarray, damp: float, act_order: bool, overwrite_h: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(U, diag H, column order or None): what every row of the weight shares."""
    act_sq = np.diagonal(h).astype(np.float32)
    perm = None
    if act_order:
        perm = np.argsort(-act_sq, kind="stable")
        h = h[np.ix_(perm, perm)]  # a copy: ours to overwrite
        overwrite_h = True
    return _inverse_cholesky(h, damp, overwrite=overwrite_h), act_sq, perm


def _gptq_rows(
    w: np.ndarray,
    out: np.ndarray,
    out_scales: np.ndarray,
    u: np.ndarray,
    act_sq: np.ndarray,
    perm: np.ndarray | None,
    scheme: QuantScheme,
    scales: str,
    block: int,
    update_rows: int | None = None,
) -> None:
    """GPTQ of the rows `w` (n, K) into `out` (n, K) and `out_scales` (n, G). Rows are independent: every
    step is per row; the lazy-block matmul runs over all rows at once, or in fixed chunks of `update_rows`
    rows, so that the same rows give the same bits whether they come alone or with others (BLAS sums of one
    row can differ with the matrix's height)."""
    n, k = w.shape
    layout = scheme.layout
    gs = layout.group_size
    dtype = np.dtype(scheme.scale_dtype)
    rnd = gq._rounder(dtype)
    # the scheme's quantizer starts from the weight cast to the model dtype; so does the error feedback
    # (row blocks: the fp16 rounding of a whole 32064 x 3072 lm_head holds ~1 GB of temporaries)
    work = out if perm is None else np.empty((n, k), np.float32)
    for r0 in range(0, n, _UPDATE_ROWS):
        rows = gq._grouped(w[r0 : r0 + _UPDATE_ROWS], dtype, layout)
        work[r0 : r0 + _UPDATE_ROWS] = rows.reshape(rows.shape[0], -1)[:, :k]
    if perm is not None:
        if scales == "weighted":
            out_scales[:] = search_scales(work, scheme, act_sq=act_sq)
        else:
            out_scales[:] = gq.rtn_scales(gq._grouped(work, dtype, layout), dtype, layout)
        work = work[:, perm]
    s_col = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = np.empty((n, b1 - b0), np.float32)
        for j in range(b0, b1):
            if perm is not None:
                s_col = out_scales[:, perm[j] // gs, None]
            elif j % gs == 0:
                g = j // gs
                cols = work[:, j : min(j + gs, k)]
                if scales == "weighted":
                    s = search_scales(cols, scheme, act_sq=act_sq[j : j + cols.shape[1]], row_block=n)[:, 0]
                else:
                    s = gq.rtn_scales(rnd(cols)[:, None, :], dtype, layout)[:, 0]
                out_scales[:, g] = s
                s_col = s[:, None]
            col = rnd(work[:, j])
            codes = gq.group_codes(col[:, None, None], s_col, layout)
            q = gq.dequantize_groups(codes, s_col, layout)[:, 0, 0]
            e = (work[:, j] - q) / u[j, j]
            # column j of `work` is not read again: it becomes column j of the result (no third N x K array)
            work[:, j] = q
            err[:, j - b0] = e
            if j + 1 < b1:
                work[:, j + 1 : b1] -= np.outer(e, u[j, j + 1 : b1])
        if b1 < k:
            # in row chunks for the head: one (n, K) temporary would be 378 MB at a 32064 x 3072 lm_head
            step = update_rows or n
            for r0 in range(0, n, step):
                work[r0 : r0 + step, b1:] -= err[r0 : r0 + step] @ u[b0:b1, b1:]
    if perm is not None:
        out[:, perm] = work


def _check_args(
    w: np.ndarray, h: np.ndarray, scheme: QuantScheme | str, scales: str, block: int
) -> QuantScheme:
    scheme = get_scheme(scheme)
    if scheme.kind != "group":
        raise ValueError(f"{scheme.name} is not an MLC group quantization")
    if scales not in GPTQ_SCALES:
        raise ValueError(f"unknown GPTQ scales {scales!r}; known: {', '.join(GPTQ_SCALES)}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    k = w.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"Hessian has shape {h.shape}, expected ({k}, {k})")
    if block % scheme.layout.group_size:
        raise ValueError(f"block {block} is not a multiple of the group size {scheme.layout.group_size}")
    return scheme


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    scheme: QuantScheme | str = "q4f16_1",
    scales: str = "weighted",
    damp: float = DEFAULT_DAMP,
    block: int = _BLOCK,
    act_order: bool = False,
    overwrite_h: bool = False,
    update_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of an (N, K) weight with input Hessian `h` (K, K). Returns (w_hat (N, K) float32 holding the
    dequantized values, scales (N, G) in the scheme's scale dtype); pack with `group_quant.quantize(w_hat,
    scheme, scales=scales)`.

    `scales`: "rtn" (max|w|/max_int of each group as corrected so far) or "weighted" (the clip search weighted
    by diag H).
    `act_order`: round the columns in order of decreasing diag H (the most active inputs first, while the
    most columns are left to absorb their error); the group scales are then fixed up front from the
    original weights ("static groups"), since a group's columns are no longer rounded together.
    `overwrite_h`: `h` may be overwritten (saves a K x K copy).
    `update_rows`: run the lazy-block update in chunks of this many rows (None: all at once)."""
    scheme = _check_args(w, h, scheme, scales, block)
    u, act_sq, perm = _factor(h, damp, act_order, overwrite_h)
    del h
    n, k = w.shape
    w_hat = np.empty((n, k), np.float32)
    out_scales = np.empty((n, scheme.layout.num_groups(k)), np.dtype(scheme.scale_dtype))
    _gptq_rows(w, w_hat, out_scales, u, act_sq, perm, scheme, scales, block, update_rows)
    return w_hat, out_scales


def gptq_pack(
    w: np.ndarray,
    h: np.ndarray,
    scheme: QuantScheme | str = "q4f16_1",
    scales: str = "weighted",
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    overwrite_h: bool = False,
    update_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`gptq_quantize`, packed by the scheme's quantizer: (q_weight, q_scale, w_hat)."""
    w_hat, s = gptq_quantize(
        w,
        h,
        scheme,
        scales=scales,
        damp=damp,
        act_order=act_order,
        overwrite_h=overwrite_h,
        update_rows=update_rows,
    )
    q_weight, q_scale = gq.quantize(w_hat, scheme, scales=s)
    return q_weight, q_scale, w_hat


def gptq_pack_rows(
    w: np.ndarray,
    h: np.ndarray,
    scheme: QuantScheme | str = "q4f16_1",
    scales: str = "weighted",
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    overwrite_h: bool = False,
    row_block: int = 4 * _UPDATE_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """`gptq_pack` without the dequantized matrix, `row_block` rows at a time: (q_weight, q_scale), the same
    bits as `gptq_pack(..., update_rows=_UPDATE_ROWS)` (rows are independent, `_gptq_rows`). For a weight
    nothing downstream multiplies by, e.g. the lm_head (32064 x 3072): its temporaries are one row block's,
    not another 394 MB matrix."""
    scheme = _check_args(w, h, scheme, scales, _BLOCK)
    if row_block <= 0 or row_block % _UPDATE_ROWS:
        raise ValueError(f"row_block {row_block} is not a positive multiple of {_UPDATE_ROWS}")
    u, act_sq, perm = _factor(h, damp, act_order, overwrite_h)
    del h
    n, k = w.shape
    shape_w, shape_s = scheme.layout.quantized_shapes((n, k))
    q_weight = np.empty(shape_w, np.dtype(scheme.layout.storage))
    q_scale = np.empty(shape_s, np.dtype(scheme.model_dtype))
    for r0 in range(0, n, row_block):
        rows = w[r0 : r0 + row_block]
        w_hat = np.empty(rows.shape, np.float32)
        s = np.empty((rows.shape[0], shape_s[1]), np.dtype(scheme.scale_dtype))
        _gptq_rows(rows, w_hat, s, u, act_sq, perm, scheme, scales, _BLOCK, _UPDATE_ROWS)
        q_weight[r0 : r0 + row_block], q_scale[r0 : r0 + row_block] = gq.quantize(w_hat, scheme, scales=s)
    return q_weight, q_scale
