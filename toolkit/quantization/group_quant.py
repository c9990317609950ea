"""MLC-LLM group quantization (q4f16_1 / q4f32_1), bit-exact, in vectorised numpy.

Every layout number comes from the scheme's `GroupLayout` (`toolkit.quantization`); the text below gives
MLC's q4*_1 values (group 32, 8 codes per uint32, zero point 7).

Layout ("NK", MLC's `_1` schemes), for a weight `w` of shape (N, K) (HF Linear layout, K = input features):
  groups of 32 consecutive elements along K, G = ceil(K / 32) groups per row;
  q_scale (N, G) in the model dtype:  scale = max|w_group| / 7;
  q_weight (N, 4*G) uint32: code = clamp(round(w / scale + 7), 0, 14); element k sits in word k // 8 at
  bits [4*(k % 8), 4*(k % 8) + 4) (lowest bits first); dequantized value = (code - 7) * scale.

To be byte-for-byte what MLC-LLM's converter writes, the arithmetic follows its TE quantizer exactly:
  * the weight is first cast to the model dtype (MLC's loader does `astype(model_dtype)` before quantizing);
  * every operation is rounded to the model dtype: scale = fp(max / 7), then fp(fp(w / scale) + 7);
  * `round` is TVM's `tir.round`, which lowers to `nearbyint` (round half to even) on llvm AND cuda (checked
    in the generated source), i.e. numpy's `rint`; note the +7 is added BEFORE rounding, which differs from
    round(w / scale) + 7 when fp16 rounding of the sum lands on a .5;
  * K that is not a multiple of 32 is padded like MLC (ceil): padded positions don't count for the group max
    and are packed as code 0.
fp16 results are computed in float32 and rounded once to fp16: for +, -, *, / of fp16 operands a float32
intermediate (24 bits >= 2*11 + 2) makes that double rounding innocuous, so this equals IEEE fp16 arithmetic.

The one deliberate difference: a group of all zeros has scale 0 and MLC computes 0/0 (NaN, then an undefined
float->uint cast); here its codes are 7, which dequantize to 0 whatever the scale.
"""

from __future__ import annotations

import numpy as np

from ..row_blocks import parallel_row_blocks
from . import MLC_Q4_LAYOUT, GroupLayout, QuantScheme, get_scheme, kernels

# rows per block: keeps temporaries of a 32064 x 3072 embedding at a few tens of MB
_ROW_BLOCK = 256


def _float_dtype(scheme: QuantScheme) -> np.dtype:
    return np.dtype(scheme.model_dtype)


def _shifts(layout: GroupLayout) -> np.ndarray:
    """Bit offset of each code inside its storage word (lowest bits first)."""
    word = np.dtype(layout.storage).type
    return np.arange(layout.elems_per_word, dtype=word) * word(layout.bits)


def num_groups(k: int, layout: GroupLayout = MLC_Q4_LAYOUT) -> int:
    return layout.num_groups(k)


def quantized_shapes(
    shape: tuple[int, int], layout: GroupLayout = MLC_Q4_LAYOUT
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(q_weight shape, q_scale shape) of a group-quantized (N, K) weight."""
    return layout.quantized_shapes(shape)


def round_to_f16_grid(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest fp16 value (half to even), still as float32; exact for |x| >= 2**-14.

    2x faster than astype(float16).astype(float32). Below 2**-14 (fp16 subnormals) it keeps 11 significant
    bits instead of rounding to a multiple of 2**-24. Used for w / scale and w / scale + 7 (such tiny values
    all end up as code 7 either way) and for (code - 7) * scale (a product below 2**-14 is a multiple of
    2**-24 with at most 10 significant bits, so it is exact there too).
    """
    b = x.view(np.uint32)
    # add just under half an fp16 ulp (plus the kept lsb, for ties to even), then drop the 13 extra bits
    b = (b + (np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1)))) & np.uint32(0xFFFFE000)
    return b.view(np.float32)


def _rounder(dtype: np.dtype):
    return round_to_f16_grid if dtype == np.float16 else (lambda x: x)


