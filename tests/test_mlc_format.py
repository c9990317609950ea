"""A converted folder is what MLC-LLM's convert_weight + gen_config write (MLC commit 79d603f0).

Expected values are written out here from MLC's sources (mlc_chat_config.py, conversation_template/phi.py and
registry.py, model/phi3, model/llama, cpp/tokenizers/tokenizers.cc), not taken from the module under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_gguf_source import LLAMA, write_llama_gguf
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import mlc_format as mf
from toolkit.checkpoint import open_model
from toolkit.convert import converter as conv
from toolkit.errors import UserError

# MLCChatConfig's fields, in its order (model_dump(by_alias=True) writes them all)
MLC_KEYS = [
    "version",
    "model_type",
    "quantization",
    "model_config",
    "vocab_size",
    "context_window_size",
    "sliding_window_size",
    "prefill_chunk_size",
    "attention_sink_size",
    "tensor_parallel_shards",
    "pipeline_parallel_stages",
    "active_vocab_size",
    "temperature",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "top_p",
    "tokenizer_files",
    "tokenizer_info",
    "conv_template",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "model_task",
    "embedding_metadata",
]
CONVERSATION_KEYS = {
    "name",
    "system_template",
    "system_message",
    "system_prefix_token_ids",
    "add_role_after_system_message",
    "roles",
    "role_templates",
    "messages",
    "seps",
    "role_content_sep",
    "role_empty_sep",
    "stop_str",
    "stop_token_ids",
    "strip_reasoning_in_history",
    "function_string",
    "use_function_calling",
}
DEFAULT_ROLE_TEMPLATES = {
    "user": "{user_message}",
    "assistant": "{assistant_message}",
    "tool": "{tool_message}",
}
# dataclasses.fields of MLC's Phi3Config / LlamaConfig, less kwargs
MLC_PHI3_CONFIG_KEYS = (
    "model_type hidden_size vocab_size num_hidden_layers num_attention_heads intermediate_size rms_norm_eps "
    "num_key_value_heads max_position_embeddings position_embedding_base rope_scaling "
    "original_max_position_embeddings context_window_size prefill_chunk_size head_dim tensor_parallel_shards "
    "max_batch_size tie_word_embeddings partial_rotary_factor"
).split()
MLC_LLAMA_CONFIG_KEYS = (
    "hidden_size intermediate_size num_attention_heads num_hidden_layers rms_norm_eps vocab_size "
    "tie_word_embeddings position_embedding_base rope_scaling context_window_size prefill_chunk_size "
    "num_key_value_heads head_dim tensor_parallel_shards pipeline_parallel_stages max_batch_size "
    "disaggregation"
).split()
SAMPLE = "<|im_start|>user\nHello, wörld! The year 2024 costs $3.50 🙂<|im_end|>\n"


def _chat(folder: Path) -> dict:
    return json.loads((folder / "mlc-chat-config.json").read_text())


def _check_common(chat: dict) -> None:
    assert list(chat)[: len(MLC_KEYS)] == MLC_KEYS and set(chat) - set(MLC_KEYS) == {"toolkit"}
    mf.MLCChatConfig.model_validate(chat)  # the schema accepts what we wrote
    assert chat["version"] == "0.1.0" and chat["model_task"] == "chat" and chat["embedding_metadata"] is None
    assert chat["attention_sink_size"] == -1
    assert chat["tensor_parallel_shards"] == 1 and chat["pipeline_parallel_stages"] == 1
    assert set(chat["conv_template"]) == CONVERSATION_KEYS
    assert chat["conv_template"]["role_templates"] == DEFAULT_ROLE_TEMPLATES
    assert chat["conv_template"]["messages"] == [] and chat["conv_template"]["function_string"] == ""
    assert chat["conv_template"]["use_function_calling"] is False
    assert chat["conv_template"]["add_role_after_system_message"] is True


# ---- tiny Phi-3 checkpoint ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phi3_ckpt(tmp_path_factory) -> Path:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini", "mini-4k")
    # what Microsoft ships beside Phi-3-mini (values changed so that reading them shows)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.7, "top_p": 0.9}
    (path / "generation_config.json").write_text(json.dumps(gen))
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|end|>", "model_max_length": 4096})
    )
    return path


@pytest.fixture(scope="module")
def phi3_out(phi3_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "mini-q4"
    conv.convert(open_model(phi3_ckpt), "q4f16_1", out, clip="rtn", progress=False)
    return out


def test_phi3_chat_config(phi3_ckpt, phi3_out) -> None:
    chat = _chat(phi3_out)
    _check_common(chat)
    assert chat["model_type"] == "phi3" and chat["quantization"] == "q4f16_1" and chat["vocab_size"] == 512
    # MLC's Phi3Config defaults: context = max_position_embeddings (4096), prefill = min(context, 8192)
    assert chat["context_window_size"] == 4096 and chat["prefill_chunk_size"] == 4096
    # the window lives in model_config (applied in our kernels); MLC must never roll the cache
    assert chat["sliding_window_size"] == -1 and chat["model_config"]["sliding_window"] == 16
    mc = chat["model_config"]
    assert list(mc)[: len(MLC_PHI3_CONFIG_KEYS)] == MLC_PHI3_CONFIG_KEYS
    assert (
        mc["model_type"] == "phi3" and mc["position_embedding_base"] == 10000.0 and mc["rope_scaling"] is None
    )
    assert mc["context_window_size"] == 4096 and mc["prefill_chunk_size"] == 4096 and mc["head_dim"] == 32
    assert mc["max_batch_size"] == 128  # gen_config's --max-batch-size default
    # generation_config.json first, then config.json, then MLC's system defaults
    assert chat["temperature"] == 0.7 and chat["top_p"] == 0.9 and chat["eos_token_id"] == [2, 7]
    assert chat["repetition_penalty"] == 1.0 and chat["presence_penalty"] == 0.0
    assert chat["frequency_penalty"] == 0.0
    assert chat["bos_token_id"] == 1 and chat["pad_token_id"] == 0
    # MLC's phi-3 template
    ct = chat["conv_template"]
    assert ct["name"] == "phi-3" and ct["system_template"] == "<|system|>\n{system_message}"
    assert ct["system_message"] == (
        "You are a helpful digital assistant. Please provide safe, ethical and accurate information to "
        "the user."
    )
    assert ct["roles"] == {"user": "<|user|>", "assistant": "<|assistant|>"} and ct["seps"] == ["<|end|>\n"]
    assert ct["role_content_sep"] == "\n" and ct["role_empty_sep"] == "\n"
    assert ct["system_prefix_token_ids"] == [1] and ct["stop_str"] == ["<|endoftext|>"]
    assert ct["stop_token_ids"] == [2, 32000, 32001, 32007]
    # the tiny tokenizer is byte-level BPE (ByteLevel decoder, no Prepend normalizer, no Strip decoder)
    assert chat["tokenizer_info"] == {
        "token_postproc_method": "byte_level",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(phi3_ckpt / "tokenizer.json"))
    assert chat["active_vocab_size"] == tk.get_vocab_size(with_added_tokens=True) <= 512


def test_phi3_tokenizer_files_are_the_checkpoints(phi3_ckpt, phi3_out) -> None:
    chat = _chat(phi3_out)
    expected = [
        n
        for n in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        )
        if (phi3_ckpt / n).is_file()
    ]
    assert chat["tokenizer_files"] == expected and len(expected) == 4
    for name in expected:
        assert (phi3_out / name).read_bytes() == (phi3_ckpt / name).read_bytes(), name
    assert not list(phi3_out.glob("*.tmp"))


def test_phi3_reads_back(phi3_ckpt, phi3_out) -> None:
    src, mlc = open_model(phi3_ckpt), open_model(phi3_out)
    assert mlc.config == src.config and mlc.conv_template == "phi3" == src.conv_template
    text = "<|user|>\nHello world<|end|>\n"
    assert mlc.tokenizer().encode(text) == src.tokenizer().encode(text)
    assert mlc.chat_config.arch == "phi3" and mlc.chat_config.toolkit["clip"] == "rtn"


def test_context_and_prefill_overrides(phi3_ckpt, tmp_path) -> None:
    out = tmp_path / "ctx"
    conv.convert(
        open_model(phi3_ckpt), "q0f16", out, progress=False, context_window_size=1024, prefill_chunk_size=256
    )
    chat = _chat(out)
    assert (chat["context_window_size"], chat["prefill_chunk_size"]) == (1024, 256)
    assert (chat["model_config"]["context_window_size"], chat["model_config"]["prefill_chunk_size"]) == (
        1024,
        256,
    )
    # MLC's rules: prefill defaults to min(context, 8192) and a larger one is cut back the same way
    cfg = open_model(phi3_ckpt).config
    assert mf.default_window_sizes(cfg, 16384, None) == (16384, 8192)
    assert mf.default_window_sizes(cfg, 1024, 4096) == (1024, 1024)
    with pytest.raises(UserError, match="context window size must be positive"):
        mf.default_window_sizes(cfg, -5, None)


def test_longrope_model_config(tmp_path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "phi4", "phi4-mini")
    out = tmp_path / "phi4-q4"
    conv.convert(open_model(ckpt), "q4f16_1", out, clip="rtn", progress=False)
    hf = json.loads((ckpt / "config.json").read_text())
    rope = hf.get("rope_scaling") or hf["rope_parameters"]  # transformers 4 / 5 spelling
    chat = _chat(out)
    _check_common(chat)
    rs = chat["model_config"]["rope_scaling"]
    # MLC's Phi3Config keeps type, adds rope_type and both position limits
    assert rs["type"] == rs["rope_type"] == "longrope"
    assert rs["short_factor"] == rope["short_factor"]
    assert rs["long_factor"] == rope["long_factor"]
    assert (rs["max_position_embeddings"], rs["original_max_position_embeddings"]) == (256, 16)
    assert chat["model_config"]["partial_rotary_factor"] == 0.75
    assert chat["model_config"]["original_max_position_embeddings"] == 16
    assert chat["sliding_window_size"] == -1  # no window
    assert open_model(out).config == open_model(ckpt).config


def test_phi4_vocabulary_gets_phi4_template() -> None:
    assert mf.mlc_template_name("phi3", 32064) == "phi-3"
    assert mf.mlc_template_name("phi3", 200064) == "phi-4"
    phi4 = mf.mlc_template("phi-4")
    assert phi4.system_prefix_token_ids == [200022] and phi4.stop_token_ids == [199999, 200020]
    assert phi4.stop_str == ["<|endoftext|>", "<|end|>"]
    with pytest.raises(UserError, match="no MLC-LLM counterpart"):
        mf.mlc_template_name("vicuna", 32000)


# ---- GGUF inputs -------------------------------------------------------------------------------------------
def _gguf_tokenizer_checks(src, out: Path) -> None:
    from tokenizers import Tokenizer

    chat = _chat(out)
    assert chat["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    ours = src.tokenizer()
    # what MLC's runtime does with the file: encode without post-processing (BOS comes from the template)
    ids = written.encode(SAMPLE, add_special_tokens=False).ids
    assert ids == ours.encode(SAMPLE, add_bos=False)
    assert written.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)
    assert chat["active_vocab_size"] == ours.vocab_size


def test_synthetic_llama_gguf(tmp_path) -> None:
    import gguf

    path = tmp_path / "tiny-llama.gguf"
    write_llama_gguf(path, tied=True)
    out = tmp_path / "llama-q4"
    src = open_model(path)
    conv.convert(src, "q4f16_1", out, clip="rtn", progress=False, param_names="mlc")
    chat = _chat(out)
    _check_common(chat)
    assert chat["model_type"] == "llama"  # a Llama checkpoint, honestly
    mc = chat["model_config"]
    assert list(mc)[: len(MLC_LLAMA_CONFIG_KEYS)] == MLC_LLAMA_CONFIG_KEYS and "model_type" not in mc
    assert mc["position_embedding_base"] == LLAMA["theta"] and mc["tie_word_embeddings"] is True
    assert chat["context_window_size"] == LLAMA["ctx"] == chat["prefill_chunk_size"]
    r = gguf.GGUFReader(path)
    assert chat["bos_token_id"] == int(r.fields["tokenizer.ggml.bos_token_id"].contents())
    assert chat["eos_token_id"] == int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    # its chat template is ChatML without a system message: MLC's chatml_nosystem
    assert chat["conv_template"]["name"] == "chatml_nosystem"
    assert chat["conv_template"]["system_template"] == "{system_message}"
    assert chat["tokenizer_info"]["token_postproc_method"] == "byte_level"
    _gguf_tokenizer_checks(src, out)
    back = open_model(out)
    assert back.config == src.config and back.conv_template == "chatml-plain"
    # MLC's Llama names are HF's fused ones: "mlc" style keeps them
    assert "model.layers.0.self_attn.qkv_proj.q_weight" in back.param_names()
    name = "model.layers.1.mlp.gate_up_proj.weight"
    w, q = src.get_tensor(name), back.get_tensor(name)
    assert np.abs(w - q).max() <= np.abs(w).max() / 7  # dequantized q4 of the same tensor


@pytest.fixture(scope="module")
def smol_out(tmp_path_factory):
    from toolkit.default_model import default_model_path

    try:
        path = default_model_path()
    except UserError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smol") / "smol-q4"
    conv.convert(open_model(path), "q4f16_1", out, clip="rtn", progress=False)
    return path, out


def test_smollm2_chat_config(smol_out) -> None:
    import gguf

    path, out = smol_out
    chat = _chat(out)
    _check_common(chat)
    r = gguf.GGUFReader(path)
    meta = lambda k: r.fields[k].contents()  # noqa: E731
    assert chat["model_type"] == "llama" and chat["model_config"]["num_hidden_layers"] == 30
    assert chat["vocab_size"] == 49152 and chat["sliding_window_size"] == -1
    ctx = int(meta("llama.context_length"))
    assert chat["context_window_size"] == ctx and chat["prefill_chunk_size"] == min(ctx, 8192)
    assert chat["bos_token_id"] == int(meta("tokenizer.ggml.bos_token_id"))
    eos = chat["eos_token_id"]
    assert int(meta("tokenizer.ggml.eos_token_id")) in (eos if isinstance(eos, list) else [eos])
    # MLC's chatml template; <|im_end|> is token 2 in SmolLM2's vocabulary, MLC's stop id
    ct = chat["conv_template"]
    assert ct["name"] == "chatml" and ct["stop_str"] == ["<|im_end|>"] and ct["stop_token_ids"] == [2]
    assert meta("tokenizer.ggml.tokens")[2] == "<|im_end|>"
    assert ct["system_template"] == "<|im_start|>system\n{system_message}<|im_end|>\n"
    assert ct["system_message"] == (
        "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest "
        "answers."
    )
    assert ct["roles"] == {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    assert ct["seps"] == ["<|im_end|>\n"] and ct["system_prefix_token_ids"] is None
    assert chat["tokenizer_info"] == {
        "token_postproc_method": "byte_level",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }


def test_smollm2_tokenizer_json_matches_gguf(smol_out) -> None:
    path, out = smol_out
    src = open_model(path)
    _gguf_tokenizer_checks(src, out)
    back = open_model(out)
    assert back.config == src.config and back.conv_template == "chatml"
    text = "The capital of France is Paris. 12345 naïve café"
    assert back.tokenizer().encode(text) == src.tokenizer().encode(text)


def test_spm_gguf_tokenizer_info() -> None:
    """Our SentencePiece rebuild (llama GGUF vocabularies) reads to MLC as byte fallback + prepend + strip."""
    from toolkit.tokenizer import Tokenizer

    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab"] + [
        f"<0x{i:02X}>" for i in range(256)
    ]
    types = [2, 3, 3, 1, 1, 1, 1, 1] + [6] * 256
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    tk = Tokenizer.from_gguf_fields(fields, "x.gguf")
    info = mf.detect_tokenizer_info(json.loads(tk.backend.to_str()))
    assert info.model_dump() == {
        "token_postproc_method": "byte_fallback",
        "prepend_space_in_encode": True,
        "strip_space_in_decode": True,
    }
    assert mf.detect_tokenizer_info(None) == mf.TokenizerInfo()  # no tokenizer.json: MLC's defaults
    # a Sequence decoder: the last ByteLevel/ByteFallback entry decides
    seq = {"decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "ByteLevel"}]}}
    assert mf.detect_tokenizer_info(seq).token_postproc_method == "byte_level"


# ---- reader / writer ---------------------------------------------------------------------------------------
def test_tensor_cache_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a.q_weight": rng.integers(0, 2**32, (64, 16), dtype=np.uint32),
        "a.q_scale": rng.normal(size=(64, 4)).astype(np.float16),
        "big": rng.normal(size=(300, 64)).astype(np.float32),  # >= half the cap: a shard of its own
        "norm": rng.normal(size=(64,)).astype(np.float16),
        "ids": rng.integers(-100, 100, (10,), dtype=np.int8),
    }
    content = mf.write_tensor_cache(tensors.items(), tmp_path, shard_cap=64 * 1024)
    assert content == json.loads((tmp_path / "tensor-cache.json").read_text())
    assert content["metadata"]["ParamSize"] == 5 and len(content["records"]) >= 2
    back = mf.load_tensor_cache(tmp_path)
    assert list(back) != [] and set(back) == set(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)
    assert mf.verify_tensor_cache(tmp_path) == len(content["records"])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_shard_write_is_raised_and_nothing_writes_after_close(tmp_path, monkeypatch) -> None:
    # shards are written in a thread: its error must reach the caller, and close() must leave no writer behind
    import builtins
    import threading

    real_open = builtins.open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("params_shard_1.bin"):
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    writer = mf.TensorCacheWriter(tmp_path, shard_cap=1024)
    with pytest.raises(OSError, match="No space left"):
        with writer:
            for i in range(8):
                # 800 bytes: t0 waits in the pending shard, t1 on gets shard 0 of its own, t2 shard 1...
                writer.add(f"t{i}", np.full(200, i, np.float32))
            writer.finish()
    assert not any(t.name == "phi3-shard-writer" for t in threading.enumerate())
    assert (tmp_path / "params_shard_0.bin").read_bytes() == np.ones(200, np.float32).tobytes()
    assert not (tmp_path / "params_shard_1.bin").exists() and not (tmp_path / "tensor-cache.json").exists()


def test_chat_config_round_trip(phi3_out, tmp_path) -> None:
    chat = mf.read_chat_config(phi3_out)
    path = mf.write_chat_config(chat, tmp_path)
    assert json.loads(path.read_text()) == _chat(phi3_out)
    assert mf.read_chat_config(tmp_path) == chat
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(conv_template="phi3"), "conv_template"),  # what phi3-toolkit wrote before
        (lambda c: c.pop("quantization"), "quantization"),
        (lambda c: c["conv_template"].update(seps=[]), "seps"),
        (lambda c: c.update(model_type="gpt2"), "model_type 'gpt2'"),
        # MLC-LLM's own model_config (no fields of ours): refused, not half-read
        (lambda c: c["model_config"].pop("source_arch"), "not written by phi3-toolkit"),
    ],
)
def test_bad_chat_config_is_one_line_user_error(phi3_out, tmp_path, edit, message) -> None:
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(phi3_out, out)
    chat = _chat(out)
    edit(chat)
    (out / "mlc-chat-config.json").write_text(json.dumps(chat))
    with pytest.raises(UserError, match=message) as e:
        open_model(out)
    assert "\n" not in str(e.value) and e.value.path == str(out / "mlc-chat-config.json")


# ---- against MLC-LLM's own pydantic models (optional: needs a git clone of mlc-ai/mlc-llm) ----------------
MLC_COMMIT = "79d603f085f50500e9509fa01785ffa7ecfaaa93"
_MLC_FILES = [
    "protocol/mlc_chat_config.py",
    "protocol/conversation_protocol.py",
    "conversation_template/registry.py",
    "conversation_template/phi.py",
]


@pytest.fixture(scope="module")
def mlc_llm_models(tmp_path_factory, request):
    """MLC's MLCChatConfig and template registry, loaded from its source at the pinned commit (set
    MLC_LLM_REPO to a clone or bare mirror); only pydantic is needed to import these files."""
    import os
    import subprocess
    import sys

    repo = os.environ.get("MLC_LLM_REPO")
    if not repo:
        pytest.skip("set MLC_LLM_REPO to a git clone of mlc-ai/mlc-llm to check against MLC's own models")
    root = tmp_path_factory.mktemp("mlc")
    pkg = root / "mlc_llm"
    for sub in ("", "protocol", "support", "conversation_template"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "support" / "constants.py").write_text('MLC_CHAT_CONFIG_VERSION = "0.1.0"\n')
    for f in _MLC_FILES:
        text = subprocess.run(
            ["git", "-C", repo, "show", f"{MLC_COMMIT}:python/mlc_llm/{f}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (pkg / f).write_text(text)
    sys.path.insert(0, str(root))
    request.addfinalizer(lambda: sys.path.remove(str(root)))
    from mlc_llm.conversation_template import phi  # noqa: F401  (registers the phi templates)
    from mlc_llm.conversation_template.registry import ConvTemplateRegistry
    from mlc_llm.protocol.mlc_chat_config import MLCChatConfig

    return MLCChatConfig, ConvTemplateRegistry


def test_against_mlc_llm_source(mlc_llm_models, phi3_out, tmp_path) -> None:
    mlc_chat_config, registry = mlc_llm_models
    for name in mf.MLC_TEMPLATES:
        assert registry.get_conv_template(name).model_dump() == mf.mlc_template(name).model_dump(), name
    path = tmp_path / "llama.gguf"
    write_llama_gguf(path)
    conv.convert(open_model(path), "q0f16", tmp_path / "llama", progress=False)
    for folder in (phi3_out, tmp_path / "llama"):
        chat = _chat(folder)
        chat.pop("toolkit")
        # MLC's model takes the file and writes it back unchanged, key order included
        dumped = mlc_chat_config.model_validate(chat).model_dump(by_alias=True)
        assert dumped == chat and list(dumped) == list(chat)
