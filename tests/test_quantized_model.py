"""The compiled model runs quantized: one fused kernel per Linear reads the packed weights, and its logits
equal transformers' on the *dequantized* weights (so this measures the compiler, not the quantization)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_util import build_engine, greedy_vs_transformers, rel_err
from tiny import load_hf_model, make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.compile.compile_model import graph_options
from toolkit.compile.cpu_isa import q4_gemm_isa, q8_dot_isa, q8_gemm_isa
from toolkit.compile.fuse_dequant import fused_dequant_kernels, unfused_dequant_kernels
from toolkit.compile.pipeline import export_model, lower_to_tir
from toolkit.quantization import MLC_Q4_LAYOUT, QUANTIZATIONS, GroupLayout, get_scheme
from toolkit.quantization.group_quant import dequantize, unpack
from toolkit.targets import load_preset


def _hf_with_engine_weights(ckpt, eng, layout: GroupLayout = MLC_Q4_LAYOUT):
    """transformers on exactly the weights the engine runs: q_weight/q_scale pairs dequantized in numpy, norm
    weights as stored."""
    hf = load_hf_model(ckpt)
    arrays = {p["name"]: t.numpy() for p, t in zip(eng.compiled.manifest["params"], eng.params)}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            base = name[: -len(".weight")]
            if p.ndim == 2 and base + ".q_weight" in arrays:
                # scales widened first: (code - 7) * fp16 scale is exact in fp32, not always in fp16
                qs = arrays[base + ".q_scale"].astype(np.float32)
                w = dequantize(arrays[base + ".q_weight"], qs, p.shape[1], layout)
                assert np.abs(w - p.numpy()).max() > 0  # really quantized
                p.copy_(torch.from_numpy(w.astype(np.float32)))
            elif name in arrays:  # norm weights, stored in the scheme's dtype (fp16 for q4f16_1)
                p.copy_(torch.from_numpy(arrays[name].astype(np.float32)))
        if hf.config.tie_word_embeddings:
            assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


# q4f16_1 by default; q4f32_1 (fp32 scales: also covered by the groups-of-64 test below) with --runslow
@pytest.mark.parametrize("scheme", [pytest.param("q4f32_1", marks=pytest.mark.slow), "q4f16_1"])
def test_q4_logits_match_transformers_on_dequantized_weights(tmp_path, scheme):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "phi4-mini")  # tied, GQA, partial rotary, longrope
    eng = build_engine(ckpt, tmp_path / "lib", scheme)
    hf = _hf_with_engine_weights(ckpt, eng)
    prompt = np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 10).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 8)
    ours = np.concatenate([pre, dec])
    # host activations are fp32 and fp16 scales are exact in fp32: only summation order differs (~1e-6)
    assert rel_err(ours, ref) < 1e-4


def test_every_linear_is_one_fused_dequant_kernel(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "medium")
    cfg = open_model(ckpt).config
    preset = load_preset("host")
    mod, _ = export_model(cfg, graph_options("q4f16_1", preset), preset.target)
    lowered = lower_to_tir(mod, preset.target)
    fused = fused_dequant_kernels(lowered)
    assert unfused_dequant_kernels(lowered) == []  # no kernel materialises a dequantized weight
    # distinct fused kernels: qkv, o (+residual), gate_up, down (+residual), lm_head; decode and prefill each
    assert len(fused) >= 5, fused


def test_every_gather_clamps_its_indices(tmp_path):
    # TVM's "fast" take reads wherever an id points (and warns on every build): ours clamp into range
    import tvm
    from tvm import relax

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "medium")
    preset = load_preset("host")
    # q0f32: the plain embedding's gather and the logit positions' (a q4 embedding gathers in its own kernel)
    mod, _ = export_model(open_model(ckpt).config, graph_options("q0f32", preset), preset.target)
    modes = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.take":
            modes.append(str(expr.attrs.mode))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    assert modes and set(modes) == {"clip"}, modes


def test_a_quantized_embedding_gathers_clamped_rows():
    # the q4 table's own gather (take_dequantize) clamps like `take` mode "clip": an id past either end
    # reads the first or last row, never outside the table
    import tvm
    from tvm import te

    from toolkit.quantization.tvm_layers import te_take_dequantize

    rng = np.random.default_rng(0)
    q_weight = rng.integers(0, 2**32, (8, 4), dtype=np.uint32)  # 8 rows of one group of 32 codes
    q_scale = rng.uniform(0.5, 2, (8, 1)).astype(np.float16)
    qw, qs = te.placeholder((8, 4), "uint32", name="qw"), te.placeholder((8, 1), "float16", name="qs")
    ids = te.placeholder((4,), "int32", name="ids")
    out = te_take_dequantize(qw, qs, ids, 32, "float32")
    fn = tvm.compile(te.create_prim_func([qw, qs, ids, out]), target="llvm")
    got = tvm.runtime.tensor(np.zeros((4, 32), np.float32))
    want_rows = [0, 3, 7, 7]
    fn(*(tvm.runtime.tensor(a) for a in (q_weight, q_scale, np.array([-5, 3, 7, 100], np.int32))), got)
    # fp16 scales times small integers are exact in float32
    codes = unpack(q_weight).astype(np.float32) - MLC_Q4_LAYOUT.max_int
    np.testing.assert_array_equal(got.numpy(), (codes * q_scale.astype(np.float32))[want_rows])


@pytest.mark.parametrize(
    "device", ["host", pytest.param("host:x86-64-v3", marks=pytest.mark.slow, id="avx2-cpu-class")]
)
def test_q4_int8_activations_stay_close_to_transformers(tmp_path, device):
    """The `host` preset's decode GEMVs quantize activations to int8 (llama.cpp's scheme): logits move by
    the activation rounding, measured 2.3e-2..3.1e-2 of max|logit| on the tiny random variants (random
    weights make every layer's output as large as its input, the worst case), greedy choices unchanged.
    Prefill (GEMM) rounds them too on CPUs with VNNI; elsewhere it keeps fp32 activations and its rows
    move only by the preset's fp16 KV cache (< 1e-2, test_fp16_kv_cache_stays_close_to_transformers).
    `host:x86-64-v3`: the library of an AVX2 CPU class (Zen 3, Haswell), built and run on this one."""
    import platform

    from test_cpu_q8_gemv import HOST_HAS_AVX2

    if not HOST_HAS_AVX2:
        pytest.skip("this CPU has no AVX2: the host preset keeps fp32 activations")
    if ":" in device and platform.machine() != "x86_64":
        pytest.skip("an x86-64 CPU class")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "phi4-mini")
    eng = build_engine(ckpt, tmp_path / "lib", "q4f16_1", device=device)
    assert eng.compiled.manifest["preset"] == device
    # the manifest records the host matmuls' instruction-set paths, chosen from the target CPU's features
    host = load_preset(device).target
    gemm = f"int8-{q8_gemm_isa(host)}" if q8_gemm_isa(host) else f"fp32-{q4_gemm_isa(host)}"
    assert eng.compiled.manifest["cpu_isa"] == {"q4_gemv": f"int8-{q8_dot_isa(host)}", "q4_gemm": gemm}
    hf = _hf_with_engine_weights(ckpt, eng)
    prompt = np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 10).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 8)
    assert eng.compiled.manifest["kv_cache_dtype"] == "float16"
    if gemm.startswith("int8"):  # prefill rounds activations too (VNNI GEMM)
        assert 1e-4 < rel_err(pre, ref[: len(prompt)]) < 6e-2
    else:  # fp32 activations: the fp16 cache's rounding only
        assert rel_err(pre, ref[: len(prompt)]) < 1e-2
    assert 1e-4 < rel_err(dec, ref[len(prompt) :]) < 6e-2
    assert (dec.argmax(-1) == ref[len(prompt) :].argmax(-1)).all()


def test_fp16_kv_cache_stays_close_to_transformers(tmp_path):
    """The fp16 KV cache (`--kv-cache float16`) alone: `host-exact` (fp32 activations, weights) with only the
    cache in fp16. q/k/v are rounded to fp16 (2^-11 relative) and attention accumulates in fp32, so logits
    move by a few rounding steps through 2 random layers: measured 0.8e-3..2.3e-3 of max|logit| on the
    mini-4k / medium / mini-128k variants. Bounds: < 1e-2, and > 1e-5 (an fp32 cache stays near 1e-6), so
    the cache really is fp16. The prompt (40) is longer than mini-4k's window (16): the windowed kernels run
    on fp16 pages too."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k")
    preset = load_preset("host-exact").with_kv_cache("float16")
    eng = build_engine(ckpt, tmp_path / "lib", "q0f32", device=preset)
    assert eng.compiled.manifest["kv_cache_dtype"] == "float16"
    hf = load_hf_model(ckpt)
    prompt = np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 40).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 8)
    assert 1e-5 < rel_err(pre, ref[: len(prompt)]) < 1e-2
    assert 1e-5 < rel_err(dec, ref[len(prompt) :]) < 1e-2
    assert (dec.argmax(-1) == ref[len(prompt) :].argmax(-1)).all()