def round_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest fp16 value as float32, exactly like astype(float16) (subnormals included).

    Overflow (|x| >= 65520) is refused instead of becoming inf (MLC would then write NaN codes).
    """
    y = round_to_f16_grid(x)
    tiny = np.abs(x) < np.float32(2**-14)
    if tiny.any():  # fp16 subnormals: multiples of 2**-24 (x * 2**24 is exact, rint is half to even)
        y = np.where(tiny, np.rint(x * np.float32(2**24)) * np.float32(2**-24), y)
    big = np.abs(y).max(initial=0.0)
    if not big <= 65504:
        raise ValueError(f"weight magnitude {big} does not fit float16")
    return y


def _grouped(w: np.ndarray, dtype: np.dtype, layout: GroupLayout = MLC_Q4_LAYOUT) -> np.ndarray:
    """(N, K) -> (N, G, group_size) float32 holding values of the model dtype (astype(float16) and back,
    subnormals included; a weight beyond float16 is refused, not made inf), zero-padded along K."""
    if kernels.active():  # the same values, in one compiled pass
        return kernels.grouped(w, dtype, layout)
    n, k = w.shape
    gs = layout.group_size
    wd = w.astype(np.float32, copy=False)
    if dtype == np.float16:
        wd = round_to_f16(wd)
    kp = layout.num_groups(k) * gs
    if kp != k:
        wd = np.concatenate([wd, np.zeros((n, kp - k), np.float32)], axis=1)
    return wd.reshape(n, kp // gs, gs)


def rtn_scales(
    wg: np.ndarray, dtype: np.dtype | str = np.float16, layout: GroupLayout = MLC_Q4_LAYOUT
) -> np.ndarray:
    """Round-to-nearest scales max|w| / max_int of grouped weights `wg` (N, G, group_size), in `dtype`."""
    max_abs = np.abs(wg).max(axis=-1)  # zero padding never wins a max over |w|
    return (max_abs / np.float32(layout.max_int)).astype(dtype)


def group_codes(wg: np.ndarray, scales: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT) -> np.ndarray:
    """Codes 0..2*max_int (uint8) of grouped float32 weights `wg` (N, G, group_size) for `scales` (N, G).

    Arithmetic is MLC's, in the dtype of `scales` (the model dtype): round(fp(fp(w / s) + max_int)), clamped.
    """
    max_int = np.float32(layout.max_int)
    rnd = _rounder(scales.dtype)
    s = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = rnd(rnd(wg / s) + max_int)
    codes = np.clip(np.rint(shifted), 0, 2 * max_int)
    codes = np.where(s == 0, max_int, codes)  # all-zero group: code max_int == 0.0, never NaN
    return codes.astype(np.uint8)


def dequantize_groups(
    codes: np.ndarray, scales: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT
) -> np.ndarray:
    """(code - zero_point) * scale as float32 holding values of the scales' dtype; codes (..., group_size)."""
    # |code - zero_point| < 2**bits has few bits, times an 11/24-bit scale: exact in float32, so one
    # rounding to the dtype
    prod = (codes.astype(np.float32) - np.float32(layout.zero_point)) * scales.astype(np.float32)[..., None]
    return _rounder(scales.dtype)(prod)


def pack(codes: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT) -> np.ndarray:
    """(N, K) codes with K % elems_per_word == 0 -> (N, K/epw) storage words, element k at bits
    bits*(k % epw) of word k // epw."""
    n, k = codes.shape
    epw = layout.elems_per_word
    if k % epw:
        raise ValueError(f"pack needs K divisible by {epw}, got {k}")
    word = np.dtype(layout.storage)
    if 8 % layout.bits == 0:
        return pack_bits(codes, layout.bits, word)
    words = codes.reshape(n, k // epw, epw).astype(word) << _shifts(layout)
    # codes don't overlap, so the sum is the bitwise or
    return words.sum(axis=-1, dtype=word)


def pack_bits(codes: np.ndarray, bits: int, word: np.dtype | str = "uint32") -> np.ndarray:
    """(N, M) codes of `bits` bits (1, 2, 4 or 8; M a multiple of a word's codes) -> (N, M bits / word bits)
    words, element e at bits [bits * (e % per word), ...), lowest first. Whole bytes first (8 / bits codes
    each, uint8 arithmetic), then every `word` read as little-endian bytes: the layout the kernels read,
    several times faster than shifting each code into a word of its own."""
    word = np.dtype(word)
    n = codes.shape[0]
    per = 8 // bits
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, -1, per)
    packed = c[..., 0].copy()
    for j in range(1, per):
        packed |= c[..., j] << np.uint8(bits * j)
    return packed.view(word.newbyteorder("<")).astype(word, copy=False)


