"""q4f16_1 / q4f32_1 numerics: bit-exact vs independent references, round trips, clip search, registry."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.errors import UserError
from toolkit.quantization import QUANTIZATIONS, get_scheme
from toolkit.quantization import group_quant as gq
from toolkit.quantization.clip_search import search_scales

FLOAT = {"q4f16_1": np.float16, "q4f32_1": np.float32}


def reference_quantize(w: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The formula element by element with numpy scalars of the model dtype (IEEE rounding after each op).

    scale = max|w| / 7 per 32 consecutive elements of a row; code = clamp(round(w / scale + 7), 0, 14) with
    round half to even (TVM's tir.round is nearbyint); code k at bits 4*(k%8) of word k//8.
    """
    t = dtype
    n, k = w.shape
    g_count = -(-k // 32)
    wq = w.astype(t)
    q_weight = np.zeros((n, g_count * 4), np.uint32)
    q_scale = np.zeros((n, g_count), t)
    for i in range(n):
        for g in range(g_count):
            grp = wq[i, 32 * g : min(32 * g + 32, k)]
            s = t(max(abs(v) for v in grp) / t(7))
            q_scale[i, g] = s
            for j, v in enumerate(grp):
                code = 7 if s == 0 else int(min(max(np.rint(t(t(v / s) + t(7))), 0), 14))
                kk = 32 * g + j
                q_weight[i, kk // 8] |= np.uint32(code << (4 * (kk % 8)))
    return q_weight, q_scale


def tricky_weights(n: int, k: int, seed: int) -> np.ndarray:
    """Random rows plus rows built to hit exact .5 ties, fp16 sum rounding, zero and one-hot groups."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(1e-3, 2.0, (n, 1)).astype(np.float32)
    # row 0: max 7 -> scale 1 exactly, values k + 0.5 are exact ties
    w[0] = np.resize(np.array([7, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, -6.5, 3.5], np.float32), k)
    # row 1: ties after fp16 rounding of w/s + 7 (1.5 + 2**-10 rounds to 8.5 in fp16 after +7)
    w[1] = np.resize(np.array([7, 1.5 + 2**-10, -1.5 - 2**-10, 0.5 + 2**-11, 4.5 + 2**-9], np.float32), k)
    w[2, :32] = 0.0  # an all-zero group
    w[3] = 0.0
    w[3, 5] = -3.0  # one-hot groups
    w[4] *= 1e-5  # tiny weights (fp16 subnormals)
    return w


@pytest.mark.parametrize("scheme", ["q4f16_1", "q4f32_1"])
@pytest.mark.parametrize("k", [128, 96, 80])  # 80: not a multiple of 32, padded like MLC
def test_quantize_bit_exact_vs_reference(scheme: str, k: int) -> None:
    w = tricky_weights(12, k, seed=k)
    q_weight, q_scale = gq.quantize(w, scheme)
    ref_w, ref_s = reference_quantize(w, FLOAT[scheme])
    assert q_weight.dtype == np.uint32 and q_scale.dtype == FLOAT[scheme]
    assert q_weight.shape == (12, 4 * (-(-k // 32))) and q_scale.shape == (12, -(-k // 32))
    np.testing.assert_array_equal(
        q_scale.view(np.uint16 if scheme == "q4f16_1" else np.uint32),
        ref_s.view(np.uint16 if scheme == "q4f16_1" else np.uint32),
    )
    np.testing.assert_array_equal(q_weight, ref_w)


def test_ties_round_half_to_even() -> None:
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, 0.5, 1.5, -0.5]  # scale 1: 7.5 -> 8, 8.5 -> 8, 6.5 -> 6
    codes = gq.unpack(gq.quantize(w, "q4f32_1")[0])[0]
    assert codes[:4].tolist() == [14, 8, 8, 6]
    assert codes[4:].tolist() == [7] * 28


def test_zero_group_gives_zero_not_nan() -> None:
    w = np.zeros((2, 64), np.float32)
    w[1, 40] = 1.0
    q_weight, q_scale = gq.quantize(w, "q4f16_1")
    assert q_scale[0].tolist() == [0.0, 0.0]
    deq = gq.dequantize(q_weight, q_scale)
    assert np.isfinite(deq).all()
    np.testing.assert_array_equal(deq, w.astype(np.float16))  # 0 and max|w| are exact


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_matches_tvm_te_quantizer(dtype: str) -> None:
    """MLC quantizes with a TE function compiled by TVM; the same formula built here must agree bit-exactly
    (this pins down TVM's fp16 arithmetic and its `round`, not just our reading of them)."""
    tvm = pytest.importorskip("tvm")
    from tvm import te, tirx

    n, k = 16, 256
    w = tricky_weights(n, k, seed=3)
    w[2:4] += 0.25  # TVM computes 0/0 for all-zero groups (undefined cast); keep them out of this check
    W = te.placeholder((n, k), dtype, name="W")
    r = te.reduce_axis((0, 32), name="r")
    max_abs = te.compute((n, k // 32), lambda i, g: te.max(te.abs(W[i, g * 32 + r]), axis=r), name="max_abs")
    scale = te.compute((n, k // 32), lambda i, g: max_abs[i, g] / tirx.const(7, dtype), name="scale")
    seven, zero, top = (tirx.const(v, dtype) for v in (7, 0, 14))
    codes = te.compute(
        (n, k),
        lambda i, j: tirx.min(tirx.max(tirx.round(W[i, j] / scale[i, j // 32] + seven), zero), top).astype(
            "uint32"
        ),
        name="codes",
    )
    r8 = te.reduce_axis((0, 8), name="r8")
    packed = te.compute(
        (n, k // 8),
        lambda i, j: te.sum(codes[i, j * 8 + r8] << (r8 * 4).astype("uint32"), axis=r8),
        name="packed",
    )
    f = tvm.compile(te.create_prim_func([W, packed, scale]), target="llvm")
    out_w = tvm.runtime.tensor(np.zeros((n, k // 8), np.uint32))
    out_s = tvm.runtime.tensor(np.zeros((n, k // 32), dtype))
    f(tvm.runtime.tensor(w.astype(dtype)), out_w, out_s)
    q_weight, q_scale = gq.quantize(w, "q4f16_1" if dtype == "float16" else "q4f32_1")
    np.testing.assert_array_equal(q_weight, out_w.numpy())
    np.testing.assert_array_equal(q_scale, out_s.numpy())


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(7, 64), dtype=np.uint8)
    packed = gq.pack(codes)
    assert packed.shape == (7, 8) and packed.dtype == np.uint32
    np.testing.assert_array_equal(gq.unpack(packed), codes)
    # layout: element k at bits 4*(k%8) of word k//8, lowest first
    one = np.zeros((1, 8), np.uint8)
    one[0, 3] = 0xA
    assert int(gq.pack(one)[0, 0]) == 0xA << 12


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_puts_element_e_at_bits_times_e_of_its_word(bits) -> None:
    """The byte-wise packer against the definition, word by word in Python integers."""
    rng = np.random.default_rng(bits)
    per = 32 // bits
    codes = rng.integers(0, 1 << bits, size=(3, 5 * per), dtype=np.uint8)
    words = gq.pack_bits(codes, bits)
    assert words.shape == (3, 5) and words.dtype == np.uint32
    for r in range(3):
        for w in range(5):
            want = sum(int(codes[r, w * per + e]) << (bits * e) for e in range(per))
            assert int(words[r, w]) == want
    np.testing.assert_array_equal(gq.unpack_bits(words, bits), codes)


@pytest.mark.parametrize("scheme", ["q4f16_1", "q4f32_1"])
def test_dequantize_is_code_minus_7_times_scale(scheme: str) -> None:
    w = tricky_weights(6, 96, seed=1)
    q_weight, q_scale = gq.quantize(w, scheme)
    deq = gq.dequantize(q_weight, q_scale)
    codes = gq.unpack(q_weight).astype(np.float64)
    ref = (codes - 7) * np.repeat(q_scale.astype(np.float64), 32, axis=1)
    np.testing.assert_array_equal(deq, ref.astype(FLOAT[scheme]))
    # RTN error per element is at most half a step (scale / 2), plus the fp16 rounding of w itself
    wq = w.astype(FLOAT[scheme]).astype(np.float64)
    step = np.repeat(q_scale.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(wq - deq) <= step / 2 * (1 + 2e-3) + 1e-12)


def test_padded_k_dequantizes_to_k_columns() -> None:
    w = tricky_weights(5, 80, seed=2)
    q_weight, q_scale = gq.quantize(w, "q4f32_1")
    assert gq.dequantize(q_weight, q_scale, k=80).shape == (5, 80)
    assert gq.unpack(q_weight)[:, 80:].max() == 0  # MLC packs padded positions as 0
    with pytest.raises(ValueError):
        gq.dequantize(q_weight, q_scale, k=50)


@pytest.mark.parametrize("scheme", ["q4f16_1", "q4f32_1"])
def test_clip_search_never_worse_than_rtn(scheme: str) -> None:
    rng = np.random.default_rng(5)
    # heavy-tailed rows (student-t) are where clipping pays; Gaussian rows where it pays little
    w = (
        np.concatenate([rng.standard_t(3, (48, 256)), rng.standard_normal((16, 256))]).astype(np.float32)
        * 0.02
    )
    rtn = gq.quantize(w, scheme)
    scales = search_scales(w, scheme)
    assert scales.shape == rtn[1].shape and scales.dtype == rtn[1].dtype
    searched = gq.quantize(w, scheme, scales=scales)
    assert searched[0].shape == rtn[0].shape and searched[0].dtype == np.uint32  # same storage format

    # per group: the search includes the RTN scale, so no group may get worse (float32 sums: 1e-6 slack)
    def group_err(q):
        d = gq.dequantize(*q).astype(np.float64) - w.astype(FLOAT[scheme]).astype(np.float64)
        return (d.reshape(64, -1, 32) ** 2).sum(-1)

    e_rtn, e_search = group_err(rtn), group_err(searched)
    assert np.all(e_search <= e_rtn * (1 + 1e-5) + 1e-30)
    assert e_search.sum() < 0.97 * e_rtn.sum()  # and on heavy tails it must actually win (7% here)


def test_clip_search_weighted_by_activation_stats() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_t(3, (32, 128)).astype(np.float32)
    act = rng.uniform(0.01, 10.0, 128).astype(np.float32)  # per-input-channel E[x^2]
    scales = search_scales(w, "q4f32_1", act_sq=act)
    rtn = gq.quantize(w, "q4f32_1")
    searched = gq.quantize(w, "q4f32_1", scales=scales)

    def weighted(q):
        return float((((gq.dequantize(*q) - w) ** 2) * act).sum())

    assert weighted(searched) <= weighted(rtn)


def test_registry() -> None:
    assert set(QUANTIZATIONS) >= {"q0f32", "q0f16", "q4f16_1", "q4f32_1"}
    s = get_scheme("q4f16_1")
    assert (s.kind, s.bits, s.group_size, s.storage, s.model_dtype, s.scale_dtype) == (
        "group",
        4,
        32,
        "uint32",
        "float16",
        "float16",
    )
    assert s.quantize_embedding and s.quantize_final_fc and s.bits_per_weight() == 4.5
    assert get_scheme("q4f32_1").scale_dtype == "float32"
    assert get_scheme("q0f16").kind == "none" and not get_scheme("q0f16").is_quantized
    with pytest.raises(UserError, match="q4f16_1"):
        get_scheme("q4f16_7")
    with pytest.raises(ValueError):
        gq.quantize(np.zeros((2, 32), np.float32), "q0f16")
