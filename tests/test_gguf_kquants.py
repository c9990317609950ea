"""GGUF K-quants (Q4_K / Q5_K / Q6_K) as gguf schemes: the repack is lossless (the file's bytes back, byte for
byte) and its values are `gguf.quants.dequantize`'s, in numpy and in the TVM dequantize kernel; a tiny Phi-3
GGUF mixed like llama.cpp's Q4_K_M (Q4_K, Q5_K qkv, Q6_K lm_head and some down_proj) converts without
re-quantizing, and its logits on the host equal transformers' on the dequantized blocks.

gguf-py cannot quantize to K types, so the blocks are random bytes with sane fp16 d (and dmin): every byte
pattern of the codes and sub-block scales is a valid block."""

from __future__ import annotations

import numpy as np
import pytest
from cases import covering
from engine_util import assert_greedy_agrees_where_clear, build_engine, greedy_vs_transformers, rel_err
from test_gguf_schemes import _gguf_tensors, _hf_on_gguf_blocks
from test_gguf_source import write_phi3_gguf
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.checkpoint.gguf_names import gguf_names
from toolkit.errors import UserError
from toolkit.quantization import GGUF_BLOCK_LAYOUTS, get_scheme, native_quantization
from toolkit.quantization import gguf_blocks as gb

K_TYPES = ("q4_k", "q5_k", "q6_k")
# where each K block keeps its fp16 d (and dmin): ggml-common.h's block_q4_K / block_q5_K / block_q6_K
_D_AT = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
# the std of a value d*sc*q (- dmin*m) for uniformly random codes and scales, in units of d (dmin set to
# centre the values): used to give the random blocks a chosen weight scale
_SPREAD = {"q4_k": 255.0, "q5_k": 510.0, "q6_k": 1370.0}


def random_k_blocks(shape: tuple[int, int], block: str, rng, std: float | None = None) -> np.ndarray:
    """(N, K / 256 * block bytes) uint8 rows of random `block` super-blocks. With `std`, d (and dmin) are
    drawn so that the weights have about that spread and mean 0; else d is any finite fp16 (subnormals and
    negatives included), the hardest case for exact dequantization."""
    n, k = shape
    nbytes = gb._BLOCK_BYTES[block]
    nb = k // 256
    raw = rng.integers(0, 256, (n, nb, nbytes), dtype=np.uint8)
    d = None
    for at in _D_AT[block]:
        if std is not None:
            if d is None:
                d = std / _SPREAD[block] * rng.uniform(0.5, 1.5, (n, nb))
            else:  # dmin centres d*sc*q - dmin*m: E[sc*q] / E[m] = E[q] = 7.5 (4-bit), 15.5 (5-bit)
                d = d * (7.5 if block == "q4_k" else 15.5)
            raw[..., at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
        else:
            d = raw[..., at : at + 2].copy().view(np.float16)
            bad = ~np.isfinite(d)
            d[bad] = np.float16(0.5)
            raw[..., at : at + 2] = d.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * nbytes)


@pytest.mark.parametrize("block", K_TYPES)
def test_k_blocks_round_trip_and_equal_gguf_values(block):
    from gguf.quants import dequantize

    rng = np.random.default_rng(K_TYPES.index(block))
    raw = random_k_blocks((24, 3 * 256), block, rng)
    arrays = gb.from_blocks(raw, block)
    layout = GGUF_BLOCK_LAYOUTS[block]
    assert tuple(a.shape for a in arrays) == layout.param_shapes((24, 3 * 256))
    assert tuple(str(a.dtype) for a in arrays) == layout.param_dtypes()
    np.testing.assert_array_equal(gb.to_blocks(arrays, block), raw)  # byte for byte
    ref = dequantize(raw, gb.ggml_type(block)).reshape(24, -1)
    np.testing.assert_array_equal(gb.dequantize(arrays, block), ref)  # bit for bit, float32
    # stored size: the planes' bytes per weight
    stored_bits = sum(a.nbytes for a in arrays) * 8 / (24 * 3 * 256)
    assert stored_bits == layout.bits_per_weight() == get_scheme(f"gguf_{block}").bits_per_weight()


def test_k_bits_per_weight():
    # llama.cpp: Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625; ours keeps each 6-bit scale and min in a byte
    assert [get_scheme(f"gguf_{t}").bits_per_weight() for t in K_TYPES] == [4.625, 5.625, 6.5625]


