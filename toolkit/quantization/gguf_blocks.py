"""llama.cpp's Q4_0 / Q4_1 / Q8_0 and Q4_K / Q5_K / Q6_K blocks <-> the gguf schemes' arrays, losslessly,
in vectorised numpy.

A GGUF row of K weights is K/32 blocks (ggml-common.h): Q4_0 = fp16 d + 16 bytes of nibbles, Q4_1 = fp16 d +
fp16 m + 16 bytes, Q8_0 = fp16 d + 32 int8. In a 4-bit block byte j holds element j in its low nibble and
element j + 16 in its high nibble. The repack (layout in `GGUF_BLOCK_LAYOUTS`) stores the same codes in
element order, eight nibbles (or four bytes) per uint32 word, lowest bits first, like MLC's q4 layout, and
the fp16 d (and m) as (N, K/32) arrays; Q8_0's int8 q is stored as the byte q + 128 (an unsigned code, zero
point 128). `to_blocks` inverts it byte for byte. Values: Q4_0 d * (c - 8), Q4_1 d * c + m, Q8_0
d * (c - 128), computed in float32 like `gguf.quants.dequantize` (every product is exact there: 11-bit d
times a code of at most 8 bits).

K-quants (super-blocks of 256 weights; layout and planes in `KQuantLayout`): Q4_K = fp16 d, fp16 dmin,
12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, 128 bytes of nibbles (chunk c of 64 weights: byte
32c + l holds weight 64c + l low, 64c + 32 + l high); Q5_K adds 32 bytes qh before the nibbles (bit s of qh[l]
is the 5th bit of weight 32s + l); Q6_K = 128 bytes ql, 64 bytes qh, 16 int8 scales (sub-blocks of 16),
fp16 d (half n of 128 weights: ql[64n + b] holds weight 128n + b low, 128n + 64 + b high; bits 2p of
qh[32n + l] are the top 2 bits of weight 128n + 32p + l). The repack unpacks the codes into element order and
the scales into bytes; in float32 every product d * sc * q is exact (at most 11 + 7 + 6 significant bits),
so the value has at most one rounding, Q4_K/Q5_K's final subtraction of dmin * m, as in gguf's numpy.

An fp32 gguf scheme stores the same fp16 d / dmin bits as uint16 (`stored`); every function here reads both.
"""

from __future__ import annotations

import numpy as np

from . import GGUF_BLOCK_LAYOUTS, SUPER_BLOCK, KQuantLayout, Layout
from .group_quant import pack, pack_bits, unpack, unpack_bits

BLOCK = 32
# bytes of one block, and where its fp16 fields and codes start
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}
_CODES_AT = {"q4_0": 2, "q4_1": 4, "q8_0": 2}
# rows per repack / quantize step: keeps the full-size temporaries of numpy (and gguf-py) to a few MB
_ROWS = 1024


def ggml_type(block_type: str):
    """gguf.GGMLQuantizationType of a block type name ("q4_1" -> Q4_1)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[block_type.upper()]


def block_type_of(ggml_type_name: str) -> str | None:
    """Our block type name for a ggml type name ("Q4_1" -> "q4_1"); None if we have no layout for it."""
    name = ggml_type_name.lower()
    return name if name in GGUF_BLOCK_LAYOUTS else None


def _f16(a: np.ndarray) -> np.ndarray:
    """fp16 values of a scale / min array as stored: float16, or its bits as uint16 (fp32 gguf schemes)."""
    return a.view(np.float16) if a.dtype == np.uint16 else a.astype(np.float16, copy=False)


def stored(arrays: tuple[np.ndarray, ...], scale_dtype: str) -> tuple[np.ndarray, ...]:
    """`from_blocks` arrays in a scheme's storage: fp16 arrays as they are, or their bits as uint16."""
    if scale_dtype == "float16":
        return arrays
    if scale_dtype != "uint16":
        raise ValueError(f"gguf blocks keep fp16 scales as float16 or uint16 bits, not {scale_dtype}")
    return tuple(a.view(np.uint16) if a.dtype == np.float16 else a for a in arrays)


