"""Our host attention kernels against TVM's CPU kernels (the reference they replace) and a numpy softmax.

Both run the same arguments: a batch of sequences of assorted lengths (0 keys, part of a page, exact pages,
several pages) whose pages are scattered through the cache, GQA head groups, with and without sliding window
(sink + offset) and causal masks. Tolerance 1e-5 absolute on o (|o| <= max|v| ~ 4) and lse: both compute in
fp32 and differ only in summation order over <= 300 keys x 96 dims."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

from toolkit.compile.cpu_attention import (
    decode_attention_cpu,
    prefill_paged_attention_cpu,
    prefill_ragged_attention_cpu,
)
from toolkit.compile.host_attention import replace_attention
from toolkit.targets import load_preset

PS = 16
TOL = 1e-5


def _build(func):
    target = load_preset("host").target
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _run(f, inputs, out_shapes, scalars):
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(s, "float32"), dev) for s in out_shapes]
    f(*[tvm.runtime.tensor(x, dev) for x in inputs], *outs, *scalars)
    return [o.numpy() for o in outs]


def _paged_cache(rng, lens, h_kv, d, sliding):
    """Pages of `lens` keys per sequence, scattered; length_info as TVM's runtime passes it."""
    n_pages = [(n + PS - 1) // PS for n in lens]
    total = sum(n_pages) + 3
    pages = rng.standard_normal((total, 2, h_kv, PS, d)).astype("float32")
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype("int32")
    values = rng.permutation(total).astype("int32")[: indptr[-1]].copy()
    last = np.array([(n - 1) % PS + 1 if n else 0 for n in lens], "int32")
    if not sliding:
        return pages, indptr, values, last
    offset = np.array([5 if n > 40 else 0 for n in lens], "int32")  # window starts 5 slots in
    sink = np.array([4 if n > 40 else 0 for n in lens], "int32")
    return pages, indptr, values, np.stack([last, offset, sink]).astype("int32")


def _ragged_self_attention(rng, n_q, h_qo, h_kv, d):
    """A ragged prefill batch where each sequence's chunk attends to its own keys: (q, k, v, indptr, the
    kernels' tensor inputs, their output shapes)."""
    q = rng.standard_normal((sum(n_q), h_qo, d)).astype("float32")
    k = rng.standard_normal((sum(n_q), h_kv, d)).astype("float32")
    v = rng.standard_normal((sum(n_q), h_kv, d)).astype("float32")
    ptr = np.concatenate([[0], np.cumsum(n_q)]).astype("int32")
    inputs = [q, ptr, k, v, ptr, np.zeros(sum(n_q), "int32"), np.zeros(len(n_q), "int32")]
    return q, k, v, ptr, inputs, [(sum(n_q), h_qo, d), (sum(n_q), h_qo)]


def _softmax_attention(q, keys, vals):
    """numpy reference for one query row: q [H_qo, d], keys / vals [H_kv, n, d] (GQA: H_qo / H_kv each)."""
    g = q.shape[0] // keys.shape[0]
    s = np.einsum("hd,hnd->hn", q, np.repeat(keys, g, axis=0)) / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hn,hnd->hd", p / p.sum(-1, keepdims=True), np.repeat(vals, g, axis=0))


@pytest.mark.parametrize("h_kv,h_qo,d,sliding", [(32, 32, 96, False), (3, 9, 64, True), (2, 8, 128, False)])
def test_decode_matches_tvm_kernel(h_kv, h_qo, d, sliding):
    rng = np.random.default_rng(0)
    lens = [137, 5, 16, 0, 300]
    b = len(lens)
    pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, sliding)
    q = rng.standard_normal((b, h_qo, d)).astype("float32")
    inputs = [q, pages, indptr, values, info, np.zeros(b, "int32"), np.zeros(b, "int32")]
    shapes, scalars = [(b, h_qo, d), (b, h_qo)], [0, 1.0, 1e4, 1 / np.sqrt(d)]
    theirs = _attention_decode_cpu(h_kv, h_qo, d, "float32", sliding, {}, PS)
    ref = _run(_build(theirs), inputs, shapes, scalars)
    ours = _run(_build(decode_attention_cpu(h_kv, h_qo, d, "float32", sliding, PS)), inputs, shapes, scalars)
    np.testing.assert_allclose(ours[0], ref[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1], ref[1], atol=TOL, rtol=0)
    assert np.abs(ref[0][0]).max() > 0.01  # a real output, not zeros on both sides
    # sequence 0 without a window by numpy: softmax over its 137 keys in page order
    if not sliding:
        keys = np.concatenate([pages[p, 0] for p in values[: indptr[1]]], axis=1)[:, : lens[0]]  # [Hkv,n,d]
        vals = np.concatenate([pages[p, 1] for p in values[: indptr[1]]], axis=1)[:, : lens[0]]
        np.testing.assert_allclose(ours[0][0], _softmax_attention(q[0], keys, vals), atol=TOL, rtol=0)


