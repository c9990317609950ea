"""Tokenizer (tokenizer.json and GGUF vocabularies), streaming decode, and chat templates."""

from __future__ import annotations

import json

import pytest
from tiny_tokenizer import build_tiny_tokenizer, write_tiny_tokenizer

from toolkit.chat_template import (
    TEMPLATES,
    render,
    stop_token_ids,
    template_for_hf_dir,
    template_from_jinja,
)
from toolkit.config import Phi3Config
from toolkit.errors import UserError
from toolkit.jinja_template import render_jinja
from toolkit.tokenizer import Tokenizer

CFG = Phi3Config(
    vocab_size=512,
    hidden_size=8,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=8,
    bos_token_id=1,
    eos_token_ids=(2,),
)
TEXTS = [
    "Hello, my name is Phi.",
    "naïve café, 日本語 🙂🚀",
    "  spaces\tand\nnewlines  ",
    "digits 3.14159 and 1000",
]


def test_tiny_tokenizer_folder(tmp_path) -> None:
    write_tiny_tokenizer(tmp_path, 512)
    tok = Tokenizer.from_dir(tmp_path, config=CFG)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert tok.token_to_id("<|user|>") == ids[0] and tok.token_to_id("<|end|>") in ids
    assert tok.eos_token_ids == {2, tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    assert not tok.add_bos and tok.bos_token_id == 1  # no tokenizer_config: the config's BOS id, not added
    assert tok.decode(ids) == "\nhi\n\n" and tok.decode(ids, skip_special_tokens=False).startswith("<|user|>")


@pytest.mark.parametrize("vocab_size", [512, 300, 64])
def test_tiny_tokenizer_ids_fit_the_vocab(vocab_size: int) -> None:
    tk = build_tiny_tokenizer(vocab_size)
    assert max(tk.get_vocab(with_added_tokens=True).values()) < vocab_size
    assert tk.token_to_id("<|end|>") is not None


def test_plain_tokenizer_without_special_tokens(tmp_path) -> None:
    write_tiny_tokenizer(tmp_path, 512, special_tokens=False)
    tok = Tokenizer.from_dir(tmp_path, config=CFG)
    assert tok.token_to_id("<|end|>") is None and tok.eos_token_ids == {2}
    prompt = render([{"role": "user", "content": "Hello"}], "phi3")
    ids = tok.encode(prompt)  # the markup is ordinary text for this vocabulary
    assert len(ids) > 5 and tok.decode(ids) == prompt
    assert stop_token_ids("phi3", tok) == {2}


def test_tokenizer_id_beyond_model_vocab_is_an_error(tmp_path) -> None:
    write_tiny_tokenizer(tmp_path, 512)
    small = Phi3Config(**{**CFG.to_dict(), "vocab_size": 300})
    with pytest.raises(UserError, match="model's vocab_size is 300") as e:
        Tokenizer.from_dir(tmp_path, config=small)
    assert e.value.path == str(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)


def test_bos_from_tokenizer_config_and_post_processor(tmp_path) -> None:
    from tokenizers import processors

    write_tiny_tokenizer(tmp_path, 512)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<|endoftext|>", "eos_token": {"content": "<|end|>"}})
    )
    tok = Tokenizer.from_dir(tmp_path, config=CFG)
    bos = tok.token_to_id("<|endoftext|>")
    assert (
        tok.bos_token_id == bos and tok.encode("hi")[0] == bos and tok.encode("hi", add_bos=False)[0] != bos
    )
    # no tokenizer_config: a Llama/Phi-3 style post-processor that adds BOS decides
    (tmp_path / "tokenizer_config.json").unlink()
    tk = build_tiny_tokenizer(512)
    tk.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tk.save(str(tmp_path / "tokenizer.json"))
    cfg = Phi3Config(**{**CFG.to_dict(), "bos_token_id": bos})
    tok = Tokenizer.from_dir(tmp_path, config=cfg)
    assert tok.add_bos and tok.encode("hi")[0] == bos and tok.encode("hi").count(bos) == 1


def _gguf_gpt2_fields(vocab_size: int = 512) -> dict:
    tk = build_tiny_tokenizer(vocab_size)
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    special = {t.content for t in tk.get_added_tokens_decoder().values()}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|end|>"),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ '<|im_start|>' }}... You are a helpful AI assistant named SmolLM, "
        "trained by Hugging Face",
    }, tk