def _layout(block_type: str) -> Layout:
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
    if n > _ROWS:
        # a block never spans rows: repack rows at a time, so the uint32 temporaries of `pack` stay small
        # (whole, a 32064 x 3072 Q4_0 embedding would need ~600 MB of them)
        first = from_blocks(raw[:_ROWS], block_type)
        outs = tuple(np.empty((n, *a.shape[1:]), a.dtype) for a in first)
        for o, a in zip(outs, first):
            o[:_ROWS] = a
        for r0 in range(_ROWS, n, _ROWS):
            for o, a in zip(outs, from_blocks(raw[r0 : r0 + _ROWS], block_type)):
                o[r0 : r0 + _ROWS] = a
        return outs
    blocks = raw.reshape(n, nb, nbytes)
    if isinstance(layout, KQuantLayout):
        return _k_from_blocks(blocks, layout)
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
    if isinstance(layout, KQuantLayout):
        return _k_to_blocks(arrays, layout)
    q_weight, d = arrays[0], arrays[1]
    n, nb = d.shape
    codes = unpack(q_weight, layout).reshape(n, nb, BLOCK)
    if layout.bits == 4:
        qs = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
    else:
        qs = codes ^ np.uint8(0x80)
    fields = [np.ascontiguousarray(_f16(d)).view(np.uint8).reshape(n, nb, 2)]
    if layout.has_min:
        fields.append(np.ascontiguousarray(_f16(arrays[2])).view(np.uint8).reshape(n, nb, 2))
    return np.concatenate([*fields, qs], axis=-1).reshape(n, nb * _BLOCK_BYTES[block_type])


def quantize(w: np.ndarray, block_type: str) -> tuple[np.ndarray, ...]:
    """Quantize an (N, K) float weight with llama.cpp's reference quantizer (`gguf.quants.quantize`), then
    repack. K must be a multiple of 32 (GGUF has no padding)."""
    from gguf.quants import quantize as gguf_quantize

    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{block_type} needs a 2-D weight with K a multiple of {BLOCK}, got shape {w.shape}")
    try:
        # rows at a time (a block never spans rows): gguf-py's quantizers hold several full-size temporaries
        qtype = ggml_type(block_type)
        raw = np.concatenate(
            [
                gguf_quantize(np.ascontiguousarray(w[r0 : r0 + _ROWS], dtype=np.float32), qtype)
                for r0 in range(0, max(w.shape[0], 1), _ROWS)
            ]
        )
    except NotImplementedError:  # gguf-py has no K-quant quantizer (llama.cpp's C code has)
        raise ValueError(
            f"{block_type} blocks can only be kept from a GGUF that has them; the gguf package cannot "
            "quantize to them (use llama.cpp's llama-quantize)"
        ) from None
    return from_blocks(raw, block_type)


def dequantize(arrays: tuple[np.ndarray, ...], block_type: str) -> np.ndarray:
    """The float32 weights (N, K) of repacked arrays: (c - zero_point) * d (+ m), as the scheme's kernels
    compute them in fp32."""
    layout = _layout(block_type)
    if isinstance(layout, KQuantLayout):
        return _k_dequantize(arrays, layout)
    q_weight, d = arrays[0], arrays[1]
    n, nb = d.shape
    codes = unpack(q_weight, layout).reshape(n, nb, BLOCK).astype(np.float32)
    w = (codes - np.float32(layout.zero_point)) * _f16(d).astype(np.float32)[..., None]
    if layout.has_min:
        w = w + _f16(arrays[2]).astype(np.float32)[..., None]
    return w.reshape(n, nb * BLOCK)


def param_suffixes(layout: Layout) -> tuple[str, ...]:
    """Stored parameter suffixes of a weight in `layout`, in `from_blocks` order."""
    return layout.suffixes


# ---- K-quants ---------------------------------------------------------------------------------------------


def _fp16_bytes(a: np.ndarray, n: int, nb: int) -> np.ndarray:
    return np.ascontiguousarray(_f16(a)).view(np.uint8).reshape(n, nb, 2)


def _k_from_blocks(blocks: np.ndarray, layout: KQuantLayout) -> tuple[np.ndarray, ...]:
    n, nb, _ = blocks.shape

    def f16(at: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16).reshape(n, nb)

    if layout.bits == 6:
        ql = blocks[..., :128].reshape(n, nb, 2, 1, 64)
        low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=3)  # (n, nb, half, nibble, 64)
        qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
        high = (qh >> (np.arange(4, dtype=np.uint8) * np.uint8(2)).reshape(1, 1, 1, 4, 1)) & np.uint8(3)
        sub = blocks[..., 192:208] ^ np.uint8(0x80)  # int8 -> sc + 128
        arrays = [pack_bits(low.reshape(n, -1), 4), pack_bits(high.reshape(n, -1), 2)]
        return (*arrays, pack_bits(sub.reshape(n, -1), 8), f16(208))
    packed = blocks[..., 4:16].reshape(n, nb, 3, 4)
    a, b, c = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate(
        [a & np.uint8(0x3F), (c & np.uint8(0x0F)) | ((a >> np.uint8(2)) & np.uint8(0x30))], -1
    )
    mn = np.concatenate([b & np.uint8(0x3F), (c >> np.uint8(4)) | ((b >> np.uint8(2)) & np.uint8(0x30))], -1)
    qs_at = 16 + 32 * layout.high_bits
    qs = blocks[..., qs_at:].reshape(n, nb, 4, 1, 32)
    low = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=3)  # (n, nb, chunk, nibble, 32)
    arrays = [pack_bits(low.reshape(n, -1), 4)]
    if layout.high_bits:
        qh = blocks[..., 16:48].reshape(n, nb, 1, 32)
        high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & np.uint8(1)
        arrays.append(pack_bits(high.reshape(n, -1), 1))
    sub = np.concatenate([sc, mn], axis=-1)  # (n, nb, 16): 8 scales, then 8 mins
    return (*arrays, pack_bits(sub.reshape(n, -1), 8), f16(0), f16(2))