def _q4_nt_matmul(layout: GroupLayout, n: int = 64, k: int = 256):
    """A standalone dequant + NT matmul PrimFunc of `layout`, as the model's q4 Linear writes it."""
    from tvm import te

    from toolkit.quantization.tvm_layers import te_dequantize

    qw_shape, qs_shape = layout.quantized_shapes((n, k))
    qw = te.placeholder(qw_shape, layout.storage, name="q_weight")
    qs = te.placeholder(qs_shape, "float32", name="q_scale")
    x = te.placeholder((1, 1, k), "float32", name="x")
    w = te_dequantize(qw, qs, k, "float32", layout)
    r = te.reduce_axis((0, k), "k")
    y = te.compute((1, 1, n), lambda b, s, i: te.sum(x[b, s, r] * w[i, r], axis=r), name="NT_matmul")
    return te.create_prim_func([x, qw, qs, y])


def test_host_q4_matcher_declines_other_layouts():
    """The host's hand-written q4 kernels are built for 4-bit codes, 8 per uint32, groups of 32, with the
    zero point of the layout (MLC's q4: 7; GGUF's Q4_0: 8); any other layout (here groups of 64, or Q4_1's
    per-group min) must not match them, so a generic schedule takes it instead of a kernel misreading it."""
    from toolkit.compile.cpu_schedule import HOST_Q4_LAYOUTS, _match_q4_matmul
    from toolkit.quantization import GGUF_BLOCK_LAYOUTS

    assert HOST_Q4_LAYOUTS == (MLC_Q4_LAYOUT, GGUF_BLOCK_LAYOUTS["q4_0"])
    for lay in HOST_Q4_LAYOUTS:
        q = _match_q4_matmul(_q4_nt_matmul(lay))
        assert q is not None and (q.n, q.k, q.layout) == (64, 256, lay)
    g64 = GroupLayout(bits=4, group_size=64, storage="uint32")
    assert _match_q4_matmul(_q4_nt_matmul(g64)) is None
    zp5 = GroupLayout(bits=4, group_size=32, storage="uint32", zero_point=5)  # no kernel subtracts 5
    assert _match_q4_matmul(_q4_nt_matmul(zp5)) is None
    # the matcher reads the layout it is given: it does see a groups-of-64 dequantize as one
    assert _match_q4_matmul(_q4_nt_matmul(g64), (g64,)).layout == g64


