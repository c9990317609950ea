"""The compiled quantization kernels (`quantization/kernels.py`) pick the same scales and pack the same words
as the numpy code, bit for bit: the same float32 operations in numpy's order, no FMA, numpy's pairwise
sums."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit.quantization import clip_search, get_scheme, kernels
from toolkit.quantization import group_quant as gq


def _weights(rng, n: int, k: int) -> np.ndarray:
    """Heavy-tailed rows, plus the cases with their own branches: all-zero groups (scale 0), an outlier, a
    group of values at the bottom of fp16's range, a group that overflows no ratio."""
    w = (rng.standard_normal((n, k)) * 0.02 * np.exp(rng.standard_normal((n, k)))).astype(np.float32)
    w[:, :64] = 0
    w[1, 100] = 3.0
    w[2, 192:224] = rng.standard_normal(32).astype(np.float32) * 1e-7
    w[3, 256:288] = 60000.0
    return w


def _numpy_scales(monkeypatch, w, scheme, act_sq) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(kernels, "supports", lambda group_size: False)
        return clip_search.search_scales(w, scheme, act_sq=act_sq)


@pytest.mark.parametrize("scheme", ["q4f16_1", "q4f32_1", "g64"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_picks_the_numpy_loops_scales_bit_for_bit(monkeypatch, scheme: str, weighted: bool) -> None:
    rng = np.random.default_rng(3)
    if scheme == "g64":  # a group size the kernel sums in numpy's order too (8 running sums)
        scheme = dataclasses.replace(get_scheme("q4f16_1"), name="g64", group_size=64)
    k = 1024 + 96  # a last group padded with zeros in the 64 case
    w = _weights(rng, 80, k)
    act = rng.random(k).astype(np.float32) * 4 if weighted else None
    calls = []
    real = kernels.clip_ratios
    monkeypatch.setattr(kernels, "clip_ratios", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = clip_search.search_scales(w, scheme, act_sq=act)
    assert calls  # the compiled loop ran
    ref = _numpy_scales(monkeypatch, w, scheme, act)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), ref.view(f"u{ref.itemsize}"))
    wg = clip_search.gq._grouped(w, got.dtype, get_scheme(scheme).layout)
    rtn = (np.abs(wg).max(-1) / 7).astype(got.dtype)
    assert 0.3 < np.mean(got != rtn) < 1  # the search moved most scales, not all (zero groups stay)


def test_group_sizes_outside_numpys_pairwise_block_use_the_numpy_loop() -> None:
    assert kernels.supports(32) and kernels.supports(64) and kernels.supports(128)
    assert not kernels.supports(256)  # numpy splits a run this long in halves first
    assert not kernels.supports(12)  # not a multiple of the 8 running sums


@pytest.mark.parametrize("scheme", ["q4f16_1", "q4f32_1", "g64"])
@pytest.mark.parametrize("k", [1024, 1000])
@pytest.mark.parametrize("given", [False, True])
def test_quantize_kernel_packs_the_numpy_words_bit_for_bit(monkeypatch, scheme: str, k: int, given: bool):
    """RTN or given scales (zeros among them), a K that pads the last group (padding packs as code 0)."""
    rng = np.random.default_rng(4)
    if scheme == "g64":
        scheme = dataclasses.replace(get_scheme("q4f16_1"), name="g64", group_size=64)
    layout = get_scheme(scheme).layout
    w = _weights(rng, 300, k)
    scales = None
    if given:
        scales = (rng.random((300, layout.num_groups(k))) * 0.01).astype(get_scheme(scheme).scale_dtype)
        scales[:, 1] = 0
    calls = []
    real = kernels.quantize_groups
    monkeypatch.setattr(kernels, "quantize_groups", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = gq.quantize(w, scheme, scales=scales)
    assert calls  # the compiled packing ran
    with monkeypatch.context() as m:
        m.setattr(kernels, "packs", lambda layout: False)
        ref = gq.quantize(w, scheme, scales=scales)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1].view(f"u{got[1].itemsize}"), ref[1].view(f"u{ref[1].itemsize}"))
    assert len(np.unique(gq.unpack(got[0], layout))) == 15  # every code 0..14 occurs


def test_layouts_the_quantize_kernel_leaves_to_numpy() -> None:
    from toolkit.quantization import GroupLayout

    assert kernels.packs(get_scheme("q4f16_1").layout)
    assert not kernels.packs(GroupLayout(bits=8, group_size=32, storage="uint32"))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("k", [1024, 1000])
def test_grouping_rounds_like_astype_float16_and_pads_with_zeros(dtype: str, k: int) -> None:
    rng = np.random.default_rng(6)
    layout = get_scheme("q4f16_1").layout
    w = (rng.standard_normal((40, k)) * np.exp(rng.standard_normal((40, k)) * 2) * 1e-3).astype(np.float32)
    w[0, :10] = 6e-8  # fp16 subnormals
    w[1, :5] = 65519.0  # rounds down to fp16's largest
    w[2, :4] = -0.0
    got = gq._grouped(w, np.dtype(dtype), layout)
    ref = w.astype(dtype).astype(np.float32)
    ref = np.concatenate([ref, np.zeros((40, layout.num_groups(k) * 32 - k), np.float32)], axis=1)
    np.testing.assert_array_equal(got.view(np.uint32), ref.reshape(got.shape).view(np.uint32))


@pytest.mark.parametrize("bad", [65520.0, np.inf, -np.inf, np.nan])
def test_grouping_refuses_weights_beyond_float16(bad: float) -> None:
    w = np.ones((4, 64), np.float32)
    w[2, 7] = bad
    with pytest.raises(ValueError, match="does not fit float16"):
        gq._grouped(w, np.dtype("float16"), get_scheme("q4f16_1").layout)
    gq._grouped(w, np.dtype("float32"), get_scheme("q4f32_1").layout)  # fp32 keeps them


def test_numpy_only_gives_the_same_bytes_and_gptq_runs_without_the_kernels(monkeypatch) -> None:
    rng = np.random.default_rng(8)
    w = _weights(rng, 64, 1000)
    with_kernels = gq.quantize(w, "q4f16_1", scales=clip_search.search_scales(w, "q4f16_1"))
    with kernels.numpy_only():
        assert not kernels.active()
        monkeypatch.setattr(kernels, "_kernel", lambda *a: pytest.fail("a kernel was built"))
        plain = gq.quantize(w, "q4f16_1", scales=clip_search.search_scales(w, "q4f16_1"))
    assert kernels.active()
    np.testing.assert_array_equal(with_kernels[0], plain[0])
    np.testing.assert_array_equal(with_kernels[1].view(np.uint16), plain[1].view(np.uint16))
    from toolkit.convert import gptq_stream

    seen = []
    monkeypatch.setattr(gptq_stream, "_gptq_tensors", lambda *a, **kw: iter([seen.append(kernels.active())]))
    list(gptq_stream.gptq_tensors())
    assert seen == [False]