@pytest.mark.parametrize("block", K_TYPES)
def test_tvm_dequantize_equals_gguf_bit_exactly(block):
    """The TE dequantize the K-quant Linear and Embedding use, compiled for the host in float32."""
    import tvm
    from gguf.quants import dequantize
    from tvm import te

    from toolkit.quantization.tvm_layers import te_dequantize_planes

    rng = np.random.default_rng(10 + K_TYPES.index(block))
    n, k = 16, 2 * 256
    raw = random_k_blocks((n, k), block, rng)
    arrays = gb.from_blocks(raw, block)
    layout = GGUF_BLOCK_LAYOUTS[block]
    planes = {s: te.placeholder(a.shape, str(a.dtype), name=s) for s, a in zip(layout.suffixes, arrays)}
    ids = te.placeholder((3,), "int32", name="ids")
    w = te_dequantize_planes(planes, k, "float32", layout)
    rows = te_dequantize_planes(planes, k, "float32", layout, ids=ids)
    f = tvm.compile(te.create_prim_func([*planes.values(), w]), target="llvm")
    g = tvm.compile(te.create_prim_func([*planes.values(), ids, rows]), target="llvm")
    args = [tvm.runtime.tensor(a) for a in arrays]
    out, out_rows = tvm.runtime.empty((n, k), "float32"), tvm.runtime.empty((3, k), "float32")
    take = np.array([5, 0, 15], np.int32)
    f(*args, out)
    g(*args, tvm.runtime.tensor(take), out_rows)
    ref = dequantize(raw, gb.ggml_type(block)).reshape(n, k)
    np.testing.assert_array_equal(out.numpy(), ref)
    np.testing.assert_array_equal(out_rows.numpy(), ref[take])


def test_k_mix_scheme_names():
    s = get_scheme("gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5")
    assert s.gguf_blocks == ("q4_k", "q4_k", "q6_k")
    types = {
        "model.layers.0.mlp.down_proj.weight": "q6_k",
        "model.layers.1.mlp.down_proj.weight": "q4_k",
        "model.layers.2.mlp.down_proj.weight": "q6_k",
        "model.layers.1.self_attn.qkv_proj.weight": "q5_k",
        "model.layers.1.self_attn.o_proj.weight": "q4_k",
        "model.layers.1.mlp.gate_up_proj.weight": "q4_k",
        "model.embed_tokens.weight": "q4_k",
        "lm_head.weight": "q6_k",
    }
    assert {n: s.weight_block_type(n) for n in types} == types
    assert s.max_layer() == 2
    assert (
        get_scheme("gguf_q4_k-down_q5_k_l4-down_q6_k_l3").weight_block_type(
            "model.layers.2.mlp.down_proj.weight"
        )
        == "q5_k"
    )
    bad = (
        "gguf_q4_k-down_q4_k",  # an exception in the default type
        "gguf_q4_k-down_q6_k_l05",  # leading zero: not canonical
        "gguf_q4_k-down_q6_k_l0",  # empty mask
        "gguf_q4_k-down_q6_k-down_q5_k_l1",  # "every layer" and another exception of the same kind
        "gguf_q4_k-down_q6_k_l3-down_q5_k_l1",  # two types for layer 0
        "gguf_q4_k-down_q6_k_l3-qkv_q5_k",  # not in canonical order
        "gguf_q4_k-mlp_q6_k",  # unknown kind
        "gguf_q4_k-down_q3_k",  # a type we lack
    )
    for name in bad:
        with pytest.raises(UserError, match="unknown quantization"):
            get_scheme(name)


def _k_mix(head: str | None = "q6_k"):
    """A Q4_K_M-like `write_phi3_gguf` callback: Q4_K Linears and embedding, Q5_K qkv, Q6_K down_proj in
    layers 0 and 2, lm_head in `head` (None: F32); random blocks of the tensor's own spread; norms F32."""
    import gguf

    rng = np.random.default_rng(5)

    def pick(gname: str, arr: np.ndarray):
        if arr.ndim != 2 or (gname == "output.weight" and head is None):
            return None
        if gname == "output.weight":
            t = head
        elif gname in ("blk.0.ffn_down.weight", "blk.2.ffn_down.weight"):
            t = "q6_k"
        elif gname.endswith("attn_qkv.weight"):
            t = "q5_k"
        else:
            t = "q4_k"
        raw = random_k_blocks(arr.shape, t, rng, std=float(arr.std()))
        return gguf.GGMLQuantizationType[t.upper()], raw

    return pick


