"""The Python API (toolkit/api.py) and what it is built from: one validated options dataclass, the sampler's
knobs, stop strings over streamed text, and chat templates rendered like transformers' apply_chat_template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import make_tiny_checkpoint

import toolkit.api as phi3
from toolkit.checkpoint import open_model
from toolkit.cli import main
from toolkit.errors import UserError
from toolkit.runtime.options import GenerationOptions, OptionsError
from toolkit.runtime.prompts import PromptFormat
from toolkit.runtime.request import Generation
from toolkit.runtime.sampling import TokenSampler
from toolkit.runtime.stops import StopText

# one xdist worker runs every test that compiles and loads the embedded model, so the other never waits on it
pytestmark = pytest.mark.xdist_group("embedded-model")

PROMPT = "What is the capital of France?"


# -- options
@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"frequency_penalty": 3.0},
        {"presence_penalty": -2.5},
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"seed": -1},
        {"stop": [""]},
        {"stop": [1]},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"5": 101}},
        {"temperature": "hot"},
        {"unknown_knob": 1},
    ],
)
def test_options_refuse_bad_values_with_one_line(bad):
    with pytest.raises(OptionsError) as e:
        GenerationOptions().replace(**bad)
    assert "\n" not in str(e.value) and str(e.value)
    assert isinstance(e.value, UserError)  # the CLI prints it as one line, the server answers 400


def test_options_normalise_stop_and_logit_bias():
    o = GenerationOptions(stop="END", logit_bias={"7": 5})
    assert o.stop == ("END",) and o.logit_bias == {7: 5.0}
    assert o.replace(temperature=None).temperature == o.temperature  # None = not given
    with pytest.raises(OptionsError, match="outside the vocabulary"):
        GenerationOptions(logit_bias={600: 1}).check_vocab(512)


# -- sampler
def test_sampler_bias_and_penalties():
    logits = np.array([1.0, 3.0, 2.0, 0.5, -1.0])
    greedy = GenerationOptions(temperature=0)
    assert TokenSampler(greedy)(logits) == 1
    assert TokenSampler(greedy.replace(logit_bias={4: 100}))(logits) == 4
    # repetition penalty divides a positive logit of a seen (prompt) token: 3/2 < 2
    assert TokenSampler(greedy.replace(repetition_penalty=2.0), prompt=[1])(logits) == 2
    s = TokenSampler(greedy.replace(frequency_penalty=0.6))
    s.accept(1)
    assert s(logits) == 1  # 3 - 0.6 > 2
    s.accept(1)
    assert s(logits) == 2  # 3 - 1.2 < 2
    s = TokenSampler(greedy.replace(presence_penalty=1.5))
    s.accept(1)
    s.accept(1)
    assert np.isclose(s.adjust(logits)[1], 1.5)  # presence counts once


def test_sampler_top_k_min_p_and_seed():
    logits = np.array([0.0, 3.0, 2.9, -5.0, 2.8])
    o = GenerationOptions(temperature=1.0, top_p=1.0, seed=3)
    assert {TokenSampler(o.replace(top_k=1))(logits) for _ in range(20)} == {1}
    s = TokenSampler(o.replace(top_k=2))
    assert {s(logits) for _ in range(200)} == {1, 2}
    s = TokenSampler(o.replace(min_p=0.5))  # keeps tokens with p >= 0.5 * p_max: 1, 2, 4
    assert {s(logits) for _ in range(300)} == {1, 2, 4}

    def draws(seed):
        s = TokenSampler(o.replace(seed=seed))
        return [s(logits) for _ in range(40)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


# -- stop strings
def test_stop_text_holds_back_a_possible_stop_and_cuts_at_it():
    st = StopText(("</end>",))
    out = [st.feed(p) for p in ["Hello </", "e", "nd> tail"]]
    assert "".join(out) == "Hello " and st.stopped
    st = StopText(("</end>",))
    assert st.feed("a </e") == "a " and st.feed("x") == "</ex" and st.flush() == ""
    st = StopText(("ab",))
    assert st.feed("xa") == "x" and st.flush() == "a"  # not a stop after all: released at the end


# -- Generation with a real tokenizer (no engine)
@pytest.fixture(scope="module")
def smol():
    return open_model(None)


def test_generation_streams_multibyte_characters_whole(smol):
    tok = smol.tokenizer()
    text = "naïve 日本語 🙂🚀 done"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.split())  # some characters span several tokens
    gen = Generation([1], GenerationOptions(temperature=0, max_tokens=len(ids)), tok, set(), 4096)
    pieces = []
    for t in ids:
        onehot = np.full(tok.vocab_size, -1e9, dtype=np.float32)
        onehot[t] = 0
        st = gen.step(onehot)
        pieces.append(st.text)
    assert st.finish_reason == "length"
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# -- chat templates vs transformers
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café 🙂"},
    ],
]


@pytest.fixture(scope="module")
def smol_hf_tokenizer(smol):
    """transformers' tokenizer of the embedded GGUF, built once (its conversion from the GGUF is slow)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol.path.parent), gguf_file=smol.path.name)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_embedded_model_prompt_equals_transformers(smol, smol_hf_tokenizer, add_generation_prompt):
    hf = smol_hf_tokenizer
    fmt = PromptFormat.for_source(smol, smol.tokenizer())
    assert fmt.jinja is not None  # the GGUF's own template, not our hand-written one
    for conv in CONVERSATIONS:
        ref = hf.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert fmt.render(conv, add_generation_prompt) == ref
        ref_ids = hf(ref, add_special_tokens=False)["input_ids"]
        assert fmt.encode(conv, add_generation_prompt) == ref_ids