@pytest.mark.parametrize("sliding,causal", [(False, 0), (False, 1), (True, 1)])
def test_paged_prefill_matches_tvm_kernel(sliding, causal):
    rng = np.random.default_rng(1)
    h_kv, h_qo, d, window = 4, 8, 96, 40
    lens, n_q = [70, 0, 33], [5, 3, 60]
    b = len(lens)
    pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, sliding)
    total = sum(n_q)
    q = rng.standard_normal((total, h_qo, d)).astype("float32")
    q_indptr = np.concatenate([[0], np.cumsum(n_q)]).astype("int32")
    inputs = [q, q_indptr, pages, indptr, values, info, np.zeros(b, "int32"), np.zeros(total, "int32")]
    shapes, scalars = [(total, h_qo, d), (total, h_qo)], [causal, 0, 1.0, 1e4, 1 / np.sqrt(d)]
    theirs = _attention_prefill_cpu(h_kv, h_qo, d, "float32", sliding, {}, PS, sliding_window_size=window)
    ref = _run(_build(theirs), inputs, shapes, scalars)
    mine = prefill_paged_attention_cpu(h_kv, h_qo, d, "float32", sliding, PS, window)
    ours = _run(_build(mine), inputs, shapes, scalars)
    # numpy: each row's visible keys by TVM's mask, in the sequence's logical order (sink, then window)
    expect, seen, row = np.zeros_like(ours[0]), np.zeros(total, bool), 0
    tvm_defined = np.ones(total, bool)
    for b_, (n_pages, m) in enumerate(zip(np.diff(indptr), n_q)):
        slots = [(p, i) for p in values[indptr[b_] : indptr[b_ + 1]] for i in range(PS)]
        if sliding:
            n = (n_pages - 1) * PS + info[0, b_] - info[1, b_] + info[2, b_] if n_pages else 0
            pos = [j if j < info[2, b_] else j - info[2, b_] + info[1, b_] for j in range(n)]
        else:
            n = (n_pages - 1) * PS + info[b_] if n_pages else 0
            pos = list(range(n))
        for i in range(m):
            lo = max(n - max(window - i - 1, 0), 0) if causal and sliding else 0
            hi = min(n, n - m + i + 1) if causal and not sliding else n
            tvm_defined[row + i] = lo == 0
            if hi > lo:
                kk = np.stack([pages[slots[pos[j]][0], 0, :, slots[pos[j]][1]] for j in range(lo, hi)], 1)
                vv = np.stack([pages[slots[pos[j]][0], 1, :, slots[pos[j]][1]] for j in range(lo, hi)], 1)
                expect[row + i] = _softmax_attention(q[row + i], kk, vv)
                seen[row + i] = True
        row += m
    assert seen.sum() > total // 2
    np.testing.assert_allclose(ours[0], expect, atol=TOL, rtol=0)  # rows that see no keys: o = 0
    # TVM's kernel: equal where it is defined. A row whose first keys are masked (causal + window) runs
    # with an uninitialised running max there (NaN or garbage, seen in this test), so those are skipped
    ok = seen & tvm_defined
    assert ok.sum() >= 5
    np.testing.assert_allclose(ours[0][ok], ref[0][ok], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1][ok], ref[1][ok], atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [0, 1])