def test_q4_k_m_mix_converts_without_requantizing_and_matches_transformers(tmp_path):
    from gguf.quants import dequantize

    from toolkit.convert.converter import convert

    # K-quant rows are whole 256-weight super-blocks: every K (hidden, intermediate, heads * head_dim) is 256
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", "mini-4k", hidden_size=256, num_hidden_layers=3)
    path = tmp_path / "m.gguf"
    write_phi3_gguf(hf_dir, path, _k_mix())
    src = open_model(path)
    scheme = native_quantization(src)
    assert scheme == "gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5"
    res = convert(src, scheme, tmp_path / "out", progress=False)
    assert res.clip == "none"
    out = open_model(tmp_path / "out")
    assert out.scheme.name == scheme
    params = out.load_params()
    gg = _gguf_tensors(path)
    seen = set()
    for hf_name in src.tensor_names():
        (gname,) = gguf_names(hf_name, "phi3")
        t = gg[gname]
        if t.tensor_type.name == "F32":
            continue
        bt = t.tensor_type.name.lower()
        assert out.scheme.weight_block_type(hf_name) == bt
        base = hf_name.removesuffix(".weight")
        arrays = tuple(params[f"{base}.{s}"] for s in GGUF_BLOCK_LAYOUTS[bt].suffixes)
        raw = np.asarray(t.data)
        np.testing.assert_array_equal(gb.to_blocks(arrays, bt), raw)  # the file's bytes, no re-quantization
        ref = dequantize(raw, t.tensor_type).reshape(src.tensor_shape(hf_name))
        np.testing.assert_array_equal(out.get_tensor(hf_name), ref)
        seen.add(bt)
    assert seen == set(K_TYPES)
    # the roofline's bytes per decoded token, tensor by tensor: every stored param but the embedding table
    from toolkit.bench.roofline import weight_bytes_per_token

    read = sum(a.nbytes for n, a in params.items() if not n.startswith("model.embed_tokens."))
    assert weight_bytes_per_token(src.config, scheme) == read

    eng = build_engine(path, tmp_path / "lib", scheme)
    names = {p["name"] for p in eng.compiled.manifest["params"]}
    assert {"model.layers.0.self_attn.qkv_proj.q_high", "model.layers.0.mlp.down_proj.q_high"} <= names
    assert (
        "model.layers.1.mlp.down_proj.q_high" not in names and "model.layers.1.mlp.down_proj.q_min" in names
    )
    hf = _hf_on_gguf_blocks(hf_dir, path)
    prompt = np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 10).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 6)
    # host-exact computes in fp32 and every K value has one rounding there, as in gguf's numpy: only the
    # summation order differs from transformers (~1e-6 relative), as for the Q4_0/Q4_1/Q8_0 schemes
    assert rel_err(np.concatenate([pre, dec]), ref) < 1e-4


