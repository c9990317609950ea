"""phi3 convert: tiny checkpoint -> MLC-format folder -> load back; format, checksums, interrupted runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_quantization import reference_quantize
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.checkpoint.mlc_format import tensor_cache as tc
from toolkit.convert import converter as conv
from toolkit.errors import UserError
from toolkit.quantization import get_scheme
from toolkit.quantization import group_quant as gq

SHARD_CAP = 64 * 1024  # small, so a tiny model spans several shards and has out-of-band tensors


def _write_tokenizer(path: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini", "mini-4k", dtype="bfloat16")
    _write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "mini-q4f16_1"
    conv.convert(open_model(ckpt), "q4f16_1", out, clip="rtn", progress=False, shard_cap=SHARD_CAP)
    return out


def test_q4f16_1_weights_match_reference(ckpt, converted) -> None:
    src = open_model(ckpt)
    mlc = open_model(converted)
    assert mlc.kind == "mlc" and mlc.scheme.name == "q4f16_1"
    assert mlc.config == src.config
    params = mlc.load_params()
    for name, w in src.iter_tensors():
        if w.ndim == 2:
            qw, qs = params[name.replace(".weight", ".q_weight")], params[name.replace(".weight", ".q_scale")]
            ref_w, ref_s = reference_quantize(
                w, np.float16
            )  # independent formula (tests/test_quantization.py)
            np.testing.assert_array_equal(qw, ref_w)
            np.testing.assert_array_equal(qs, ref_s)
            assert name not in params
        else:
            assert params[name].dtype == np.float16  # norms stay float, in the model dtype
            np.testing.assert_array_equal(params[name], w.astype(np.float16))
    # the ModelSource view dequantizes: HF names, float32, (code - 7) * scale
    for name, w in mlc.iter_tensors(["model.layers.1.mlp.down_proj.weight"]):
        qw, qs = params[name.replace(".weight", ".q_weight")], params[name.replace(".weight", ".q_scale")]
        np.testing.assert_array_equal(w, gq.dequantize(qw, qs).astype(np.float32))


@pytest.mark.parametrize("scheme", ["q0f32", "q0f16", "q4f32_1"])
def test_other_schemes(ckpt, tmp_path, scheme) -> None:
    out = tmp_path / scheme
    clip = "rtn" if scheme == "q4f32_1" else "auto"  # q0 schemes have no scales to clip
    res = conv.convert(open_model(ckpt), scheme, out, clip=clip, progress=False, shard_cap=SHARD_CAP)
    src = open_model(ckpt)
    params = open_model(out).load_params()
    w = src.get_tensor("model.layers.0.self_attn.qkv_proj.weight")
    if scheme == "q4f32_1":
        qw, qs = gq.quantize(w, scheme)
        np.testing.assert_array_equal(params["model.layers.0.self_attn.qkv_proj.q_weight"], qw)
        assert params["model.layers.0.self_attn.qkv_proj.q_scale"].dtype == np.float32
        assert abs(res.bits_per_param - (4 + 32 / 32)) < 0.05  # 5 bits/weight, norms are negligible
    else:
        dtype = np.float16 if scheme == "q0f16" else np.float32
        np.testing.assert_array_equal(params["model.layers.0.self_attn.qkv_proj.weight"], w.astype(dtype))
        assert res.bits_per_param == pytest.approx(16.0 if scheme == "q0f16" else 32.0)


def test_clip_search_output_is_same_format_and_better(ckpt, converted, tmp_path) -> None:
    out = tmp_path / "search"
    conv.convert(open_model(ckpt), "q4f16_1", out, clip="search", progress=False, shard_cap=SHARD_CAP)
    rtn, srch = open_model(converted).load_params(), open_model(out).load_params()
    assert {k: (v.shape, v.dtype) for k, v in rtn.items()} == {k: (v.shape, v.dtype) for k, v in srch.items()}
    src = open_model(ckpt)
    for name, w in src.iter_tensors(["model.layers.0.mlp.gate_up_proj.weight", "lm_head.weight"]):
        qn, sn = conv.quantized_param_names(name)
        e_rtn = gq.reconstruction_error(w, rtn[qn], rtn[sn])
        e_srch = gq.reconstruction_error(w, srch[qn], srch[sn])
        assert e_srch < e_rtn


def test_tensor_cache_json_schema(converted) -> None:
    content = json.loads((converted / "tensor-cache.json").read_text())
    assert set(content) == {"metadata", "records"}
    meta = content["metadata"]
    recs = [r for s in content["records"] for r in s["records"]]
    assert meta["ParamSize"] == len(recs)
    assert meta["ParamBytes"] == sum(r["nbytes"] for r in recs)
    assert 4.5 <= meta["BitsPerParam"] < 4.6  # 4 bits + fp16 scale per 32, plus the fp16 norms
    assert len(content["records"]) > 3
    for shard in content["records"]:
        assert set(shard) == {"dataPath", "format", "nbytes", "records", "md5sum"}
        assert shard["dataPath"].startswith("params_shard_") and shard["format"] == "raw-shard"
        data = (converted / shard["dataPath"]).read_bytes()
        assert len(data) == shard["nbytes"] and hashlib.md5(data).hexdigest() == shard["md5sum"]
        # a shard exceeds the cap only when it holds one out-of-band tensor of >= half the cap
        assert shard["nbytes"] < SHARD_CAP or len(shard["records"]) == 1
        offset = 0
        for r in shard["records"]:
            assert set(r) == {"name", "shape", "dtype", "format", "nbytes", "byteOffset"}
            assert r["format"] == "raw" and r["byteOffset"] == offset
            assert r["nbytes"] == int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize
            offset += r["nbytes"]
        assert offset == shard["nbytes"]
    assert {r["dtype"] for r in recs} == {"uint32", "float16"}
    names = {r["name"] for r in recs}
    assert (
        "model.embed_tokens.q_weight" in names and "lm_head.q_scale" in names and "model.norm.weight" in names
    )
    assert sorted(p.name for p in converted.iterdir() if p.suffix == ".bin") == sorted(
        s["dataPath"] for s in content["records"]
    )


def test_chat_config(converted) -> None:
    chat = json.loads((converted / "mlc-chat-config.json").read_text())
    for key in (
        "version",
        "model_type",
        "quantization",
        "model_config",
        "vocab_size",
        "context_window_size",
        "prefill_chunk_size",
        "sliding_window_size",
        "conv_template",
        "tokenizer_files",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "temperature",
        "top_p",
    ):
        assert key in chat, key
    assert chat["model_type"] == "phi3" and chat["quantization"] == "q4f16_1"
    assert chat["vocab_size"] == 512 and chat["sliding_window_size"] == -1
    assert chat["model_config"]["hidden_size"] == 128
    # the checkpoint's files, MLC's order; save_pretrained wrote generation_config.json
    assert chat["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    for f in chat["tokenizer_files"]:
        assert (converted / f).is_file()
    tok = open_model(converted).tokenizer()
    assert tok.encode("w5 w7", add_bos=False) == [5, 7]


def _corrupt_copy(converted: Path, tmp_path: Path) -> tuple[Path, dict]:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    return out, json.loads((out / "tensor-cache.json").read_text())


def test_corrupted_shard_byte_names_the_shard(converted, tmp_path) -> None:
    out, content = _corrupt_copy(converted, tmp_path)
    shard = content["records"][1]["dataPath"]
    data = bytearray((out / shard).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / shard).write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{shard} is corrupt \(md5"):
        open_model(out).load_params()
    with pytest.raises(UserError, match=shard):
        tc.verify_tensor_cache(out)


def test_truncated_and_missing_shard(converted, tmp_path) -> None:
    out, content = _corrupt_copy(converted, tmp_path)
    shard = content["records"][0]["dataPath"]
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[:-3])
    with pytest.raises(UserError, match=rf"{shard} has {len(data) - 3} bytes, expected {len(data)}"):
        open_model(out).load_params()
    (out / shard).unlink()
    with pytest.raises(UserError, match=f"missing weight shard {shard}"):
        open_model(out).load_params()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dir_is_discarded(ckpt, converted, tmp_path) -> None:
    out = tmp_path / "model"
    stale = tmp_path / f"model.tmp-{_dead_pid()}"
    stale.mkdir()
    # what an interrupted run leaves: a complete-looking cache whose shard is half written
    (stale / "params_shard_0.bin").write_bytes(b"\0" * 100)
    (stale / "tensor-cache.json").write_text((converted / "tensor-cache.json").read_text())
    conv.convert(open_model(ckpt), "q4f16_1", out, clip="rtn", progress=False, shard_cap=SHARD_CAP)
    assert not stale.exists()
    assert tc.verify_tensor_cache(out) > 3
    assert (out / "params_shard_0.bin").read_bytes() == (converted / "params_shard_0.bin").read_bytes()


def test_interrupted_run_leaves_no_output(ckpt, tmp_path, monkeypatch) -> None:
    out = tmp_path / "model"
    calls = {"n": 0}
    real_add = tc.TensorCacheWriter.add

    def flaky_add(self, name, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_add(self, name, array)

    monkeypatch.setattr(tc.TensorCacheWriter, "add", flaky_add)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(open_model(ckpt), "q4f16_1", out, clip="rtn", progress=False, shard_cap=SHARD_CAP)
    assert not out.exists()
    assert not list(tmp_path.glob("model.tmp-*"))


def test_refuses_to_overwrite_a_foreign_folder(ckpt, tmp_path) -> None:
    with pytest.raises(UserError, match="is the input|input checkpoint|not a converted model"):
        conv.convert(open_model(ckpt), "q4f16_1", ckpt, progress=False)
    assert (ckpt / "config.json").is_file()


def test_cli_convert(ckpt, tmp_path) -> None:
    from toolkit.cli import main

    out = tmp_path / "cli-out"
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(ckpt),
            "-q",
            "q4f16_1",
            "-o",
            str(out),
            "--clip",
            "rtn",
            "--no-progress",
            "--param-names",
            "mlc",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "q4f16_1 (clip rtn)" in r.output and (out / "tensor-cache.json").is_file()
    assert "transformer.h.0.mixer.qkv_proj.q_weight" in open_model(out).param_names()
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-q", "q3f16_9", "-o", str(tmp_path / "x")])
    # refused at parse time (a usage error, exit 2), before the checkpoint is opened
    assert r.exit_code == 2 and "unknown quantization 'q3f16_9'" in r.output


def test_numpy_reference_forward_matches_transformers(ckpt) -> None:
    """The calibration / reference-perplexity forward is a faithful Phi-3 (sliding window 16 crossed here)."""
    import torch
    from tiny import load_hf_model

    from toolkit.convert.calibration import perplexity

    src = open_model(ckpt)
    weights = dict(src.iter_tensors())
    ids = np.random.default_rng(1).integers(0, 512, 40).tolist()
    mine = perplexity(src.config, weights.__getitem__, ids, window=40)
    with torch.no_grad():
        loss = load_hf_model(ckpt)(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert mine["tokens"] == 39
    # both float32 on the same (bf16-exact) weights; summation order differs: 1e-5 relative on the ppl
    assert mine["ppl"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_weighted_clip_uses_activation_stats(ckpt, converted, tmp_path) -> None:
    from toolkit.convert.calibration import activation_stats, calibration_tokens

    src = open_model(ckpt)
    stats = activation_stats(src, calibration_tokens(src))
    scheme = get_scheme("q4f16_1")
    quantized = [n for n in src.tensor_names() if conv.should_quantize(n, src.tensor_shape(n), scheme)]
    assert set(stats) == set(quantized)
    assert all(stats[n].shape == (src.tensor_shape(n)[1],) and np.all(stats[n] > 0) for n in quantized)
    out = tmp_path / "weighted"
    res = conv.convert(src, "q4f16_1", out, clip="weighted", progress=False, shard_cap=SHARD_CAP)
    assert res.clip == "weighted"
    rtn, wtd = open_model(converted).load_params(), open_model(out).load_params()
    assert {k: (v.shape, v.dtype) for k, v in rtn.items()} == {k: (v.shape, v.dtype) for k, v in wtd.items()}
    assert json.loads((out / "mlc-chat-config.json").read_text())["toolkit"]["clip"] == "weighted"


@pytest.mark.parametrize("preset", ["mini-4k", "phi4-mini"])  # untied, tied embeddings
def test_weighted_stream_reads_each_tensor_once_with_a_forwards_stats(preset, tmp_path) -> None:
    from toolkit.convert.calibration import (
        calibration_tokens,
        layer_forward,
        rms_norm,
        rope_cos_sin,
        tensors_with_stats,
    )

    path = make_tiny_checkpoint(tmp_path / preset, preset, dtype="bfloat16")
    _write_tokenizer(path)
    src = open_model(path)
    cfg, ids = src.config, calibration_tokens(src)
    every = dict(src.iter_tensors())
    # the reference: every weight in memory at once, one forward, as the converter did before streaming
    cos, sin = rope_cos_sin(cfg, np.arange(len(ids)))
    h, want = every["model.embed_tokens.weight"][ids], {}
    for i in range(cfg.num_hidden_layers):
        h = layer_forward(h, every.__getitem__, i, cfg, cos, sin, want)
    x = rms_norm(h, every["model.norm.weight"], cfg.rms_norm_eps)
    want["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"] = np.mean(
        x.astype(np.float64) ** 2, axis=0
    )
    reads = []
    real_iter = type(src).iter_tensors

    def counting(self, names=None):
        for name, arr in real_iter(self, names):
            reads.append(name)
            yield name, arr

    type(src).iter_tensors = counting
    try:
        got = {name: (arr, act) for name, arr, act in tensors_with_stats(src, ids)}
    finally:
        type(src).iter_tensors = real_iter
    assert set(got) == set(every)
    # a tied embedding is read twice: its rows start the forward, and it is quantized last, as the head
    twice = ["model.embed_tokens.weight"] if cfg.tie_word_embeddings else []
    assert sorted(reads) == sorted([*every, *twice])
    for name, (arr, act) in got.items():
        np.testing.assert_array_equal(arr, every[name])
        if name in want:
            np.testing.assert_array_equal(act, want[name])
        elif name == "model.embed_tokens.weight":  # untied: a lookup, every channel alike
            np.testing.assert_array_equal(act, np.ones(cfg.hidden_size))
        else:
            assert act is None, name

    # statistics only (quant-report): the same numbers, and the head, which the forward never needs, unread
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    reads.clear()
    type(src).iter_tensors = counting
    try:
        stats_only = {name: (arr, act) for name, arr, act in tensors_with_stats(src, ids, head=False)}
    finally:
        type(src).iter_tensors = real_iter
    # a tied embedding is still read once, for the rows that start the forward
    assert sorted(reads) == sorted(every if cfg.tie_word_embeddings else set(every) - {head})
    assert stats_only[head][0] is None and set(stats_only) == set(got)
    for name, (_, act) in stats_only.items():
        if got[name][1] is None:
            assert act is None, name
        else:
            np.testing.assert_array_equal(act, got[name][1])


def test_mlc_param_names(ckpt, converted, tmp_path) -> None:
    out = tmp_path / "mlc-names"
    conv.convert(
        open_model(ckpt), "q4f16_1", out, clip="rtn", progress=False, shard_cap=SHARD_CAP, param_names="mlc"
    )
    hf, mlc = open_model(converted).load_params(), open_model(out).load_params()
    assert "transformer.h.1.mixer.out_proj.q_weight" in mlc and "transformer.embd.q_scale" in mlc
    assert "transformer.h.0.ln.weight" in mlc and "lm_head.q_weight" in mlc
    assert sorted(mlc) == sorted(conv.to_mlc_name(n) for n in hf)
    for name, arr in hf.items():
        np.testing.assert_array_equal(mlc[conv.to_mlc_name(name)], arr)
    # the ModelSource view still speaks HF names
    name = "model.layers.0.self_attn.o_proj.weight"
    np.testing.assert_array_equal(open_model(out).get_tensor(name), open_model(converted).get_tensor(name))


def test_nan_weights_are_refused(ckpt, tmp_path) -> None:
    src = open_model(ckpt)
    real = src.iter_tensors

    def poisoned(names=None):
        for name, arr in real(names):
            if name.endswith("0.self_attn.o_proj.weight"):
                arr = arr.copy()
                arr[0, 3] = np.nan
            yield name, arr

    src.iter_tensors = poisoned
    with pytest.raises(UserError, match="o_proj.weight contains NaN"):
        conv.convert(src, "q4f16_1", tmp_path / "nan", clip="rtn", progress=False)
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob("nan.tmp-*"))


def test_cli_quant_report(ckpt, tmp_path) -> None:
    from toolkit.cli import main

    png = tmp_path / "report.png"
    r = CliRunner().invoke(
        main, ["quant-report", str(ckpt), "-q", "q4f16_1", "-o", str(png), "--json", "--no-progress"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [t["name"] for t in report["tensors"]]
    assert names[0] == "model.embed_tokens.weight" and "lm_head.weight" in names and len(names) == 10
    assert report["methods"] == ["rtn", "search", "weighted"]
    for t in report["tensors"]:
        assert 0 < t["search"] <= t["rtn"] < 0.2  # 4-bit: ~10% relative RMS error; search never worse
        assert 0 < t["weighted"] < 0.2
    r = CliRunner().invoke(main, ["quant-report", str(ckpt), "-q", "q0f16", "-o", str(png)])
    assert r.exit_code == 1 and "nothing to report" in r.output


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--clip", "search", "-q", "gguf_q4_0"], "--clip search: gguf_q4_0 has no q4 group scales"),
        (["--clip", "gptq", "-q", "q0f16"], "--clip gptq: q0f16 has no q4 group scales"),
        (["--context-window", "999999"], "--context-window 999999: longer than the model's 8192 positions"),
    ],
)
def test_convert_refuses_flags_it_would_ignore(tmp_path, flags, needle):
    """A --clip for a scheme without q4 group scales, and a context window past the model's positions, are one
    line and no output: the first was ignored (the folder said "clip none"), the second written into the
    config as asked."""
    from toolkit.cli import main

    r = CliRunner().invoke(main, ["convert", "-o", str(tmp_path / "out"), "--no-progress", *flags])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()