def test_scheme_layout_is_derived_and_validated():
    s = dataclasses.replace(get_scheme("q4f16_1"), name="g64", group_size=64)
    assert (s.layout.group_size, s.elems_per_word, s.max_int, s.layout.words_per_group) == (64, 8, 7, 8)
    assert s.layout.quantized_shapes((10, 100)) == ((10, 16), (10, 2))
    assert s.bits_per_weight() == 4 + 16 / 64
    with pytest.raises(ValueError, match="not a multiple"):
        GroupLayout(bits=4, group_size=12, storage="uint32")
    with pytest.raises(ValueError, match="pack evenly"):
        GroupLayout(bits=3, group_size=30, storage="uint32")


# slow tier: no shipped scheme has groups of 64 (the fast tier keeps the layout's derivation and the g64
# kernels of test_quant_kernels); this compiles and runs a model of its own for ~8 s of a suite near 5 min
@pytest.mark.slow
def test_group_size_64_scheme_runs_end_to_end_on_the_host(tmp_path, monkeypatch):
    """A scheme with another layout (groups of 64) converts, compiles for the `host` preset and runs, with
    the logits of transformers on the same dequantized weights: the layout is read from the scheme by the
    quantizer, the TVM layers and the runtime, and the host's q4 kernels (groups of 32) decline it."""
    scheme = dataclasses.replace(get_scheme("q4f32_1"), name="q4f32_g64test", group_size=64)
    monkeypatch.setitem(QUANTIZATIONS, scheme.name, scheme)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "phi4-mini")  # tied embedding: quantized lm_head too
    # fp32 cache: the check is of the layout, to fp32 summation order
    eng = build_engine(
        ckpt, tmp_path / "lib", scheme.name, device=load_preset("host").with_kv_cache("float32")
    )
    arrays = {p["name"]: t.numpy() for p, t in zip(eng.compiled.manifest["params"], eng.params)}
    scales = {n: a.shape for n, a in arrays.items() if n.endswith(".q_scale")}
    weights = {n: a.shape for n, a in arrays.items() if n.endswith(".q_weight")}
    assert scales and len(scales) == len(weights)
    for name, (rows, groups) in scales.items():  # groups of 64 codes, 8 per word: 8 words per group
        assert weights[name.replace("q_scale", "q_weight")] == (rows, 8 * groups), name
    k_embed = eng.cfg.hidden_size
    assert scales["model.embed_tokens.q_scale"][1] == -(-k_embed // 64)
    hf = _hf_with_engine_weights(ckpt, eng, scheme.layout)
    prompt = np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 10).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 6)
    # the generic fp32 schedules run these matmuls: only summation order differs from transformers
    assert rel_err(np.concatenate([pre, dec]), ref) < 1e-4