def test_gguf_bpe_tokenizer_and_save_roundtrip(tmp_path) -> None:
    fields, ref = _gguf_gpt2_fields()
    tok = Tokenizer.from_gguf_fields(fields, "m.gguf")
    bos = fields["tokenizer.ggml.bos_token_id"]
    for text in TEXTS + ["<|user|>\nhi<|end|>"]:
        assert tok.encode(text) == [bos, *ref.encode(text, add_special_tokens=False).ids]
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert (again.bos_token_id, again.add_bos, again.eos_token_ids) == (
        tok.bos_token_id,
        True,
        tok.eos_token_ids,
    )
    assert (
        template_for_hf_dir(tmp_path) == "chatml"
    )  # the GGUF's chat template travels in tokenizer_config.json


def test_gguf_unsupported_tokenizers() -> None:
    fields, _ = _gguf_gpt2_fields()
    with pytest.raises(UserError, match="pre-tokenizer 'qwen9'"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "qwen9"}, "m.gguf")
    with pytest.raises(UserError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.model": "bert"}, "m.gguf")
    with pytest.raises(UserError, match="no tokenizer vocabulary"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"}, "m.gguf")


SPM_MERGED = [
    "ll",
    "\u2581h",
    "llo",
    "\u2581he",
    "\u2581hello",
    "or",
    "ld",
    "orld",
    "\u2581w",
    "\u2581world",
    "el",
    "lo",
]
SPM_CHARS = ["\u2581", "h", "e", "l", "o", "w", "r", "d"]


def _spm_fields() -> dict:
    """A tiny SentencePiece-BPE vocabulary as llama.cpp stores it (`llama` model, <0xXX> byte tokens).

    As in a trained model, merged pieces are scored by merge order (-rank) and single characters score lowest.
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_MERGED + SPM_CHARS
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_MERGED) + len(SPM_CHARS))
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_MERGED))]
    scores += [-100.0 - i for i in range(len(SPM_CHARS))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_gguf_sentencepiece_tokenizer() -> None:
    fields = _spm_fields()
    tok = Tokenizer.from_gguf_fields(fields, "m.gguf")
    toks = fields["tokenizer.ggml.tokens"]
    ids = tok.encode("hello world")
    assert ids == [1, toks.index("\u2581hello"), toks.index("\u2581world")]  # BOS by default for SPM
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("hé", add_bos=False)  # é is not in the vocabulary: UTF-8 byte fallback
    assert ids == [toks.index("\u2581h"), toks.index("<0xC3>"), toks.index("<0xA9>")]
    assert tok.decode(ids) == "hé"
    sd = tok.stream_decoder()
    assert [sd.feed(i) for i in tok.encode("hello world hé", add_bos=False)][:2] == ["hello", " world"]


def test_gguf_sentencepiece_matches_transformers_gguf_converter() -> None:
    """transformers' own GGUF tokenizer import, an independent oracle. Its "phi3" builder prepends the space
    prefix with a normalizer like llama.cpp does (its "llama" one uses Metaspace and differs on leading
    spaces)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = _spm_fields()
    ours = Tokenizer.from_gguf_fields(fields, "m.gguf")
    keys = {
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "unknown_token_id": "unk_token_id",
    }
    ref, _ = convert_gguf_tokenizer(
        "phi3", {"tokenizer_type": "llama", **{v: fields[f"tokenizer.ggml.{k}"] for k, v in keys.items()}}
    )
    for text in [
        "hello world",
        " hello  world",
        "helloworld",
        "world hello\nhello",
        "ok",
        "lol hell dwell",
        "hé",
    ]:
        ids = ours.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == ref.decode(ids) == text


def test_stream_decoder_holds_split_utf8() -> None:
    fields, _ = _gguf_gpt2_fields()
    tok = Tokenizer.from_gguf_fields(fields, "m.gguf")
    text = "emoji 🙂 and 日本語 ok"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.split())  # the emoji and CJK characters span several byte tokens
    sd = tok.stream_decoder()
    deltas = [sd.feed(i) for i in ids]
    assert "".join(deltas) + sd.flush() == text
    assert all("\ufffd" not in d for d in deltas) and "" in deltas  # held back mid-character, never garbled
    # an incomplete character at the end comes out of flush() as U+FFFD
    sd = tok.stream_decoder()
    emoji_ids = tok.encode("🙂", add_bos=False)
    assert len(emoji_ids) > 1 and sd.feed(emoji_ids[:-1]) == "" and sd.flush() == "\ufffd"


# ---- chat templates ----------------------------------------------------------------------------------------
# microsoft/Phi-3-mini-4k-instruct tokenizer_config.json chat_template (verbatim)
PHI3_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + messa"
    "ge['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message["
    "'content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + m"
    "essage['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# SmolLM2-135M-Instruct GGUF tokenizer.chat_template (verbatim)
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '"
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<"
    "|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] +"
    " '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("name,jinja", [("phi3", PHI3_JINJA), ("chatml", SMOLLM2_JINJA)])
def test_templates_match_the_models_jinja(name: str, jinja: str) -> None:
    import jinja2

    tmpl = jinja2.Environment().from_string(jinja)
    assert template_from_jinja(jinja) == name
    for conv in CONVERSATIONS:
        assert render(conv, name) == tmpl.render(messages=conv, add_generation_prompt=True, eos_token="")
        assert render(conv, name, add_generation_prompt=False) == tmpl.render(
            messages=conv, add_generation_prompt=False, eos_token=""
        )


def test_history_rendering_is_a_prefix_for_kv_reuse() -> None:
    conv = CONVERSATIONS[2]
    for name in TEMPLATES:
        assert render(conv, name).startswith(render(conv[:2], name, add_generation_prompt=False))


def test_raw_and_errors(tmp_path) -> None:
    assert (
        render([{"role": "user", "content": "The capital of France is"}], "raw") == "The capital of France is"
    )
    with pytest.raises(UserError, match="unknown chat template"):
        render([], "alpaca")
    with pytest.raises(UserError, match="no role 'tool'"):
        render([{"role": "tool", "content": "x"}], "phi3")
    assert template_for_hf_dir(tmp_path) == "phi3"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "<|im_start|>{{ x }}"}]})
    )
    assert template_for_hf_dir(tmp_path) == "chatml-plain"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")  # not UTF-8: one line naming it
    with pytest.raises(UserError, match="chat_template.jinja: cannot be read as UTF-8 text"):
        template_for_hf_dir(tmp_path)


