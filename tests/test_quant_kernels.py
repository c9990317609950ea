"""The clip search's compiled candidate loop (`quantization/clip_kernel.py`) picks the same scales as the
numpy loop, bit for bit: the same float32 operations in numpy's order, no FMA, numpy's pairwise sums."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit.quantization import clip_kernel, clip_search, get_scheme


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
        m.setattr(clip_kernel, "supports", lambda group_size: False)
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
    real = clip_kernel.clip_ratios
    monkeypatch.setattr(clip_kernel, "clip_ratios", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = clip_search.search_scales(w, scheme, act_sq=act)
    assert calls  # the compiled loop ran
    ref = _numpy_scales(monkeypatch, w, scheme, act)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), ref.view(f"u{ref.itemsize}"))
    wg = clip_search.gq._grouped(w, got.dtype, get_scheme(scheme).layout)
    rtn = (np.abs(wg).max(-1) / 7).astype(got.dtype)
    assert 0.3 < np.mean(got != rtn) < 1  # the search moved most scales, not all (zero groups stay)


def test_group_sizes_outside_numpys_pairwise_block_use_the_numpy_loop() -> None:
    assert clip_kernel.supports(32) and clip_kernel.supports(64) and clip_kernel.supports(128)
    assert not clip_kernel.supports(256)  # numpy splits a run this long in halves first
    assert not clip_kernel.supports(12)  # not a multiple of the 8 running sums
