"""llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks <-> the gguf schemes' arrays, losslessly, in vectorised numpy.

A GGUF row of K weights is K/32 blocks (ggml-common.h): Q4_0 = fp16 d + 16 bytes of nibbles, Q4_1 = fp16 d +
fp16 m + 16 bytes, Q8_0 = fp16 d + 32 int8. In a 4-bit block byte j holds element j in its low nibble and
element j + 16 in its high nibble. The repack (layout in `GGUF_BLOCK_LAYOUTS`) stores the same codes in
element order, eight nibbles (or four bytes) per uint32 word, lowest bits first, like MLC's q4 layout, and
the fp16 d (and m) as (N, K/32) arrays; Q8_0's int8 q is stored as the byte q + 128 (an unsigned code, zero
point 128). `to_blocks` inverts it byte for byte. Values: Q4_0 d * (c - 8), Q4_1 d * c + m, Q8_0
d * (c - 128), computed in float32 like `gguf.quants.dequantize` (every product is exact there: 11-bit d
times a code of at most 8 bits).
"""

from __future__ import annotations

import numpy as np

from . import GGUF_BLOCK_LAYOUTS, GroupLayout
from .group_quant import pack, unpack

BLOCK = 32
# bytes of one block, and where its fp16 fields and codes start
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
_CODES_AT = {"q4_0": 2, "q4_1": 4, "q8_0": 2}


def ggml_type(block_type: str):
    """gguf.GGMLQuantizationType of a block type name ("q4_1" -> Q4_1)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[block_type.upper()]


def block_type_of(ggml_type_name: str) -> str | None:
    """Our block type name for a ggml type name ("Q4_1" -> "q4_1"); None if we have no layout for it."""
    name = ggml_type_name.lower()
    return name if name in GGUF_BLOCK_LAYOUTS else None


def _layout(block_type: str) -> GroupLayout:
    if block_type not in GGUF_BLOCK_LAYOUTS:
        raise ValueError(f"no layout for GGUF block type {block_type!r}")
    return GGUF_BLOCK_LAYOUTS[block_type]


def from_blocks(raw: np.ndarray, block_type: str) -> tuple[np.ndarray, ...]:
    """(N, K/32 * block bytes) uint8 GGUF rows -> (q_weight (N, K/epw) uint32, q_scale (N, K/32) fp16) and,
    for Q4_1, q_min (N, K/32) fp16."""
    layout = _layout(block_type)
    nbytes = _BLOCK_BYTES[block_type]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{block_type} rows must be whole {nbytes}-byte blocks, got shape {raw.shape}")
    n, nb = raw.shape[0], raw.shape[1] // nbytes
    blocks = raw.reshape(n, nb, nbytes)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(n, nb)
    qs = blocks[..., _CODES_AT[block_type] :]
    if layout.bits == 4:
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
    else:
        codes = qs ^ np.uint8(0x80)  # int8 two's complement -> q + 128
    q_weight = pack(codes.reshape(n, nb * BLOCK), layout)
    if not layout.has_min:
        return q_weight, d
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(n, nb)
    return q_weight, d, m


def to_blocks(arrays: tuple[np.ndarray, ...], block_type: str) -> np.ndarray:
    """Inverse of `from_blocks`: the GGUF rows, byte for byte."""
    layout = _layout(block_type)
    q_weight, d = arrays[0], arrays[1]
    n, nb = d.shape
    codes = unpack(q_weight, layout).reshape(n, nb, BLOCK)
    if layout.bits == 4:
        qs = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
    else:
        qs = codes ^ np.uint8(0x80)
    fields = [d.astype(np.float16).view(np.uint8).reshape(n, nb, 2)]
    if layout.has_min:
        fields.append(arrays[2].astype(np.float16).view(np.uint8).reshape(n, nb, 2))
    return np.concatenate([*fields, qs], axis=-1).reshape(n, nb * _BLOCK_BYTES[block_type])


def quantize(w: np.ndarray, block_type: str) -> tuple[np.ndarray, ...]:
    """Quantize an (N, K) float weight with llama.cpp's reference quantizer (`gguf.quants.quantize`), then
    repack. K must be a multiple of 32 (GGUF has no padding)."""
    from gguf.quants import quantize as gguf_quantize

    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{block_type} needs a 2-D weight with K a multiple of {BLOCK}, got shape {w.shape}")
    raw = gguf_quantize(np.ascontiguousarray(w, dtype=np.float32), ggml_type(block_type))
    return from_blocks(raw, block_type)


def dequantize(arrays: tuple[np.ndarray, ...], block_type: str) -> np.ndarray:
    """The float32 weights (N, K) of repacked arrays: (c - zero_point) * d (+ m), as the scheme's kernels
    compute them in fp32."""
    layout = _layout(block_type)
    q_weight, d = arrays[0], arrays[1]
    n, nb = d.shape
    codes = unpack(q_weight, layout).reshape(n, nb, BLOCK).astype(np.float32)
    w = (codes - np.float32(layout.zero_point)) * d.astype(np.float32)[..., None]
    if layout.has_min:
        w = w + arrays[2].astype(np.float32)[..., None]
    return w.reshape(n, nb * BLOCK)


def param_suffixes(layout: GroupLayout) -> tuple[str, ...]:
    """Stored parameter suffixes of a weight in `layout`, in `from_blocks` order."""
    return ("q_weight", "q_scale", "q_min") if layout.has_min else ("q_weight", "q_scale")