def _jinja_format(jinja: str):
    from toolkit.runtime.options import GenerationOptions
    from toolkit.runtime.prompts import PromptFormat

    return PromptFormat(None, jinja, "raw", {"eos_token": "<|endoftext|>"}, set(), GenerationOptions())


def test_a_message_the_models_template_leaves_out_is_an_error(capsys) -> None:
    """Phi-3's template renders system, user and assistant turns only: a 'developer' or 'tool' message would
    vanish from the prompt, so the reply would ignore it while nothing said so: an error. Its first release
    had no system turn at all: a system message is left out as transformers leaves it, and that is said once.
    SmolLM2's renders any role; a template that refuses the check's markers is not judged."""
    ask = {"role": "user", "content": "hi"}
    for role in ("developer", "tool"):
        with pytest.raises(UserError, match=rf"leaves messages\[0\] \(role '{role}'\) out of the prompt"):
            _jinja_format(PHI3_JINJA).render([{"role": role, "content": "Answer in French."}, ask])
    text = _jinja_format(PHI3_JINJA).render([{"role": "system", "content": "Answer in French."}, ask])
    assert "Answer in French." in text and capsys.readouterr().err == ""
    old_phi3 = PHI3_JINJA.replace(
        "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif",
        "{% if",
    )
    assert old_phi3 != PHI3_JINJA
    fmt = _jinja_format(old_phi3)
    conv = [ask, {"role": "system", "content": "Be brief."}, ask]
    assert fmt.render(conv) == render_jinja(old_phi3, conv, add_generation_prompt=True, special_tokens={})
    assert fmt.render(conv) == "<|user|>\nhi<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    err = capsys.readouterr().err
    assert err.count("notice: this model's chat template leaves system messages out") == 1, err
    text = _jinja_format(SMOLLM2_JINJA).render([{"role": "tool", "content": "42"}, ask])
    assert "<|im_start|>tool\n42<|im_end|>" in text
    picky = "{% if messages[0]['content'] != 'hi' %}{{ raise_exception('no') }}{% endif %}x"
    assert _jinja_format(picky).render([ask]) == "x"  # what it does with markers says nothing


def test_stop_tokens_of_templates(tmp_path) -> None:
    write_tiny_tokenizer(tmp_path, 512)
    tok = Tokenizer.from_dir(tmp_path, config=CFG)
    assert stop_token_ids("phi3", tok) == {2, tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    assert stop_token_ids("raw", tok) == tok.eos_token_ids
