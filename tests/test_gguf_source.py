"""GGUF import: synthetic tiny files (llama and phi3 architectures) and the real SmolLM2-135M GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_checkpoint
from tiny_tokenizer import build_tiny_tokenizer

from toolkit.checkpoint import open_model
from toolkit.errors import UserError


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """From llama.cpp convert_hf_to_gguf.py (LlamaModel.permute): HF rotate-half rows -> adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_vocab(vocab_size: int) -> dict:
    """The tiny byte-level BPE tokenizer as GGUF `gpt2` vocabulary metadata."""
    tk = build_tiny_tokenizer(vocab_size)
    model = json.loads(tk.to_str())["model"]
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    special = {t.content for t in tk.get_added_tokens_decoder().values()}
    types = [3 if t in special else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "tk": tk}


# ---- synthetic llama GGUF ----------------------------------------------------------------------------------
LLAMA = dict(hidden=64, n_head=4, n_kv=2, inter=96, layers=2, theta=5000.0, eps=1e-6, ctx=128)


def write_llama_gguf(
    path: Path, *, tied: bool = True, seed: int = 0, arch: str = "llama", extra=None
) -> dict:
    """Write a tiny Llama GGUF the way llama.cpp's converter does; return the HF-layout source weights."""
    import gguf
    from gguf.quants import quantize

    c = LLAMA
    voc = gguf_vocab(300)
    rng = np.random.default_rng(seed)
    h, hd = c["hidden"], c["hidden"] // c["n_head"]

    def rnd(*shape):
        return rng.normal(0, 1 / np.sqrt(shape[-1]), shape).astype(np.float32)

    hf = {"embed": rnd(len(voc["tokens"]), h), "norm": rng.uniform(0.5, 1.5, h).astype(np.float32)}
    w = gguf.GGUFWriter(str(path), arch=arch)
    meta = {
        "add_block_count": c["layers"],
        "add_context_length": c["ctx"],
        "add_embedding_length": h,
        "add_feed_forward_length": c["inter"],
        "add_head_count": c["n_head"],
        "add_head_count_kv": c["n_kv"],
        "add_rope_freq_base": c["theta"],
        "add_layer_norm_rms_eps": c["eps"],
        "add_rope_dimension_count": hd,
        "add_tokenizer_model": "gpt2",
        "add_tokenizer_pre": "gpt-2",
        "add_token_list": voc["tokens"],
        "add_token_types": voc["types"],
        "add_token_merges": voc["merges"],
        "add_bos_token_id": voc["tokens"].index("<|endoftext|>"),
        "add_eos_token_id": voc["tokens"].index("<|end|>"),
        "add_add_bos_token": False,
        "add_chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n"
        "{% endfor %}",
    }
    meta.update(extra or {})  # a test's overrides replace (not duplicate) keys
    for key, val in meta.items():
        getattr(w, key)(val)
    # Q8_0 embedding (as in SmolLM2), F16 down_proj, F32 elsewhere: exercises the dequantization paths
    w.add_tensor(
        "token_embd.weight",
        quantize(hf["embed"], gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    hf["embed_deq"] = gguf.quants.dequantize(
        quantize(hf["embed"], gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    for i in range(c["layers"]):
        L = {
            "q": rnd(h, h),
            "k": rnd(c["n_kv"] * hd, h),
            "v": rnd(c["n_kv"] * hd, h),
            "o": rnd(h, h),
            "gate": rnd(c["inter"], h),
            "up": rnd(c["inter"], h),
            "down": rnd(h, c["inter"]),
            "n1": rng.uniform(0.5, 1.5, h).astype(np.float32),
            "n2": rng.uniform(0.5, 1.5, h).astype(np.float32),
        }
        hf[i] = L
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", L["n1"])
        w.add_tensor(b + "attn_q.weight", llama_cpp_permute(L["q"], c["n_head"]))
        w.add_tensor(b + "attn_k.weight", llama_cpp_permute(L["k"], c["n_kv"]))
        w.add_tensor(b + "attn_v.weight", L["v"])
        w.add_tensor(b + "attn_output.weight", L["o"])
        w.add_tensor(b + "ffn_norm.weight", L["n2"])
        w.add_tensor(b + "ffn_gate.weight", L["gate"])
        w.add_tensor(b + "ffn_up.weight", L["up"])
        w.add_tensor(b + "ffn_down.weight", L["down"].astype(np.float16))
    w.add_tensor("output_norm.weight", hf["norm"])
    if not tied:
        hf["lm_head"] = rnd(len(voc["tokens"]), h)
        w.add_tensor("output.weight", hf["lm_head"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf["vocab"] = voc
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_llama_gguf(tmp_path, tied: bool) -> None:
    hf = write_llama_gguf(tmp_path / "m.gguf", tied=tied)
    src = open_model(tmp_path / "m.gguf")
    c, cfg = LLAMA, src.config
    assert src.kind == "gguf" and cfg.source_arch == "llama"
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        96,
        2,
        len(hf["vocab"]["tokens"]),
    )
    assert (
        cfg.rope_theta == c["theta"] and cfg.rms_norm_eps == c["eps"] and cfg.max_position_embeddings == 128
    )
    assert cfg.tie_word_embeddings == tied and ("lm_head.weight" in src.tensor_names()) == (not tied)
    assert src.conv_template == "chatml-plain"  # ChatML without SmolLM2's default system prompt
    got = dict(src.iter_tensors())
    assert all(got[n].shape == src.tensor_shape(n) and got[n].dtype == np.float32 for n in got)
    # private arrays, not views of the read-only file mapping
    assert all(got[n].flags.writeable and got[n].flags.c_contiguous for n in got)
    for i in range(c["layers"]):
        L, p = hf[i], f"model.layers.{i}."
        # F32 in the file, so the un-permuted fusion must reproduce the HF weights exactly
        np.testing.assert_array_equal(
            got[p + "self_attn.qkv_proj.weight"], np.concatenate([L["q"], L["k"], L["v"]])
        )
        np.testing.assert_array_equal(
            got[p + "mlp.gate_up_proj.weight"], np.concatenate([L["gate"], L["up"]])
        )
        np.testing.assert_array_equal(
            got[p + "mlp.down_proj.weight"], L["down"].astype(np.float16).astype(np.float32)
        )
        np.testing.assert_array_equal(got[p + "self_attn.o_proj.weight"], L["o"])
        np.testing.assert_array_equal(got[p + "input_layernorm.weight"], L["n1"])
        np.testing.assert_array_equal(got[p + "post_attention_layernorm.weight"], L["n2"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], hf["embed_deq"])
    # Q8_0: 32-value blocks, q = round(x / d) with d = max|x|/127, stored as fp16 d'. Error <= d/2 (rounding)
    # + |q| * |d - d'| <= d/2 + 127 * d * 2^-11 (fp16 relative rounding)
    d = np.abs(hf["embed"]).reshape(-1, 32).max(1, keepdims=True) / 127
    err = np.abs(got["model.embed_tokens.weight"] - hf["embed"]).reshape(-1, 32)
    assert np.all(err <= d * (0.5 + 127 * 2.0**-11) + 1e-7)
    assert err.max() > 0.2 * d.max()  # and it really is quantized
    if not tied:
        np.testing.assert_array_equal(got["lm_head.weight"], hf["lm_head"])


def test_synthetic_gguf_tokenizer_matches_source_tokenizer(tmp_path) -> None:
    hf = write_llama_gguf(tmp_path / "m.gguf")
    tok = open_model(tmp_path / "m.gguf").tokenizer()
    ref = hf["vocab"]["tk"]
    for text in ["Hello, my name is Phi.", "naïve café 🙂 12345", "<|user|>\nhi<|end|>\n<|assistant|>\n"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert not tok.add_bos and tok.bos_token_id == tok.token_to_id("<|endoftext|>")
    assert {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")} <= tok.eos_token_ids


def test_unpermute_matches_transformers_gguf_loader(tmp_path) -> None:
    """transformers' GGUF import (LlamaTensorProcessor) un-permutes Q/K too: a second, independent oracle."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    write_llama_gguf(tmp_path / "m.gguf")
    from gguf import GGUFReader

    raw = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    qkv = open_model(tmp_path / "m.gguf").get_tensor("model.layers.1.self_attn.qkv_proj.weight")
    q = proc.process(raw["blk.1.attn_q.weight"], "blk.1.attn_q.weight").weights
    k = proc.process(raw["blk.1.attn_k.weight"], "blk.1.attn_k.weight").weights
    np.testing.assert_array_equal(qkv[:64], q)
    np.testing.assert_array_equal(qkv[64:96], k)


def test_bad_gguf_files(tmp_path) -> None:
    import gguf

    write_llama_gguf(tmp_path / "gpt.gguf", arch="gpt2")
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gpt2'"):
        open_model(tmp_path / "gpt.gguf")
    write_llama_gguf(tmp_path / "yarn.gguf", extra={"add_rope_scaling_type": gguf.RopeScalingType.YARN})
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        open_model(tmp_path / "yarn.gguf")
    # a head count that does not match the tensors is a shape error naming the file
    write_llama_gguf(tmp_path / "heads.gguf", extra={"add_feed_forward_length": 100})
    with pytest.raises(UserError, match="metadata implies") as e:
        open_model(tmp_path / "heads.gguf")
    assert e.value.path == str(tmp_path / "heads.gguf")
    data = (tmp_path / "heads.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable GGUF"):
        open_model(tmp_path / "cut.gguf")


# ---- synthetic phi3 GGUF (llama.cpp's phi3 architecture) ---------------------------------------------------
def write_phi3_gguf(hf_dir: Path, path: Path, qtype=None) -> None:
    """Convert a tiny HF Phi-3 checkpoint the way llama.cpp's Phi3MiniModel converter lays it out (F32; or,
    with `qtype(gguf name, array)` -> a GGMLQuantizationType or None, quantized by `gguf.quants.quantize`;
    or -> (GGMLQuantizationType, raw block rows) for blocks made elsewhere, e.g. K-quants gguf-py cannot
    quantize to)."""
    import gguf
    from gguf.quants import quantize

    from toolkit.checkpoint.safetensors_source import HFSource

    src = HFSource(hf_dir)
    c = src.config
    w = gguf.GGUFWriter(str(path), arch="phi3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    voc = gguf_vocab(c.vocab_size)
    # llama.cpp pads the vocabulary up to the model's vocab_size with unused [PADi] tokens
    pad = range(len(voc["tokens"]), c.vocab_size)
    voc["tokens"] += [f"[PAD{i}]" for i in pad]
    voc["types"] += [5] * len(pad)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    w.add_token_merges(voc["merges"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_ids[0])
    if c.longrope:
        w.add_rope_scaling_orig_ctx_len(c.longrope.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(c.longrope.attention_factor)
        w.add_tensor("rope_factors_long.weight", np.array(c.longrope.long_factor, np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(c.longrope.short_factor, np.float32))
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in src.iter_tensors():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            gname = f"blk.{i}.{per_layer[rest.removesuffix('.weight')]}.weight"
        else:
            gname = names[name]
        q = qtype(gname, t) if qtype is not None else None
        if q is None:
            w.add_tensor(gname, t)
        elif isinstance(q, tuple):
            w.add_tensor(gname, q[1], raw_dtype=q[0])
        else:
            w.add_tensor(gname, quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("variant", ["mini-4k", "phi4-mini"])
def test_synthetic_phi3_gguf_equals_hf(tmp_path, variant: str) -> None:
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", variant)
    write_phi3_gguf(hf_dir, tmp_path / "m.gguf")
    a, b = open_model(hf_dir), open_model(tmp_path / "m.gguf")
    assert b.config.source_arch == "phi3" and b.conv_template == "phi3"
    da, db = a.config.to_dict(), b.config.to_dict()
    lra, lrb = da.pop("longrope"), db.pop("longrope")
    for d in (da, db):
        d.pop("source_arch")
        d.pop("pad_token_id")  # GGUF carries it only when the tokenizer has one
    eos_a, eos_b = set(da.pop("eos_token_ids")), set(db.pop("eos_token_ids"))
    assert da == db
    # the GGUF's turn-end control tokens count as EOS as well
    tok = b.tokenizer()
    assert eos_b == eos_a | {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    assert (lra is None) == (lrb is None)
    if lra:  # stored as float32 in GGUF
        for key in ("short_factor", "long_factor"):
            np.testing.assert_allclose(lrb[key], lra[key], rtol=1e-7)
        assert lrb["original_max_position_embeddings"] == lra["original_max_position_embeddings"]
        assert lrb["attention_factor"] == pytest.approx(lra["attention_factor"], rel=1e-7)
    assert a.tensor_names() == b.tensor_names()
    for (na, ta), (nb, tb) in zip(a.iter_tensors(), b.iter_tensors(), strict=True):
        assert na == nb
        np.testing.assert_array_equal(ta, tb, err_msg=na)


# ---- the real SmolLM2-135M-Instruct GGUF -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return open_model(None)  # the embedded default model


def test_smollm2_config_and_shapes(smol) -> None:
    c = smol.config
    from toolkit.default_model import default_model_path

    assert smol.kind == "gguf" and smol.conv_template == "chatml" and smol.path == default_model_path()
    assert smol.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (9, 3, 64, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert c.tie_word_embeddings and c.longrope is None and c.sliding_window is None
    assert c.bos_token_id == 1 and set(c.eos_token_ids) == {0, 2}  # <|endoftext|>, <|im_end|>
    names = smol.tensor_names()
    assert len(names) == 2 + 30 * 6 and "lm_head.weight" not in names
    assert smol.tensor_shape("model.layers.0.self_attn.qkv_proj.weight") == (960, 576)
    assert smol.tensor_shape("model.layers.29.mlp.gate_up_proj.weight") == (3072, 576)
    assert smol.num_params() == 134_515_008
    types = smol.gguf_tensor_types()
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_1"


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_rotate_half(x, pos, theta):
    """HF Llama/Phi-3 RoPE: dims j and j + hd/2 form a pair."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rope_adjacent(x, pos, theta):
    """llama.cpp's normal RoPE (LLAMA_ROPE_TYPE_NORM): dims 2j and 2j+1 form a pair."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def _layer(x, W, cfg, rope):
    """One pre-norm Llama decoder layer in float64 (causal GQA attention, SwiGLU)."""
    T, nH, nKV, hd = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pos = np.arange(T, dtype=np.float64)
    h = _rms(x, W["n1"], cfg.rms_norm_eps)
    q = rope((h @ W["q"].T).reshape(T, nH, hd), pos, cfg.rope_theta)
    k = rope((h @ W["k"].T).reshape(T, nKV, hd), pos, cfg.rope_theta)
    v = (h @ W["v"].T).reshape(T, nKV, hd)
    k, v = np.repeat(k, nH // nKV, axis=1), np.repeat(v, nH // nKV, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum("hqk,khd->qhd", p, v).reshape(T, nH * hd) @ W["o"].T
    h = _rms(x, W["n2"], cfg.rms_norm_eps)
    g, u = h @ W["gate"].T, h @ W["up"].T
    return x + (g / (1 + np.exp(-g)) * u) @ W["down"].T


def test_smollm2_unpermuted_weights_with_rotate_half_equal_raw_weights_with_adjacent_rope(smol) -> None:
    """Two layers of the real model: llama.cpp's view (raw GGUF Q/K, adjacent-pair RoPE) vs ours."""
    from gguf.quants import dequantize

    cfg, tensors = smol.config, {t.name: t for t in smol._reader.tensors}
    nq, nk = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    tokens = [19556, 28, 957, 1462, 314, 5325]  # "Hello, my name is Alex"
    x_raw = x_ours = smol.get_tensor("model.embed_tokens.weight")[tokens].astype(np.float64)
    negative = None
    for i in range(2):

        def raw(n, i=i):
            t = tensors[f"blk.{i}.{n}.weight"]
            return dequantize(t.data, t.tensor_type).astype(np.float64)

        W_raw = {
            "q": raw("attn_q"),
            "k": raw("attn_k"),
            "v": raw("attn_v"),
            "o": raw("attn_output"),
            "gate": raw("ffn_gate"),
            "up": raw("ffn_up"),
            "down": raw("ffn_down"),
            "n1": raw("attn_norm"),
            "n2": raw("ffn_norm"),
        }
        p = f"model.layers.{i}."
        qkv = smol.get_tensor(p + "self_attn.qkv_proj.weight").astype(np.float64)
        gate_up = smol.get_tensor(p + "mlp.gate_up_proj.weight").astype(np.float64)
        W_ours = dict(
            W_raw,
            q=qkv[:nq],
            k=qkv[nq : nq + nk],
            v=qkv[nq + nk :],
            gate=gate_up[: cfg.intermediate_size],
            up=gate_up[cfg.intermediate_size :],
        )
        np.testing.assert_array_equal(W_ours["v"], W_raw["v"])
        np.testing.assert_array_equal(W_ours["up"], W_raw["up"])
        if negative is None:  # negative control: our weights with the wrong RoPE must differ clearly
            negative = _layer(x_ours, W_ours, cfg, _rope_adjacent)
        x_raw = _layer(x_raw, W_raw, cfg, _rope_adjacent)
        x_ours = _layer(x_ours, W_ours, cfg, _rope_rotate_half)
        if i == 0:
            first = x_ours
    # the same float64 arithmetic up to summation order inside each head: agreement to ~1e-12 relative
    scale = np.abs(x_raw).max()
    assert np.abs(x_ours - x_raw).max() / scale < 1e-9
    assert np.abs(negative - first).max() / np.abs(first).max() > 1e-3


def test_smollm2_tokenizer_matches_llama_cpp(smol) -> None:
    tok = smol.tokenizer()
    # ids llama.cpp produced for this prompt (shared/notes/gpu-apis-on-cpu.md §5); no BOS: add_bos_token=false
    assert tok.encode("Hello, my name is") == [19556, 28, 957, 1462, 314]
    assert not tok.add_bos and tok.bos_token_id == 1 and tok.eos_token_ids == {0, 2}
    assert tok.encode("<|im_start|>user\n")[:1] == [1]


def test_smollm2_tokenizer_matches_transformers_gguf_converter(smol) -> None:
    """transformers' own GGUF tokenizer import (byte-level BPE + smollm split) as an independent oracle."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    def meta(key):
        return smol.gguf_metadata(f"tokenizer.ggml.{key}")

    ref, _ = convert_gguf_tokenizer(
        "llama",
        {
            "tokenizer_type": "gpt2",
            "pre_tokenizer_type": meta("pre"),
            "tokens": meta("tokens"),
            "merges": meta("merges"),
            "token_type": meta("token_type"),
            "bos_token_id": meta("bos_token_id"),
            "eos_token_id": meta("eos_token_id"),
            "unk_token_id": meta("unknown_token_id"),
            "pad_token_id": meta("padding_token_id"),
        },
    )
    tok = smol.tokenizer()
    texts = [
        "The year 2024 had 366 days; π≈3.14159.",
        "  leading and  double  spaces\n\n\ttabs",
        "naïve café 日本語 🙂🚀 Ελληνικά",
        "<|im_start|>user\nHi<|im_end|>\n",
        "don't I'll we've x=1234567890+y",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_gguf_name_table_is_two_way():
    """Reader and exporter share one name table; every GGUF part maps back to its HF tensor and position."""
    from toolkit.checkpoint.gguf_names import ROPE_FACTOR_TENSORS, gguf_names, gguf_tensor_name, hf_name

    suffixes = [
        "input_layernorm.weight",
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight",
    ]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    names += [f"model.layers.{i}.{s}" for i in (0, 11) for s in suffixes]
    for arch in ("phi3", "llama"):
        seen = set()
        for name in names:
            parts = gguf_names(name, arch)
            for i, part in enumerate(parts):
                assert hf_name(part, arch) == (name, i)
            seen.update(parts)
        assert len(seen) == sum(len(gguf_names(n, arch)) for n in names)  # no GGUF name used twice
    assert gguf_names("model.layers.11.self_attn.qkv_proj.weight", "llama") == (
        "blk.11.attn_q.weight",
        "blk.11.attn_k.weight",
        "blk.11.attn_v.weight",
    )
    assert gguf_names("model.layers.2.mlp.gate_up_proj.weight", "llama") == (
        "blk.2.ffn_gate.weight",
        "blk.2.ffn_up.weight",
    )
    assert gguf_tensor_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    no_hf = [(ROPE_FACTOR_TENSORS[0], "phi3"), ("blk.0.attn_qkv.weight", "llama"), ("blk.0.x", "phi3")]
    for bad, arch in no_hf:
        with pytest.raises(KeyError):
            hf_name(bad, arch)
    with pytest.raises(KeyError):
        gguf_names("model.layers.0.mlp.nope.weight")


def _same_reader(a, b) -> None:
    """Two GGUFReaders hold the same fields (offsets, parts with dtypes and shapes, data indices, types)
    and tensors."""
    assert list(a.fields) == list(b.fields)
    for key, fa in a.fields.items():
        fb = b.fields[key]
        assert (fa.offset, fa.name, fa.data, fa.types) == (fb.offset, fb.name, fb.data, fb.types), key
        assert len(fa.parts) == len(fb.parts), key
        for x, y in zip(fa.parts, fb.parts):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key
        assert fa.contents() == fb.contents(), key
    assert a.data_offset == b.data_offset
    assert [(t.name, t.data_offset, t.n_bytes) for t in a.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in b.tensors
    ]


@pytest.mark.parametrize("endian", ["little", "big"])
def test_fast_field_walk_equals_gguf_py(tmp_path, endian) -> None:
    """`read_gguf` walks flat arrays in one loop: every field is what gguf-py's own reader builds, for
    each array element type, empty arrays, an array of arrays (gguf-py's walk) and a big-endian file
    (gguf-py's walk: the fast path is for little-endian files only)."""
    import gguf

    from toolkit.checkpoint.gguf_source import read_gguf

    order = gguf.GGUFEndian.LITTLE if endian == "little" else gguf.GGUFEndian.BIG
    p = tmp_path / "fields.gguf"
    w = gguf.GGUFWriter(str(p), "llama", endianess=order)
    w.add_array("t.strings", ["", "a", "naïve 日本語 🙂", "x" * 300])
    w.add_array("t.empty", [])
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_key_value("t.u8s", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_uint32("t.scalar", 7)
    w.add_string("t.string", "hello")
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_reader(read_gguf(p), gguf.GGUFReader(p))


def test_fast_field_walk_equals_gguf_py_on_the_embedded_model(smol) -> None:
    """The embedded SmolLM2 GGUF: a 49k-token vocabulary, its scores, token types and merges."""
    from gguf import GGUFReader

    from toolkit.checkpoint.gguf_source import read_gguf

    _same_reader(read_gguf(smol.path), GGUFReader(smol.path))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_fast_block_dequantization_equals_gguf_py_bit_for_bit(type_name: str) -> None:
    """Random block bytes (their fp16 scales include NaN and inf, the K-quants' 6-bit scales and mins and
    high bits take every value), rows as a GGUF tensor holds them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from toolkit.checkpoint.ggml_dequant import DEQUANT_INTO

    block_bytes, block_weights, into = DEQUANT_INTO[type_name]
    raw = np.random.default_rng(2).integers(0, 256, (130, 12 * block_bytes), dtype=np.uint8)
    out = np.empty((130, 12 * block_weights), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        into(raw, out)
        ref = dequantize(raw, GGMLQuantizationType[type_name]).reshape(out.shape)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert np.isfinite(ref).mean() > 0.9
    assert len(np.unique(ref[np.isfinite(ref)])) > 1000  # not a degenerate pattern


def test_the_embedded_models_q4_1_tensors_read_as_gguf_py_dequantizes_them(smol) -> None:
    from gguf.quants import dequantize

    t = smol._tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "Q4_1"
    got = smol._dequant(t)
    ref = dequantize(t.data, t.tensor_type).reshape(got.shape)
    np.testing.assert_array_equal(got, ref)