def unpack(q_weight: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT) -> np.ndarray:
    """(N, W) storage words -> (N, epw*W) uint8 codes (inverse of `pack`)."""
    word = np.dtype(layout.storage)
    if q_weight.dtype != word:
        raise ValueError(f"q_weight must be {word}, got {q_weight.dtype}")
    n, w = q_weight.shape
    if 8 % layout.bits == 0:
        return unpack_bits(q_weight, layout.bits)
    codes = (q_weight[..., None] >> _shifts(layout)) & word.type(layout.code_mask)
    return codes.astype(np.uint8).reshape(n, w * layout.elems_per_word)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: (N, W) words -> (N, W * word bits / bits) uint8 codes, a byte at a time."""
    n = words.shape[0]
    raw = np.ascontiguousarray(words).astype(words.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    shifts = np.arange(8 // bits, dtype=np.uint8) * np.uint8(bits)
    codes = (raw.reshape(n, -1, 1) >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(n, -1)


def _pad_mask(k: int, layout: GroupLayout = MLC_Q4_LAYOUT) -> np.ndarray | None:
    gs = layout.group_size
    kp = layout.num_groups(k) * gs
    if kp == k:
        return None
    return (np.arange(kp) < k).reshape(kp // gs, gs)


def quantize(
    w: np.ndarray, scheme: QuantScheme | str = "q4f16_1", scales: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize an (N, K) weight. Returns (q_weight (N, G * words per group) in the scheme's storage dtype,
    q_scale (N, G) in the model dtype).

    `scales` (N, G) overrides the round-to-nearest scales (e.g. from `clip_search`); same storage format.
    """
    scheme = get_scheme(scheme)
    if scheme.kind != "group":
        raise ValueError(f"{scheme.name} is not an MLC group quantization")
    if w.ndim != 2:
        raise ValueError(f"group quantization needs a 2-D weight, got shape {w.shape}")
    dtype = _float_dtype(scheme)
    layout = scheme.layout
    n, k = w.shape
    qw_shape, qs_shape = layout.quantized_shapes((n, k))
    if scales is not None and scales.shape != qs_shape:
        raise ValueError(f"scales have shape {scales.shape}, expected {qs_shape}")
    q_weight = np.empty(qw_shape, layout.storage)
    q_scale = np.empty(qs_shape, dtype)
    mask = _pad_mask(k, layout)

    def block(r0: int) -> None:
        wg = _grouped(w[r0 : r0 + _ROW_BLOCK], dtype, layout)
        if kernels.active() and kernels.packs(layout):  # the same words and scales, compiled
            given = None if scales is None else scales[r0 : r0 + _ROW_BLOCK]
            q_weight[r0 : r0 + _ROW_BLOCK], q_scale[r0 : r0 + _ROW_BLOCK] = kernels.quantize_groups(
                wg, k, given, dtype, layout
            )
            return
        s = rtn_scales(wg, dtype, layout) if scales is None else scales[r0 : r0 + _ROW_BLOCK].astype(dtype)
        codes = group_codes(wg, s, layout)
        if mask is not None:
            codes = np.where(mask, codes, np.uint8(0))  # MLC packs padded positions as 0
        q_weight[r0 : r0 + _ROW_BLOCK] = pack(codes.reshape(codes.shape[0], -1), layout)
        q_scale[r0 : r0 + _ROW_BLOCK] = s

    parallel_row_blocks(block, n, _ROW_BLOCK)
    return q_weight, q_scale


def dequantize(
    q_weight: np.ndarray, q_scale: np.ndarray, k: int | None = None, layout: GroupLayout = MLC_Q4_LAYOUT
) -> np.ndarray:
    """(code - max_int) * scale in the scale dtype (MLC's `_dequantize`), trimmed to `k` columns (default:
    all)."""
    n, g = q_scale.shape
    gs = layout.group_size
    if q_weight.shape != (n, g * layout.words_per_group):
        raise ValueError(f"q_weight shape {q_weight.shape} does not match q_scale shape {q_scale.shape}")
    kp = g * gs
    k = kp if k is None else k
    if not kp - gs < k <= kp:
        raise ValueError(f"k={k} is not consistent with {g} groups of {gs}")
    codes = unpack(q_weight, layout).reshape(n, g, gs)
    w = dequantize_groups(codes, q_scale, layout).astype(q_scale.dtype)
    return w.reshape(n, kp)[:, :k]


def squared_errors(
    w: np.ndarray, q_weight: np.ndarray, q_scale: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT
) -> tuple[float, float]:
    """(sum (w - deq(q))^2, sum w^2) in float64, computed in row blocks (bounded temporaries)."""
    err = ref = 0.0
    k = w.shape[1]
    for r0 in range(0, w.shape[0], _ROW_BLOCK):
        rows = slice(r0, r0 + _ROW_BLOCK)
        wb = w[rows].astype(np.float64)
        d = wb - dequantize(q_weight[rows], q_scale[rows], k, layout).astype(np.float64)
        err += float(np.sum(d * d))
        ref += float(np.sum(wb * wb))
    return err, ref


def reconstruction_error(
    w: np.ndarray, q_weight: np.ndarray, q_scale: np.ndarray, layout: GroupLayout = MLC_Q4_LAYOUT
) -> float:
    """Relative RMS error ||w - deq(q)|| / ||w|| (float64 accumulation)."""
    err, ref = squared_errors(w, q_weight, q_scale, layout)
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0
