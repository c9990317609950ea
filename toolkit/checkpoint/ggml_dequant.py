"""llama.cpp's block types dequantized to float32 straight into a given output, a few rows at a time, so
that the temporaries stay in cache and no full-size one exists (the block formats are described in
quantization/gguf_blocks.py).

Each function does gguf-py's float32 operations (`gguf.quants`) in the same order on the same operands, so
the values are equal to its dequantizer's bit for bit (NaN and inf scales included: the reader refuses
those later, by tensor name); it only avoids gguf-py's full-size copies, which made its K-quant dequantizer
a conversion's bottleneck. `DEQUANT_INTO` maps a ggml type name to (bytes per block, weights per block,
function(rows, out)); `rows` is (R, row bytes) uint8 of whole blocks, `out` (R, row weights) float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_U8 = np.uint8


def _f16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 with a trailing axis of 1."""
    return blocks[..., at : at + 2].copy().view(np.float16).astype(np.float32)


def _q4_0(rows: np.ndarray, out: np.ndarray) -> None:
    # byte j of a block: element j (low nibble) and j + 16 (high); value d * (q - 8)
    blocks = rows.reshape(rows.shape[0], -1, 18)
    o = out.reshape(rows.shape[0], -1, 32)
    qs = blocks[..., 2:18]
    np.subtract(qs & _U8(0x0F), 8, out=o[..., :16], dtype=np.float32, casting="unsafe")
    np.subtract(qs >> _U8(4), 8, out=o[..., 16:], dtype=np.float32, casting="unsafe")
    o *= _f16_at(blocks, 0)


def _q4_1(rows: np.ndarray, out: np.ndarray) -> None:
    # value d * q + m
    blocks = rows.reshape(rows.shape[0], -1, 20)
    o = out.reshape(rows.shape[0], -1, 32)
    qs = blocks[..., 4:20]
    o[..., :16] = qs & _U8(0x0F)
    o[..., 16:] = qs >> _U8(4)
    o *= _f16_at(blocks, 0)
    o += _f16_at(blocks, 2)


def _q8_0(rows: np.ndarray, out: np.ndarray) -> None:
    # value q * d, q int8
    blocks = rows.reshape(rows.shape[0], -1, 34)
    o = out.reshape(rows.shape[0], -1, 32)
    np.multiply(blocks[..., 2:34].view(np.int8), _f16_at(blocks, 0), out=o)


def _k_scales_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 6-bit scales and mins of the 8 sub-blocks, from the 12 bytes at byte 4 (bytes 0-3:
    scales 0-3 and the top bits of scales 4-7; 4-7: mins 0-3 and top bits of mins 4-7; 8-11: the low bits of
    scales 4-7 and mins 4-7). Worked on as three 32-bit words of 4 bytes each, every mask and shift kept
    within a byte."""
    words = blocks[..., 4:16].copy().view("<u4")  # (R, nb, 3)
    d, m, md = words[..., 0], words[..., 1], words[..., 2]
    low6, low4, top2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
    sc = np.stack([d & low6, (md & low4) | ((d >> 2) & top2)], axis=-1)
    mn = np.stack([m & low6, ((md >> 4) & low4) | ((m >> 2) & top2)], axis=-1)
    return sc.view(_U8), mn.view(_U8)  # (R, nb, 8)


def _k_factors(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: d * scale and dmin * min per sub-block, shaped (R, nb, 4, 2, 1) like the codes' pairs of
    sub-blocks (a 32-byte group holds sub-block 2j in its low nibbles and 2j + 1 in its high ones)."""
    sc, mn = _k_scales_mins(blocks)
    shape = (*blocks.shape[:2], 4, 2, 1)
    dsc = (_f16_at(blocks, 0) * sc.astype(np.float32)).reshape(shape)
    dm = (_f16_at(blocks, 2) * mn.astype(np.float32)).reshape(shape)
    return dsc, dm


def _q4_k(rows: np.ndarray, out: np.ndarray) -> None:
    # d, dmin, 12 bytes of scales / mins, 128 bytes of nibbles; value (d * sc) * q - dmin * m
    r = rows.shape[0]
    blocks = rows.reshape(r, -1, 144)
    o = out.reshape(r, blocks.shape[1], 4, 2, 32)
    qs = blocks[..., 16:144].reshape(r, -1, 4, 32)
    dsc, dm = _k_factors(blocks)
    np.multiply(qs & _U8(0x0F), dsc[..., 0, :], out=o[..., 0, :])
    np.multiply(qs >> _U8(4), dsc[..., 1, :], out=o[..., 1, :])
    o -= dm


_SUB_BLOCKS = np.arange(8, dtype=_U8).reshape(8, 1)


def _q5_k(rows: np.ndarray, out: np.ndarray) -> None:
    # Q4_K plus 32 bytes qh before the nibbles: bit s of qh[l] is the 5th bit of sub-block s's weight l
    r = rows.shape[0]
    blocks = rows.reshape(r, -1, 176)
    nb = blocks.shape[1]
    qs = blocks[..., 48:176].reshape(r, nb, 4, 32)
    q = np.empty((r, nb, 4, 2, 32), _U8)
    np.bitwise_and(qs, _U8(0x0F), out=q[..., 0, :])
    np.right_shift(qs, _U8(4), out=q[..., 1, :])
    high = (blocks[..., None, 16:48] >> _SUB_BLOCKS) & _U8(1)
    q |= (high << _U8(4)).reshape(q.shape)
    dsc, dm = _k_factors(blocks)
    o = out.reshape(q.shape)
    np.multiply(q, dsc, out=o)
    o -= dm


def _q6_k(rows: np.ndarray, out: np.ndarray) -> None:
    # 128 bytes ql, 64 bytes qh, 16 int8 scales (sub-blocks of 16), d; value (d * sc) * (q - 32). In half n
    # (128 weights), ql[64n + b] holds weight 64p + b in its nibble p, and bits 2p of qh[32n + l] are the top
    # two bits of weight 32p + l
    r = rows.shape[0]
    blocks = rows.reshape(r, -1, 210)
    nb = blocks.shape[1]
    ql = blocks[..., 0:128].reshape(r, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(r, nb, 2, 32)
    q = np.empty((r, nb, 2, 2, 64), _U8)
    np.bitwise_and(ql, _U8(0x0F), out=q[..., 0, :])
    np.right_shift(ql, _U8(4), out=q[..., 1, :])
    by32 = q.reshape(r, nb, 2, 4, 32)
    for p in range(4):
        by32[..., p, :] |= ((qh >> _U8(2 * p)) & _U8(3)) << _U8(4)
    ds = _f16_at(blocks, 208) * blocks[..., 192:208].view(np.int8).astype(np.float32)
    o = out.reshape(r, nb, 16, 16)
    np.subtract(q.reshape(o.shape), 32, out=o, dtype=np.float32, casting="unsafe")
    o *= ds[..., None]


DEQUANT_INTO: dict[str, tuple[int, int, Callable[[np.ndarray, np.ndarray], None]]] = {
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q8_0": (34, 32, _q8_0),
    "Q4_K": (144, 256, _q4_k),
    "Q5_K": (176, 256, _q5_k),
    "Q6_K": (210, 256, _q6_k),
}