def test_ragged_prefill_matches_tvm_kernel(causal):
    rng = np.random.default_rng(2)
    h_kv, h_qo, d = 3, 9, 64
    n_q, n_kv = [7, 1, 40], [7, 5, 40]  # causal: query i of a chunk sees keys < n_kv - n_q + i + 1
    b = len(n_q)
    q = rng.standard_normal((sum(n_q), h_qo, d)).astype("float32")
    k = rng.standard_normal((sum(n_kv), h_kv, d)).astype("float32")
    v = rng.standard_normal((sum(n_kv), h_kv, d)).astype("float32")
    q_indptr = np.concatenate([[0], np.cumsum(n_q)]).astype("int32")
    kv_indptr = np.concatenate([[0], np.cumsum(n_kv)]).astype("int32")
    inputs = [q, q_indptr, k, v, kv_indptr, np.zeros(sum(n_q), "int32"), np.zeros(b, "int32")]
    shapes, scalars = [(sum(n_q), h_qo, d), (sum(n_q), h_qo)], [causal, 0, 1.0, 1e4, 1 / np.sqrt(d)]
    theirs = _attention_prefill_ragged_cpu(h_kv, h_qo, d, d, "float32", {})
    ref = _run(_build(theirs), inputs, shapes, scalars)
    ours = _run(_build(prefill_ragged_attention_cpu(h_kv, h_qo, d, "float32")), inputs, shapes, scalars)
    np.testing.assert_allclose(ours[0], ref[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[1], ref[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [0, 1])
def test_prefill_kernels_apply_hf_sliding_window(causal):
    """`mask_window` W (HF's sliding window over a cache that never rolls): a query at absolute position p
    sees keys p - W + 1 .. p. Ragged (the chunk's own keys, causal) and paged (the keys before the chunk
    when not causal, the whole prefix including the chunk when causal), both against numpy; sequences of
    1 to 40 query rows cover partial blocks of the prefill tasks."""
    rng = np.random.default_rng(5)
    h_kv, h_qo, d, w = 2, 6, 32, 5
    scale = 1 / np.sqrt(d)
    # ragged: chunk rows at positions n - n_q + i
    n_q = [7, 1, 40]
    q, k, v, ptr, inputs, shapes = _ragged_self_attention(rng, n_q, h_qo, h_kv, d)
    scalars = [causal, 0, 1.0, 1e4, scale]
    ours = _run(
        _build(prefill_ragged_attention_cpu(h_kv, h_qo, d, "float32", mask_window=w)), inputs, shapes, scalars
    )[0]
    for s_, n in enumerate(n_q):
        for i in range(n):
            lo, hi = (max(i + 1 - w, 0), i + 1) if causal else (0, n)
            kk, vv = (
                k[ptr[s_] + lo : ptr[s_] + hi].transpose(1, 0, 2),
                v[ptr[s_] + lo : ptr[s_] + hi].transpose(1, 0, 2),
            )
            np.testing.assert_allclose(
                ours[ptr[s_] + i], _softmax_attention(q[ptr[s_] + i], kk, vv), atol=TOL
            )
    # paged: query row i of a chunk of n_q sits at n - n_q + i (causal: pages hold the chunk) or n + i
    lens, n_q = [70, 3, 33], [5, 3, 20]
    pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, False)
    total = sum(n_q)
    q = rng.standard_normal((total, h_qo, d)).astype("float32")
    q_indptr = np.concatenate([[0], np.cumsum(n_q)]).astype("int32")
    inputs = [
        q,
        q_indptr,
        pages,
        indptr,
        values,
        info,
        np.zeros(len(lens), "int32"),
        np.zeros(total, "int32"),
    ]
    shapes, scalars = [(total, h_qo, d), (total, h_qo)], [causal, 0, 1.0, 1e4, scale]
    mine = prefill_paged_attention_cpu(h_kv, h_qo, d, "float32", False, PS, 0, mask_window=w)
    ours = _run(_build(mine), inputs, shapes, scalars)[0]
    seen = 0
    for s_, (n, m) in enumerate(zip(lens, n_q)):
        slots = [(p, j) for p in values[indptr[s_] : indptr[s_ + 1]] for j in range(PS)][:n]
        keys = np.stack([pages[p, 0, :, j] for p, j in slots], 1)  # [H_kv, n, d]
        vals = np.stack([pages[p, 1, :, j] for p, j in slots], 1)
        for i in range(m):
            pos = n - m + i if causal else n + i
            lo, hi = max(pos - w + 1, 0), min(pos + 1, n)
            got = ours[q_indptr[s_] + i]
            if hi <= lo:
                np.testing.assert_array_equal(got, 0)  # no key in the window: o = 0, as TVM's kernels
                continue
            seen += 1
            np.testing.assert_allclose(
                got, _softmax_attention(q[q_indptr[s_] + i], keys[:, lo:hi], vals[:, lo:hi]), atol=TOL
            )
    assert seen >= 10


def test_kv_copy_kernels_match_tvm():
    """The qkv split and the page append: ours equal TVM's bit for bit (copies), with a token the position
    map skips (-1) and tokens landing mid-page; the split refuses the rotary flag it does not implement."""
    from tvm.relax.frontend.nn.llm._page_kernels import _kv_cache_transpose_append

    from toolkit.compile.cpu_kv_copy import split_qkv_cpu, transpose_append_cpu
    from toolkit.compile.host_attention import replace_attention

    rng = np.random.default_rng(6)
    h_qo, h_kv, d, n, dtype = 9, 3, 64, 21, "float16"
    dev = tvm.cpu()
    pages0 = rng.standard_normal((4, 2, h_kv, PS, d)).astype(dtype)
    kd = rng.standard_normal((n, h_kv, d)).astype(dtype)
    vd = rng.standard_normal((n, h_kv, d)).astype(dtype)
    pos = (np.arange(n) + 5).astype("int32")
    pos[3] = -1
    outs = []
    for f in (_kv_cache_transpose_append(h_kv, d, dtype, PS), transpose_append_cpu(h_kv, d, dtype, PS)):
        pages = tvm.runtime.tensor(pages0.copy(), dev)
        _build(f)(pages, *[tvm.runtime.tensor(a, dev) for a in (kd, vd, pos)])
        outs.append(pages.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    assert not np.array_equal(outs[1], pages0)
    np.testing.assert_array_equal(outs[1][0, 0, :, 5], kd[0])  # token 0 -> slot 5 of page 0
    np.testing.assert_array_equal(outs[1][0, 1, :, 5], vd[0])
    np.testing.assert_array_equal(outs[1][0, :, :, 8], pages0[0, :, :, 8])  # token 3's slot: skipped

    # the split (TVM's fused_rope, with the runtime rotary flag)
    qkv = rng.standard_normal((n, h_qo + 2 * h_kv, d)).astype(dtype)
    theirs = _tvm_fused_rope(h_qo, h_kv, d, dtype)
    mine = split_qkv_cpu(h_qo, h_kv, d, dtype)
    res = []
    for f in (theirs, mine):
        outs = [tvm.runtime.empty((n, h, d), dtype, dev) for h in (h_qo, h_kv, h_kv)]
        _build(f)(tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(pos, dev), *outs, 0)
        res.append([o.numpy() for o in outs])
    for a, b in zip(res[1], res[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(res[1][2], qkv[:, h_qo + h_kv :])
    outs = [tvm.runtime.empty((n, h, d), dtype, dev) for h in (h_qo, h_kv, h_kv)]
    with pytest.raises(Exception, match="rope applied before the cache"):
        _build(mine)(tvm.runtime.tensor(qkv, dev), tvm.runtime.tensor(pos, dev), *outs, 1)
    # the swap picks both by symbol
    mod = tvm.IRModule({"split": theirs, "append": _kv_cache_transpose_append(h_kv, d, dtype, PS)})
    swapped = replace_attention(mod, 0)
    for name in ("split", "append"):
        assert "T.vectorized" in swapped[name].script() and "T.vectorized" not in mod[name].script()


def _tvm_fused_rope(h_qo, h_kv, d, dtype):
    """TVM's qkv split kernel (`fused_rope`), as the KV cache builds it."""
    from tvm.relax.frontend.nn.llm import position_embedding as pe

    return pe.llama_rope_with_position_map(1e4, 1.0, d, h_qo, h_kv, dtype, {}, None).with_attr(
        "global_symbol", "fused_rope"
    )


def test_replace_attention_swaps_kernels_by_symbol():
    mod = tvm.IRModule(
        {
            "dec": _attention_decode_cpu(4, 8, 96, "float32", False, {}, PS),
            "rag": _attention_prefill_ragged_cpu(4, 8, 96, 96, "float32", {}).with_attr(
                "global_symbol", "batch_prefill_ragged_kv"
            ),
            "odd": _attention_decode_cpu(4, 8, 36, "float32", True, {}, PS),  # 36 % 8: TVM's stays
        }
    )
    out = replace_attention(mod, 1024)
    assert not out["dec"].same_as(mod["dec"]) and not out["rag"].same_as(mod["rag"])
    assert out["odd"].same_as(mod["odd"])
    assert str(out["dec"].attrs["global_symbol"]) == "batch_decode_paged_kv_cpu"
    assert "T.parallel" in out["dec"].script()


def test_fp16_cache_decode_accumulates_in_fp32():
    """The host preset's fp16 KV cache: q / pages / o in fp16, scores and sums in fp32. Against numpy in fp64
    on the same fp16-rounded inputs: o may differ only by its own fp16 rounding (half an ulp, 2^-11
    relative, |o| < 4 -> 2e-3) plus fp32 summation; lse (fp32 out) by fp32 summation only."""
    rng = np.random.default_rng(3)
    h_kv, h_qo, d, lens = 4, 8, 96, [200, 1, 33]
    b = len(lens)
    pages, indptr, values, last = _paged_cache(rng, lens, h_kv, d, False)
    q = rng.standard_normal((b, h_qo, d)).astype("float16")
    pages = pages.astype("float16")
    dev = tvm.cpu()
    o = tvm.runtime.tensor(np.zeros((b, h_qo, d), "float16"), dev)
    lse = tvm.runtime.tensor(np.zeros((b, h_qo), "float32"), dev)
    f = _build(decode_attention_cpu(h_kv, h_qo, d, "float16", False, PS))
    args = [q, pages, indptr, values, last, np.zeros(b, "int32"), np.zeros(b, "int32")]
    f(*[tvm.runtime.tensor(x, dev) for x in args], o, lse, 0, 1.0, 1e4, 1 / np.sqrt(d))
    o, lse = o.numpy().astype("float64"), lse.numpy()
    for s in range(b):
        row = values[indptr[s] : indptr[s + 1]]
        keys = np.concatenate([pages[p, 0] for p in row], axis=1)[:, : lens[s]].astype("float64")
        vals = np.concatenate([pages[p, 1] for p in row], axis=1)[:, : lens[s]].astype("float64")
        qs = q[s].astype("float64")
        np.testing.assert_allclose(o[s], _softmax_attention(qs, keys, vals), atol=2e-3, rtol=0)
        g = h_qo // h_kv
        scores = np.einsum("hd,hnd->hn", qs, np.repeat(keys, g, axis=0)) / np.sqrt(d)
        ref_lse = np.log2(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1) * np.log2(
            np.e
        )
        np.testing.assert_allclose(lse[s], ref_lse, atol=1e-4, rtol=0)
    assert np.abs(o).max() > 0.05


@pytest.mark.parametrize("lanes,chunk,prefetch", [(16, 16, 1), (8, 32, 2), (16, 8, 0)])
def test_every_knob_setting_computes_the_same_attention(lanes, chunk, prefetch):
    """`phi3 tune` picks lanes / chunk / prefetch per CPU: any setting must give the default's numbers (fp32
    summation order only), with sliding window (decode) and causal ragged prefill."""
    from toolkit.compile.cpu_attention import AttentionKnobs

    rng = np.random.default_rng(4)
    knobs = AttentionKnobs(lanes=lanes, chunk=chunk, prefetch=prefetch)
    h_kv, h_qo, d, lens = 3, 9, 64, [137, 5, 16, 0, 300]
    b = len(lens)
    pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, True)
    q = rng.standard_normal((b, h_qo, d)).astype("float32")
    inputs = [q, pages, indptr, values, info, np.zeros(b, "int32"), np.zeros(b, "int32")]
    shapes, scalars = [(b, h_qo, d), (b, h_qo)], [0, 1.0, 1e4, 1 / np.sqrt(d)]
    ref = _run(_build(decode_attention_cpu(h_kv, h_qo, d, "float32", True, PS)), inputs, shapes, scalars)
    got = _run(
        _build(decode_attention_cpu(h_kv, h_qo, d, "float32", True, PS, knobs=knobs)), inputs, shapes, scalars
    )
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, atol=TOL, rtol=0)
    _, _, _, _, inputs, shapes = _ragged_self_attention(rng, [7, 1, 40], h_qo, h_kv, d)
    scalars = [1, 0, 1.0, 1e4, 1 / np.sqrt(d)]
    ref = _run(_build(prefill_ragged_attention_cpu(h_kv, h_qo, d, "float32")), inputs, shapes, scalars)
    got = _run(
        _build(prefill_ragged_attention_cpu(h_kv, h_qo, d, "float32", knobs=knobs)), inputs, shapes, scalars
    )
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, atol=TOL, rtol=0)
    assert np.abs(ref[0]).max() > 0.01


def test_pipeline_swaps_attention_on_llvm_targets_only(tmp_path):
    """`pipeline.export_model` (what compile, tune, verify and the Vulkan check build from) runs the swap on
    llvm targets, with the knobs' sizes, and leaves other targets' graphs as exported."""
    from tiny import make_tiny_checkpoint

    from toolkit.checkpoint import open_model
    from toolkit.compile.compile_model import graph_options
    from toolkit.compile.knobs import Knobs, attention_key
    from toolkit.compile.pipeline import export_model
    from toolkit.model.phi3 import export_phi3

    cfg = open_model(make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")).config

    def kernels(mod):
        return {
            str(f.attrs["global_symbol"]): f
            for f in mod.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and str(f.attrs.get("global_symbol", "")).startswith("batch_")
        }

    host = load_preset("host")
    opts = graph_options("q4f16_1", host)
    exported = kernels(export_phi3(cfg, opts, host.target)[0])
    swapped = kernels(export_model(cfg, opts, host.target)[0])
    decode = "batch_decode_paged_kv_cpu"
    assert decode in swapped and swapped.keys() == exported.keys()
    assert "T.parallel" in swapped[decode].script() and "T.parallel" not in exported[decode].script()
    assert bool(swapped[decode].attrs["tirx.is_scheduled"])

    def with_lanes_16(rec_key: str) -> dict:
        return kernels(
            export_model(cfg, opts, host.target, Knobs({"attention_decode": {rec_key: {"lanes": 16}}}))[0]
        )

    # a record's sizes for this model's attention shape reach its decode kernel, and only that one
    key = attention_key(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    wide = with_lanes_16(key)
    for name in swapped:
        same = tvm_ffi.structural_equal(wide[name], swapped[name])
        assert same != name.startswith("batch_decode"), name
    # sizes recorded for another head shape do not (the family's "*" value: tests/test_knobs.py)
    assert key != "9x3x64"
    assert tvm_ffi.structural_equal(with_lanes_16("9x3x64")[decode], swapped[decode])

    gpu = load_preset("webgpu")
    opts = graph_options("q4f16_1", gpu)
    ours, theirs = export_model(cfg, opts, gpu.target)[0], export_phi3(cfg, opts, gpu.target)[0]
    assert tvm_ffi.structural_equal(ours, theirs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_prefetch_is_emitted_and_changes_no_number(dtype):
    """The K / V prefetch only moves lines into L2: outputs equal the kernel without it bit for bit, over
    scattered pages and lengths that end mid-chunk (the rows a chunk ahead are clamped to the sequence's
    last key), and the object code has `prefetcht1` (none without the knob)."""
    from toolkit.compile.cpu_attention import AttentionKnobs

    rng = np.random.default_rng(5)
    h_kv, h_qo, d, lens = 4, 8, 96, [200, 1, 33, 0, 48]
    b = len(lens)
    pages, indptr, values, last = _paged_cache(rng, lens, h_kv, d, False)
    q = rng.standard_normal((b, h_qo, d)).astype(dtype)
    inputs = [q, pages.astype(dtype), indptr, values, last, np.zeros(b, "int32"), np.zeros(b, "int32")]
    dev, outs, asm = tvm.cpu(), [], []
    for pf in (0, 1, 2):
        ex = _build(decode_attention_cpu(h_kv, h_qo, d, dtype, False, PS, knobs=AttentionKnobs(16, 16, pf)))
        asm.append(ex.mod.inspect_source("s"))
        o = tvm.runtime.tensor(np.zeros((b, h_qo, d), dtype), dev)
        lse = tvm.runtime.tensor(np.zeros((b, h_qo), "float32"), dev)
        ex(*[tvm.runtime.tensor(x, dev) for x in inputs], o, lse, 0, 1.0, 1e4, 1 / np.sqrt(d))
        outs.append((o.numpy(), lse.numpy()))
    assert "prefetch" not in asm[0]
    assert asm[1].count("prefetcht1") >= 2 and asm[2].count("prefetcht1") >= 2  # K and V rows
    for got in outs[1:]:
        np.testing.assert_array_equal(got[0], outs[0][0])
        np.testing.assert_array_equal(got[1], outs[0][1])
    assert np.abs(outs[0][0].astype("float32")).max() > 0.05


@pytest.mark.parametrize(
    "dtype,sliding,window",
    [("float32", False, 0), ("float32", True, 0), ("float16", False, 0), ("float32", False, 500)],
)
def test_split_key_decode_matches_head_tasks(dtype, sliding, window):
    """`splits`: a long sequence's keys in ranges over all heads, merged by their log2-sum-exp. Against the
    head-task kernel on the same arguments (fp32 summation order only, plus o's own fp16 rounding for an fp16
    cache): long enough to split (ragged ranges, a partial last page, a window cut), too short to split, and a
    batch where each sequence splits by its own length, to the same numbers it gets alone. The head tasks
    are the same code either way, so where the kernel does not split the numbers are bit-equal, and where it
    does they are not (another summation order)."""
    from toolkit.compile.cpu_attention import SPLIT_MIN_KEYS, AttentionKnobs, split_min_keys

    rng = np.random.default_rng(5)
    h_kv, h_qo, d, splits = 4, 8, 96, 3
    tol = 2e-3 if dtype == "float16" else TOL
    long = splits * SPLIT_MIN_KEYS + 37  # splits into 3 ranges of unequal pages
    # single-head tasks over pairs of heads: GQA's threshold (in keys the kernel sees: a sliding cache's
    # window offset 5 and sink 4 take one off a sequence's length)
    least = splits * split_min_keys(h_kv, h_qo) + (1 if sliding else 0)
    plain = _build(
        decode_attention_cpu(h_kv, h_qo, d, dtype, sliding, PS, window, AttentionKnobs(8, 16, 1, 0))
    )
    split = _build(
        decode_attention_cpu(h_kv, h_qo, d, dtype, sliding, PS, window, AttentionKnobs(8, 16, 1, splits))
    )
    scalars = [0, 1.0, 1e4, 1 / np.sqrt(d)]

    def run(f, q, pages, indptr, values, info):
        b, dev = q.shape[0], tvm.cpu()
        inputs = [q, pages.astype(dtype), indptr, values, info, np.zeros(b, "int32"), np.zeros(b, "int32")]
        o = tvm.runtime.tensor(np.zeros((b, h_qo, d), dtype), dev)
        lse = tvm.runtime.tensor(np.zeros((b, h_qo), "float32"), dev)
        f(*[tvm.runtime.tensor(x, dev) for x in inputs], o, lse, *scalars)
        return o.numpy().astype("float32"), lse.numpy()

    for lens, splits_here in (
        ([long], [True]),
        ([long + 300], [True]),
        ([least], [True]),
        ([least - 1], [False]),
        ([long, 20, least - 1, least + 5], [True, False, False, True]),  # each sequence decides alone
    ):
        b = len(lens)
        pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, sliding)
        q = rng.standard_normal((b, h_qo, d)).astype(dtype)
        outs = [run(f, q, pages, indptr, values, info) for f in (plain, split)]
        np.testing.assert_allclose(outs[1][0], outs[0][0], atol=tol, rtol=0)
        np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-4, rtol=0)
        for i in range(b):
            same = np.array_equal(outs[1][0][i], outs[0][0][i]) and np.array_equal(
                outs[1][1][i], outs[0][1][i]
            )
            assert same != splits_here[i], (lens, i)
            # alone, a sequence gets the same numbers bit for bit as in the batch
            one = values[indptr[i] : indptr[i + 1]]
            info_i = info[..., i : i + 1] if info.ndim == 2 else info[i : i + 1]
            alone = run(split, q[i : i + 1], pages, np.array([0, len(one)], "int32"), one, info_i)
            np.testing.assert_array_equal(alone[0][0], outs[1][0][i])
            np.testing.assert_array_equal(alone[1][0], outs[1][1][i])
        assert np.abs(outs[0][0]).max() > 0.01
    if not sliding and not window and dtype == "float32":  # and by numpy, the split case
        lens = [long]
        pages, indptr, values, info = _paged_cache(rng, lens, h_kv, d, False)
        q = rng.standard_normal((1, h_qo, d)).astype("float32")
        inputs = [q, pages, indptr, values, info, np.zeros(1, "int32"), np.zeros(1, "int32")]
        o, _ = _run(split, inputs, [(1, h_qo, d), (1, h_qo)], [0, 1.0, 1e4, 1 / np.sqrt(d)])
        keys = np.concatenate([pages[p, 0] for p in values[: indptr[1]]], axis=1)[:, :long]
        vals = np.concatenate([pages[p, 1] for p in values[: indptr[1]]], axis=1)[:, :long]
        np.testing.assert_allclose(o[0], _softmax_attention(q[0], keys, vals), atol=TOL, rtol=0)


def test_split_threshold_is_low_where_head_tasks_split_gqa_groups():
    """Key ranges run over all heads, so a GQA group's K / V rows are read once; a head task that holds less
    than a group reads them once per query head, and ranges win from short sequences on."""
    from toolkit.compile.cpu_attention import (
        SPLIT_MIN_KEYS,
        SPLIT_MIN_KEYS_GQA,
        heads_per_task,
        split_min_keys,
    )

    assert SPLIT_MIN_KEYS_GQA < SPLIT_MIN_KEYS
    # (KV heads, query heads): SmolLM2, Phi-3-mini, Phi-4-mini, Phi-3-medium
    for h_kv, h_qo, gqa_split in ((3, 9, True), (32, 32, False), (8, 24, False), (10, 40, False)):
        assert (heads_per_task(h_qo) < h_qo // h_kv) == gqa_split
        assert split_min_keys(h_kv, h_qo) == (SPLIT_MIN_KEYS_GQA if gqa_split else SPLIT_MIN_KEYS)


def test_split_key_decode_is_emitted_only_with_splits():
    """The split branch (its merge buffers) is in the kernel only when the knob asks for it."""
    from toolkit.compile.cpu_attention import AttentionKnobs

    with_splits = decode_attention_cpu(
        4, 8, 96, "float32", False, PS, 0, AttentionKnobs(8, 16, 1, 2)
    ).script()
    without = decode_attention_cpu(4, 8, 96, "float32", False, PS, 0, AttentionKnobs(8, 16, 1, 0)).script()
    assert with_splits.count("T.parallel") == 2 and without.count("T.parallel") == 1