def _k_to_blocks(arrays: tuple[np.ndarray, ...], layout: KQuantLayout) -> np.ndarray:
    n, nb = arrays[layout.suffixes.index("q_scale")].shape
    low = unpack_bits(arrays[0], 4)
    high = unpack_bits(arrays[1], layout.high_bits) if layout.high_bits else None
    sub = unpack_bits(arrays[layout.suffixes.index("q_sub")], 8).reshape(n, nb, 16)
    d = _fp16_bytes(arrays[layout.suffixes.index("q_scale")], n, nb)
    if layout.bits == 6:
        low = low.reshape(n, nb, 2, 2, 64)
        ql = low[:, :, :, 0] | (low[:, :, :, 1] << np.uint8(4))
        high = high.reshape(n, nb, 2, 4, 32) << (np.arange(4, dtype=np.uint8) * np.uint8(2)).reshape(
            1, 1, 1, 4, 1
        )
        qh = np.bitwise_or.reduce(high, axis=3)
        parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sub ^ np.uint8(0x80), d]
        return np.concatenate(parts, axis=-1).reshape(n, nb * _BLOCK_BYTES["q6_k"])
    sc, mn = sub[..., :8], sub[..., 8:]
    a = sc[..., :4] | ((sc[..., 4:] >> np.uint8(4)) << np.uint8(6))
    b = mn[..., :4] | ((mn[..., 4:] >> np.uint8(4)) << np.uint8(6))
    c = (sc[..., 4:] & np.uint8(0x0F)) | (mn[..., 4:] << np.uint8(4))
    dmin = _fp16_bytes(arrays[layout.suffixes.index("q_min")], n, nb)
    low = low.reshape(n, nb, 4, 2, 32)
    parts = [d, dmin, a, b, c]
    if layout.high_bits:
        bits = high.reshape(n, nb, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        parts.append(np.bitwise_or.reduce(bits, axis=2))
    parts.append((low[:, :, :, 0] | (low[:, :, :, 1] << np.uint8(4))).reshape(n, nb, 128))
    nbytes = _BLOCK_BYTES["q5_k" if layout.high_bits else "q4_k"]
    return np.concatenate(parts, axis=-1).reshape(n, nb * nbytes)


def _k_dequantize(arrays: tuple[np.ndarray, ...], layout: KQuantLayout) -> np.ndarray:
    """float32 values of repacked K-quant arrays, with gguf's order of operations (see the module doc)."""
    d = _f16(arrays[layout.suffixes.index("q_scale")]).astype(np.float32)
    n, nb = d.shape
    q = unpack_bits(arrays[0], 4).astype(np.int32)
    if layout.high_bits:
        q |= unpack_bits(arrays[1], layout.high_bits).astype(np.int32) << 4
    sub = unpack_bits(arrays[layout.suffixes.index("q_sub")], 8).reshape(n, nb, 16).astype(np.float32)
    per = SUPER_BLOCK // layout.sub_block  # sub-blocks per super-block
    if layout.bits == 6:
        scale = d[..., None] * (sub - np.float32(128))  # (n, nb, 16)
        q = q.reshape(n, nb, per, layout.sub_block).astype(np.float32) - np.float32(32)
        return (scale[..., None] * q).reshape(n, nb * SUPER_BLOCK)
    dmin = _f16(arrays[layout.suffixes.index("q_min")]).astype(np.float32)
    scale = (d[..., None] * sub[..., :8])[..., None]
    low = (dmin[..., None] * sub[..., 8:])[..., None]
    q = q.reshape(n, nb, per, layout.sub_block).astype(np.float32)
    return (scale * q - low).reshape(n, nb * SUPER_BLOCK)