def test_k_types_are_kept_not_made(tmp_path):
    """gguf-py has no K-quant quantizer: asking an F32 GGUF for a K scheme fails with one line, no output."""
    from toolkit.convert.converter import convert

    hf = make_tiny_checkpoint(tmp_path / "hf", "mini-4k", hidden_size=256)
    write_phi3_gguf(hf, tmp_path / "f32.gguf")
    with pytest.raises(UserError, match="q4_k blocks can only be kept from a GGUF that has them") as e:
        convert(open_model(tmp_path / "f32.gguf"), "gguf_q4_k", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# host in the fast tier; the GPU presets' lowering in the slow one (each is another full lowering)
@pytest.mark.parametrize(
    "preset",
    ["host", *(pytest.param(p, marks=pytest.mark.slow) for p in ("webgpu", "cuda-sm80"))],
)
def test_every_k_quant_linear_is_one_fused_kernel(tmp_path, preset):
    from toolkit.compile.compile_model import graph_options
    from toolkit.compile.fuse_dequant import fused_dequant_kernels, unfused_dequant_kernels
    from toolkit.compile.pipeline import lower_to_tir
    from toolkit.model.phi3 import export_phi3
    from toolkit.targets import load_preset

    cfg = open_model(
        make_tiny_checkpoint(
            tmp_path / "ckpt", "mini-4k", hidden_size=256, num_hidden_layers=3, tokenizer=False
        )
    ).config
    p = load_preset(preset)
    mod, _ = export_phi3(cfg, graph_options("gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5", p), p.target)
    lowered = lower_to_tir(mod, p.target)
    assert unfused_dequant_kernels(lowered) == []
    # qkv (Q5_K), o / gate_up (Q4_K), down (Q4_K and Q6_K), lm_head (Q6_K): one fused kernel per distinct
    # weight shape and layout, at least these 6
    assert len(fused_dequant_kernels(lowered)) >= 6


K_MIX = "gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5"


@pytest.mark.slow  # a dozen WGSL kernels on lavapipe; the fast tier checks the K dequant on the host
def test_k_quant_wgsl_kernels_equal_their_llvm_build(tmp_path):
    """Every dequantizing kernel of the K-mix model for the webgpu preset (fp16), scheduled as `phi3 compile`
    schedules it (dlight GEMV / Matmul with the dequantize inlined), run as WGSL on lavapipe, equals the
    llvm build of the same unscheduled PrimFunc within toolkit.verify's fp16 tolerance. (OpenCL on PoCL
    cannot run them: the fp16 scales need cl_khr_fp16, which PoCL lacks.)"""
    import gpu_apis
    import tvm

    from toolkit.targets import load_preset
    from toolkit.verify.verify import TOLERANCE, lowered_and_scheduled, verify_kernels

    gpu_apis.require("webgpu")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k", hidden_size=256, num_hidden_layers=3)
    unscheduled, scheduled = lowered_and_scheduled(open_model(ckpt).config, K_MIX, load_preset("webgpu"))

    def dequantizing(mod):
        return tvm.IRModule({gv: f for gv, f in mod.functions_items() if "dequantize" in gv.name_hint})

    checks = verify_kernels(dequantizing(unscheduled), dequantizing(scheduled), "webgpu")
    assert [c.to_dict() for c in checks if c.status != "ok"] == []
    # each check compared a finite output buffer (an all-inf output would name none)
    assert all(c.note.startswith("worst buffer ") and not c.note.startswith("worst buffer ;") for c in checks)
    assert all(c.error <= TOLERANCE["float16"] for c in checks)
    fused = [c.func for c in checks if "NT_matmul" in c.func]
    # qkv (Q5_K), o and gate_up (Q4_K), down (Q4_K, Q6_K), lm_head (Q6_K), decode and prefill shapes
    assert len(fused) >= 10 and any(c.func == "take_dequantize" for c in checks)


def llama_cpp_q4_k_m(f32_gguf, out) -> None:
    """Quantize an F32 GGUF to Q4_K_M with llama.cpp itself (llama-cpp-python's bundled library): its own
    K-quant quantizer and its own choice of per-tensor types."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"


@pytest.mark.slow
def test_llama_cpp_q4_k_m_file_keeps_its_blocks_and_matches_llama_cpp(tmp_path):
    """A Q4_K_M file written by llama.cpp (its quantizer, its mix: Q6_K qkv and down_proj in the layers its
    use_more_bits rule picks, Q6_K output) converts without re-quantizing; our host-exact logits equal
    transformers' on the dequantized blocks, and llama.cpp's own run of the file within the rounding of its
    Q8_K activations."""
    pytest.importorskip("llama_cpp")
    from gguf.quants import dequantize

    from toolkit.bench.llama_cpp import LlamaCppModel
    from toolkit.convert.converter import convert

    hf_dir = make_tiny_checkpoint(
        tmp_path / "hf", "mini-4k", hidden_size=256, intermediate_size=512, num_hidden_layers=8
    )
    write_phi3_gguf(hf_dir, tmp_path / "f32.gguf")
    path = tmp_path / "q4_k_m.gguf"
    llama_cpp_q4_k_m(tmp_path / "f32.gguf", path)
    src = open_model(path)
    scheme = native_quantization(src)
    # llama.cpp 0.3.36's Q4_K_M of 8 layers: Q6_K in layers 0, 3, 6, 7 (mask 0xc9) for qkv and down_proj
    assert scheme == "gguf_q4_k-q4_k-q6_k-qkv_q6_k_lc9-down_q6_k_lc9"
    convert(src, scheme, tmp_path / "out", progress=False)
    out = open_model(tmp_path / "out")
    params = out.load_params()
    gg = _gguf_tensors(path)
    for hf_name in src.tensor_names():
        (gname,) = gguf_names(hf_name, "phi3")
        t = gg[gname]
        if t.tensor_type.name == "F32":
            continue
        bt = t.tensor_type.name.lower()
        base = hf_name.removesuffix(".weight")
        arrays = tuple(params[f"{base}.{s}"] for s in GGUF_BLOCK_LAYOUTS[bt].suffixes)
        np.testing.assert_array_equal(gb.to_blocks(arrays, bt), np.asarray(t.data))
        ref = dequantize(np.asarray(t.data), t.tensor_type).reshape(src.tensor_shape(hf_name))
        np.testing.assert_array_equal(gb.dequantize(arrays, bt), ref)

    eng = build_engine(path, tmp_path / "lib", scheme)
    hf = _hf_on_gguf_blocks(hf_dir, path)
    # 12 positions: under mini-4k's window of 16, which llama.cpp ignores (test_gguf_export)
    prompt = np.random.default_rng(1).integers(3, eng.cfg.vocab_size, 9).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 3)
    ours = np.concatenate([pre, dec])
    assert rel_err(ours, ref) < 1e-4
    tokens = prompt + [int(r.argmax()) for r in ours[len(prompt) - 1 : -1]]
    lc = LlamaCppModel(path, threads=1, n_ctx=64, n_batch=64)
    theirs = np.stack([lc.prefill(tokens[:1])] + [lc.decode(t) for t in tokens[1:]])
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs)]
    top3 = [int(b.argmax()) in np.argsort(a)[-3:] for a, b in zip(ours, theirs)]
    # llama.cpp quantizes the activations to Q8_K in its K-quant dot products, and the tiny model's sharp
    # attention amplifies that (test_gguf_export measures 0.9989 for Q4_0's Q8_0 activations): measured here
    # correlation >= 0.9944 at every position, llama.cpp's greedy token in our top 3 everywhere. A wrong
    # layout or scale gives correlations near 0.8 or below.
    assert min(corr) > 0.99, corr
    assert all(top3), top3


@pytest.mark.slow  # nvcc and the Metal parser over a dozen kernels
@pytest.mark.parametrize("preset_name", ["cuda-sm80", "iphone-a16"])
def test_k_quant_kernels_compile_for_cuda_and_metal(tmp_path, preset_name):
    """The K-mix model's dequantizing kernels, scheduled for a CUDA or Metal preset, go through nvcc
    (-cubin for the preset's arch) or the Metal source check of toolkit.verify: no GPU of either kind here,
    so this checks the generated code, not its numbers (the WGSL run above does that for the same TIR)."""
    import shutil

    import tvm

    from toolkit.targets import load_preset
    from toolkit.verify.verify import lowered_and_scheduled

    preset = load_preset(preset_name)
    if preset.kind == "cuda" and shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: CUDA kernels can only be compile-checked with nvcc")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k", hidden_size=256, num_hidden_layers=3)
    _, scheduled = lowered_and_scheduled(open_model(ckpt).config, K_MIX, preset)
    from toolkit.compile.kernel_info import with_global_symbols

    deq = tvm.IRModule({gv: f for gv, f in scheduled.functions_items() if "dequantize" in gv.name_hint})
    deq = with_global_symbols(deq)
    source = tvm.compile(deq, target=preset.target).mod.imports[0].inspect_source()
    if preset.kind == "cuda":
        from toolkit.verify.cuda_check import compile_kernels

        report = compile_kernels(source, preset)
        assert report.ok and len(report.compiled) >= 12, report
    else:
        from toolkit.verify.metal_check import check_msl

        result = check_msl(source)
        assert result.ok, result.diagnostics


def q4_k_matmul(n: int, k: int, rows, rng, block: str = "q4_k"):
    """(func, arrays, scales, offsets): a `block` (Q4_K, Q5_K or Q6_K) dequant + NT matmul PrimFunc as the
    model's Linear writes it (x [1, rows, k]; rows "s": a dynamic prefill length; "b": x [b, 1, k], decode's
    dynamic batch), random planes of weights with a spread of 0.05, and the per-sub-block scale d x sc and
    offset -dmin x m the kernels must derive (exact fp32): per 32 weights; Q6_K per 16, offsets None."""
    import tvm
    from tvm import te

    from toolkit.quantization.tvm_layers import te_dequantize_planes

    layout = GGUF_BLOCK_LAYOUTS[block]
    raw = random_k_blocks((n, k), block, rng, std=0.05)
    arrays = dict(zip(layout.suffixes, gb.from_blocks(raw, block), strict=True))
    planes = {s: te.placeholder(a.shape, str(a.dtype), name=s) for s, a in arrays.items()}
    lead = (
        (tvm.tirx.Var("b", "int64"), 1)
        if rows == "b"
        else (1, tvm.tirx.Var(rows, "int64") if rows == "s" else rows)
    )
    x_ph = te.placeholder((*lead, k), "float32", name="x")
    w = te_dequantize_planes(planes, k, "float32", layout)
    r = te.reduce_axis((0, k), "k")
    y = te.compute((*lead, n), lambda b, i, j: te.sum(x_ph[b, i, r] * w[j, r], axis=r), name="NT_matmul")
    func = te.create_prim_func([x_ph, *planes.values(), y]).with_attr("global_symbol", "main")
    sub = arrays["q_sub"].view(np.uint8).reshape(n, k // 256, 16).astype(np.float32)
    d = arrays["q_scale"].astype(np.float32)[..., None]
    if block == "q6_k":  # 16 signed scales per super-block, stored sc + 128
        return func, arrays, (d * (sub - 128)).reshape(n, k // 16), None
    dmin = arrays["q_min"].astype(np.float32)[..., None]
    return func, arrays, (d * sub[..., :8]).reshape(n, k // 32), (-(dmin * sub[..., 8:])).reshape(n, k // 32)


def k_quant_reference(x, arrays, block, qs_eff, qm_eff):
    """(y, bound, wrong): the int8-activation reference of a `q4_k_matmul` weight (test_cpu_q8_gemv), and
    the same without what K-quants add to the q4 kernels (Q4_K / Q5_K: the mins; Q6_K: the high bits), which
    a kernel must be far from."""
    from test_cpu_q8_gemv import _q8_reference, _q8_reference_with_min

    high = arrays.get("q_high")
    if block == "q6_k":
        ref, bound = _q8_reference(x, arrays["q_weight"], qs_eff, zero_point=32, high=high, high_bits=2)
        wrong, _ = _q8_reference(x, arrays["q_weight"], qs_eff, zero_point=32)
        return ref, bound, wrong
    ref, bound = _q8_reference_with_min(x, arrays["q_weight"], qs_eff, qm_eff, high=high)
    wrong, _ = _q8_reference(x, arrays["q_weight"], qs_eff, zero_point=0, high=high)
    return ref, bound, wrong


@pytest.mark.parametrize("kernel,block", covering(["gemv", "batched", "gemm"], K_TYPES))
def test_k_quants_take_the_host_int8_kernels(kernel, block):
    """GGUF's Q4_K, Q5_K and Q6_K in the host's int8 decode GEMV (every dot-product path this CPU has) and
    VNNI prefill GEMM: each sub-block's scale d x sc (and min -dmin x m), derived in the kernel from the
    super-block's fp16 d (dmin) and sub-block bytes, equal the int8 reference on those per-sub-block values
    (Q5_K / Q6_K: with the codes' high bits; bound as there); the fp32-activation kernels decline them.
    "batched": decode of 5 sequences (one register block of 4 rows of x and one row left over)."""
    import tvm
    from test_cpu_q8_gemv import HOST_HAS_AVX2
    from test_isa_paths import int8_builds

    from toolkit.compile import cpu_schedule as cs

    if not HOST_HAS_AVX2:
        pytest.skip("no int8 kernels on this CPU")
    rng = np.random.default_rng(3)
    n, k, m = 64, 512, {"gemv": 1, "batched": 5, "gemm": 9}[kernel]
    func, arrays, qs_eff, qm_eff = q4_k_matmul(
        n, k, {"gemv": 1, "batched": "b", "gemm": "s"}[kernel], rng, block
    )
    layout = GGUF_BLOCK_LAYOUTS[block]
    assert cs._match_q4_matmul(func) is None  # not for the fp32-activation kernels
    q = cs._match_q4_matmul(func, cs.INT8_LAYOUTS)
    assert q is not None and q.q_sub is not None and q.layout == layout
    assert (q.q_high is not None) == (block != "q4_k")
    x = rng.standard_normal((m, 1, k) if kernel == "batched" else (1, m, k)).astype(np.float32)
    ref, bound, wrong = k_quant_reference(x, arrays, block, qs_eff, qm_eff)
    builds = int8_builds(func, gemm=kernel == "gemm")
    for ex in builds:
        out = tvm.runtime.empty((*x.shape[:-1], n), "float32", tvm.cpu())
        ex["main"](*[tvm.runtime.tensor(a) for a in (x, *arrays.values())], out)
        got = out.numpy()
        assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()
        assert np.abs(got - wrong).max() > 100 * bound.max()


@pytest.mark.parametrize("block", K_TYPES)
def test_k_quant_batched_decode_equals_one_row_kernel_bit_for_bit(block):
    """Decode of 7 sequences (a register block of 4 rows of x and 3 left over) computes each row exactly as
    the one-row kernel does (super-block values and mins added in the same order), so a stream's greedy
    tokens don't depend on how many others run beside it."""
    import tvm
    from test_cpu_q8_gemv import HOST_HAS_AVX2, _build
    from test_isa_paths import HOST

    from toolkit.compile import cpu_schedule as cs

    if not HOST_HAS_AVX2:
        pytest.skip("no int8 kernels on this CPU")
    n, k, b = 32, 512, 7
    one, arrays, _, _ = q4_k_matmul(n, k, 1, np.random.default_rng(4), block)
    many, *_ = q4_k_matmul(n, k, "b", np.random.default_rng(4), block)
    one, many = (_build(f, HOST, [cs.CPUQ8DotGEMV()]) for f in (one, many))
    x = np.random.default_rng(5).standard_normal((b, 1, k)).astype(np.float32)

    def run(ex, xs):
        out = tvm.runtime.empty((xs.shape[0], 1, n), "float32", tvm.cpu())
        ex["main"](*[tvm.runtime.tensor(a) for a in (xs, *arrays.values())], out)
        return out.numpy()

    batched = run(many, x)
    for i in range(b):
        np.testing.assert_array_equal(batched[i], run(one, x[i : i + 1])[0])


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_q6_k_largest_codes_and_activations_do_not_overflow(kernel):
    """Q6_K's largest products: every code 63 against activations quantized to +-127 (x constant per group).
    AVX2's `vpmaddubsw` sums 4 such products in int16 (4 x 63 x 127 = 32004 < 2**15); the results must equal
    the exact reference there and in every other path."""
    import tvm
    from test_cpu_q8_gemv import HOST_HAS_AVX2
    from test_isa_paths import int8_builds

    if not HOST_HAS_AVX2:
        pytest.skip("no int8 kernels on this CPU")
    n, k, m = 32, 512, (2 if kernel == "gemv" else 5)
    func, arrays, _, _ = q4_k_matmul(n, k, "b" if kernel == "gemv" else "s", np.random.default_rng(0), "q6_k")
    raw = gb.to_blocks(tuple(arrays.values()), "q6_k").reshape(n, k // 256, 210)
    raw[..., :192] = 0xFF  # every code 63 (4 low bits and 2 high bits set)
    negative = np.arange(16) % 4 == 3
    raw[..., 192:208] = np.where(negative, 0x81, 0x7F).astype(np.uint8)  # scales +127, every 4th -127
    raw[..., 208:210] = np.frombuffer(np.float16(2.0**-10).tobytes(), np.uint8)
    arrays = dict(zip(arrays, gb.from_blocks(raw.reshape(n, -1), "q6_k"), strict=True))
    qs_eff = (2.0**-10 * np.tile(np.where(negative, -127.0, 127.0), k // 256))[None].repeat(n, 0)
    sign = np.where(np.arange(m) % 2, -1.0, 1.0)[:, None, None]
    x = (sign * np.ones((1, k))).astype(np.float32).reshape((m, 1, k) if kernel == "gemv" else (1, m, k))
    ref, bound, _ = k_quant_reference(x, arrays, "q6_k", qs_eff, None)
    assert np.abs(ref).min() > 0  # the test has teeth: (63 - 32) x 127 per weight, scales of either sign
    builds = int8_builds(func, gemm=kernel == "gemm")
    for ex in builds:
        out = tvm.runtime.empty(x.shape[:-1] + (n,), "float32", tvm.cpu())
        ex["main"](*[tvm.runtime.tensor(a) for a in (x, *arrays.values())], out)
        assert np.all(np.abs(out.numpy() - ref) <= bound), np.abs(out.numpy() - ref).max()


@pytest.mark.slow  # a whole-model build; the fast tier: the kernels above
def test_host_preset_runs_k_quant_linears_in_int8_kernels(tmp_path):
    """A Q4_K_M-like GGUF (`_k_mix`: Q4_K Linears, Q5_K qkv, Q6_K down_proj in two layers and lm_head) on
    the `host` preset: every Linear is an int8 hand kernel, logits within the int8-activation rounding of
    transformers on the same blocks (2e-2..3e-2 on tiny random models,
    test_q4_int8_activations_stay_close_to_transformers), greedy choices equal where transformers' top two
    are further apart than that row's error."""
    from test_cpu_q8_gemv import HOST_HAS_AVX2
    from test_gguf_schemes import host_int8_linears

    from toolkit.compile.cpu_schedule import INT8_LAYOUTS, _match_q4_matmul

    if not HOST_HAS_AVX2:
        pytest.skip("this CPU has no AVX2: the host preset keeps fp32 activations")

    def code_bits(f) -> int:
        q = _match_q4_matmul(f, INT8_LAYOUTS)
        return 0 if q is None else q.layout.bits

    pick = _k_mix()
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", "mini-4k", hidden_size=256)
    path = tmp_path / "m.gguf"
    write_phi3_gguf(hf_dir, path, pick)
    scheme = native_quantization(open_model(path), model_dtype="float16")
    assert scheme.startswith("gguf_q4_k"), scheme
    linears, taken = host_int8_linears(path, scheme)
    assert taken == set(linears), sorted(set(linears) - taken)
    # qkv (Q5_K), down (Q4_K and Q6_K), lm_head (Q6_K) among them, decode and prefill
    assert {code_bits(f) for f in linears.values()} == {4, 5, 6}
    eng = build_engine(path, tmp_path / "lib", scheme, device="host")
    hf = _hf_on_gguf_blocks(hf_dir, path, "float16")
    prompt = np.random.default_rng(1).integers(3, eng.cfg.vocab_size, 10).tolist()
    pre, dec, ref = greedy_vs_transformers(eng, hf, prompt, 6)
    ours = np.concatenate([pre, dec])
    assert rel_err(ours, ref) < 6e-2
    assert_greedy_agrees_where_clear(ours, ref)


def test_a_scheme_whose_blocks_do_not_tile_a_row_is_refused_before_converting(tmp_path):
    """GGUF blocks have no padding: a K-quant (256-weight super-blocks) cannot store SmolLM2's 576-wide rows.
    `phi3 convert -q gguf_q4_k` on it is one line naming the scheme and the first such weight, before any
    tensor is read, and no output; it used to end in gguf-py's QuantError traceback mid-conversion. Phi-3's
    widths (3072, 8192) take every block type."""
    import dataclasses

    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.config import phi3_mini_4k

    smollm = open_model(None).config
    assert smollm.hidden_size % 256 and smollm.hidden_size % 32 == 0
    with pytest.raises(UserError, match=r"gguf_q4_k: model.embed_tokens.weight has rows of 576 weights"):
        get_scheme("gguf_q4_k").check_widths(smollm)
    with pytest.raises(UserError, match=r"gguf_q4_0-q8_0-q6_k: lm_head.weight has rows of 576"):
        get_scheme("gguf_q4_0-q8_0-q6_k").check_widths(dataclasses.replace(smollm, tie_word_embeddings=False))
    for fits in ("q4f16_1", "gguf_q4_0", "gguf_q4_1-q8_0"):
        get_scheme(fits).check_widths(smollm)
    mini = phi3_mini_4k()
    for name in ("gguf_q4_k", "gguf_q6_k", "gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5"):
        get_scheme(name).check_widths(mini)

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", "-q", "gguf_q4_k", "-o", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "gguf_q4_k" in lines[0] and "576" in lines[0], lines
    assert not out.exists() and not list(tmp_path.iterdir())