# A template of its own (none of our hand-written ones): BOS written by the template, a namespace, loop
# controls, tojson, raise_exception on a role it refuses, and strftime_now.
TINY_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "[{{ ns.n }}|{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% if loop.index > 20 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[{{ ns.n + 1 }}|ASSISTANT] {% endif %}"
    "{# meta: {{ {'k': 'é'} | tojson }} {{ strftime_now('%Y') }} #}"
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("api") / "ckpt", "mini-4k")
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|system|>",
                "eos_token": "<|end|>",
                "chat_template": TINY_TEMPLATE,
            }
        )
    )
    return ckpt


def test_tiny_checkpoint_own_template_equals_transformers(tiny_ckpt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    src = open_model(tiny_ckpt)
    fmt = PromptFormat.for_source(src, src.tokenizer())
    assert fmt.jinja == TINY_TEMPLATE and fmt.template == "raw"  # not silently Phi-3's
    for conv in CONVERSATIONS:
        for agp in (True, False):
            ref = hf.apply_chat_template(conv, add_generation_prompt=agp, tokenize=False)
            assert fmt.render(conv, agp) == ref
            assert fmt.encode(conv, agp) == hf(ref, add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError, match="bad role tool"):
        fmt.render([{"role": "tool", "content": "x"}])


def test_generation_defaults_come_from_generation_config(tiny_ckpt, tmp_path):
    from toolkit.runtime.generation_config import generation_defaults

    assert generation_defaults(tiny_ckpt).temperature == 0.0  # transformers: no do_sample means greedy
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40, "max_new_tokens": 99})
    )
    d = generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (0.6, 0.9, 40, 99)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": -3}))
    with pytest.raises(UserError, match="generation_config.json: bad generation default: temperature"):
        generation_defaults(tmp_path)


def test_the_embedded_model_samples_at_its_cards_defaults(tmp_path):
    """The embedded GGUF has no sampling metadata; it gets its model card's 0.2 / 0.9 under any name, and
    any other GGUF the toolkit's 0.7 / 0.95."""
    from toolkit.default_model import default_model_path
    from toolkit.runtime.generation_config import generation_defaults

    d = generation_defaults(default_model_path())
    assert (d.temperature, d.top_p) == (0.2, 0.9)
    (tmp_path / "link.gguf").symlink_to(default_model_path())
    assert generation_defaults(tmp_path / "link.gguf") == d
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    other = generation_defaults(tmp_path / "other.gguf")
    assert (other.temperature, other.top_p) == (0.7, 0.95)


# -- the API on the embedded model
@pytest.fixture(scope="module")
def model():
    return phi3.load(context_window=512, max_batch_size=2)


def test_the_loaded_embedded_model_keeps_its_defaults(model):
    assert (model.defaults.temperature, model.defaults.top_p) == (0.2, 0.9)
    assert model.options(temperature=0.5).top_p == 0.9


def test_generate_stream_and_cli_agree(model):
    c = model.generate(PROMPT, temperature=0, max_tokens=12)
    assert c.finish_reason == "stop" and "Paris" in c.text
    assert c.completion_tokens > 0 and c.prompt_tokens == len(model.prompt_ids(PROMPT))
    pieces = list(model.stream(PROMPT, temperature=0, max_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == c.text
    messages = [{"role": "user", "content": PROMPT}]
    assert model.generate(messages, temperature=0, max_tokens=12).text == c.text
    r = CliRunner().invoke(
        main, ["generate", "-p", PROMPT, "--temperature", "0", "--max-tokens", "12", "--no-stats"]
    )
    assert r.exit_code == 0, r.output
    assert r.output == c.text + "\n"


def test_max_tokens_stop_strings_and_pages_come_back(model):
    start = model.engine.free_pages()
    c = model.generate(PROMPT, temperature=0, max_tokens=3)
    assert (c.finish_reason, c.completion_tokens) == ("length", 3)
    full = model.generate(PROMPT, temperature=0, max_tokens=12).text
    cut = model.generate(PROMPT, temperature=0, max_tokens=12, stop=[" France"])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(" France")]
    s = model.stream(PROMPT, temperature=0, max_tokens=50)
    next(s)
    assert model.engine.free_pages() < start
    s.close()  # abandoned early: its sequence is removed
    assert model.engine.free_pages() == start and not model.engine.seqs


def test_chat_session_reuses_cache_and_refuses_bad_input(model):
    chat = model.chat(system="You are terse.")
    first = chat.send("My name is Bob.", temperature=0, max_tokens=8)
    cached = len(model.engine.seqs[chat.seq].tokens)
    chat.send("What is my name?", temperature=0, max_tokens=8)
    assert chat.last is not None and len(chat.last.prompt) > cached
    # only the new turn was prefilled onto the cached sequence, and it answers as a fresh prefill would
    sid = model.engine.add_sequence()
    fresh = int(np.argmax(model.engine.prefill(sid, chat.last.prompt)))
    model.engine.remove_sequence(sid)
    assert chat.last.tokens[:1] == [fresh] or (not chat.last.tokens and fresh in chat.last.stop_ids)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first
    with pytest.raises(UserError, match="temperature"):
        chat.send("x", temperature=-1)
    with pytest.raises(UserError, match="context window"):
        chat.send("word " * 600)
    assert chat.messages[-1]["role"] == "assistant"  # the refused message was not kept
    chat.reset()
    assert chat.seq is None and not model.engine.seqs


def test_chat_cli_commands_never_reach_the_model():
    lines = [
        "Hi, my name is Bob.",
        "/help",
        "/stats",
        "/bogus",
        "What is my name?",
        "/reset",
        "/exit",
        "never",
    ]
    r = CliRunner().invoke(
        main,
        ["chat", "--temperature", "0", "--max-tokens", "8", "--stop", "."],
        input="\n".join(lines) + "\n",
    )
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2  # two replies: commands were not sent, nothing after /exit
    assert "/reset clear the history" in r.stderr and "unknown command /bogus" in r.stderr
    assert "generated" in r.stderr  # /stats
    assert "." not in r.stdout  # the stop string cut each reply


def test_phi3_jinja_renders_like_our_phi3_template(smol):
    """Phi-3's own template (verbatim, tests/test_tokenizer.py) through the Jinja path: the same text as our
    hand-written one (what `phi3 generate` rendered for Phi-3 checkpoints before)."""
    from test_tokenizer import PHI3_JINJA

    from toolkit.chat_template import render

    fmt = PromptFormat(
        tokenizer=smol.tokenizer(),
        jinja=PHI3_JINJA,
        template="phi3",
        special_tokens={"eos_token": "<|endoftext|>"},
        stop_ids=set(),
        defaults=GenerationOptions(),
    )
    for conv in CONVERSATIONS:
        assert fmt.render(conv) == render(conv, "phi3")


def test_convert_then_compile_through_the_api(tiny_ckpt, tmp_path):
    """`api.convert` / `api.compile` are what `phi3 convert` / `phi3 compile` run: the converted folder's
    scheme carries into the library, and a different scheme for that folder is refused before any work."""
    res = phi3.convert(str(tiny_ckpt), str(tmp_path / "w"), quantization="q4f32_1", progress=False)
    assert res.scheme == "q4f32_1" and (tmp_path / "w" / "tensor-cache.json").is_file()
    compiled = phi3.compile(str(tmp_path / "w"), str(tmp_path / "lib"), device="host-exact")
    assert compiled.manifest["quantization"] == "q4f32_1" and compiled.library.is_file()
    with pytest.raises(UserError, match="holds q4f32_1 weights"):
        phi3.compile(str(tmp_path / "w"), str(tmp_path / "lib2"), quantization="q4f16_1")
    assert not (tmp_path / "lib2").exists()
    with pytest.raises(UserError, match="--cuda-graph"):
        phi3.compile(str(tmp_path / "w"), str(tmp_path / "lib3"), cuda_graph=True)


@pytest.mark.parametrize("via", ["api", "cli"])
def test_load_opens_the_checkpoint_once(smol, model, monkeypatch, via):
    """`phi3.load` and `phi3 generate` hand the source they opened to the engine: opening parses the whole
    header (a GGUF's vocabulary), so a second open is time a user waits for nothing. On the embedded GGUF,
    whose library the `model` fixture has compiled."""
    import toolkit.checkpoint as checkpoint

    path = str(smol.path)

    opened = []
    real = checkpoint.open_model

    def counting(model, *args, **kwargs):
        opened.append(str(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open_model", counting)
    if via == "api":
        out = phi3.load(path, context_window=64, max_batch_size=1).generate("hi", max_tokens=2, temperature=0)
        assert out.prompt_tokens > 0 and out.finish_reason in ("stop", "length")
    else:
        args = ["generate", path, "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and "stop:" in r.output, r.output
    assert opened.count(path) == 1, opened
