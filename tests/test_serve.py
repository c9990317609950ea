"""`phi3 serve` on 127.0.0.1 with the embedded SmolLM2, driven by the real OpenAI client and raw HTTP: greedy
outputs equal the API's and `phi3 generate`'s, 16 concurrent streams equal their single-request outputs,
limits answer 429/400 at once, and a client that disconnects mid-stream gets its KV pages back to the pool.
The scheduler's chunked prefill is checked step by step: running streams decode between a long prompt's
chunks."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner

import toolkit.api as phi3
from toolkit.cli import main
from toolkit.serve.scheduler import Scheduler
from toolkit.serve.server import BackgroundServer

# one xdist worker runs every test that compiles and loads the embedded model, so the other never waits on it
pytestmark = pytest.mark.xdist_group("embedded-model")

KEY = "test-key"
PROMPT = "What is the capital of France?"
MAX_SEQ = 16
CHUNK = 16  # the prefill chunk: every chat prompt (30+ tokens) is fed in pieces, by the server over steps
PASSAGE = (
    "The river rose slowly through the night, and by morning the low fields east of the town were under "
    "water. Farmers moved their animals to the hills, the school closed, and the baker handed out bread "
    "to anyone who came to the door. By the third day the water began to fall again."
)
PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What animal says moo?",
    "Name a planet.",
    "What is the opposite of hot?",
    "What color is the sky?",
    "How many legs does a spider have?",
    "What is the largest ocean?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    # long ones: prefilled chunk by chunk while the short ones decode
    f"Summarize in one sentence: {PASSAGE}",
    f"Who handed out bread? {PASSAGE}",
    f"{PASSAGE} What happened on the third day?",
    f"{PASSAGE} {PASSAGE} How many days passed?",
]


@pytest.fixture(scope="module")
def model():
    return phi3.load(context_window=512, max_batch_size=MAX_SEQ, prefill_chunk=CHUNK)


@pytest.fixture(scope="module")
def server(model):
    # max_queue 0: with every slot busy the next request is refused at once (tested below)
    with BackgroundServer(model, max_sequences=MAX_SEQ, max_queue=0, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def chat(client, model, content, **kw):
    return client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def test_models_and_health(server, model):
    with http(server) as h:
        assert h.get("/v1/models").json()["data"][0]["id"] == model.name
        health = h.get("/health").json()
    assert health["status"] == "ok" and health["free_pages"] == health["total_pages"] > 0


def test_chat_greedy_equals_api_and_cli_streamed_or_not(server, client, model):
    api = model.generate(PROMPT, temperature=0, max_tokens=16)
    r = chat(client, model, PROMPT, max_tokens=16)
    assert r.choices[0].message.content == api.text
    assert r.choices[0].finish_reason == api.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (api.prompt_tokens, api.completion_tokens)
    chunks = list(
        chat(client, model, PROMPT, max_tokens=16, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == api.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == api.completion_tokens
    cli = CliRunner().invoke(
        main, ["generate", "-p", PROMPT, "--temperature", "0", "--max-tokens", "16", "--no-stats"]
    )
    assert cli.exit_code == 0 and cli.output == api.text + "\n"


def test_completions_max_tokens_and_stop(server, client, model):
    raw = "The capital of France is"
    api = model.generate(raw, raw=True, temperature=0, max_tokens=6)
    r = client.completions.create(model=model.name, prompt=raw, temperature=0, max_tokens=6)
    assert r.choices[0].text == api.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    word = api.text.split()[1]
    r = client.completions.create(model=model.name, prompt=raw, temperature=0, max_tokens=6, stop=[word])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == api.text[: api.text.index(word)]
    streamed = client.completions.create(
        model=model.name, prompt=raw, temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == api.text
    r = chat(client, model, PROMPT, max_tokens=16, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}, "vocabulary"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n=1"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, "not served"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": [{"role": "bogus", "content": "x"}]}, "role 'bogus' is not one of system"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name must be a string"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "context window"),
        ([1, 2], "JSON object"),
        # a JSON escape of a lone surrogate is no text (the tokenizer's TypeError was a 500)
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "not UTF-8"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["\udcff"]}, "stop strings"),
        # output we do not produce is refused, not answered without it
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "'response_format'",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "'tools'",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "'tool_choice'"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}, "'logprobs'"),
    ],
)
def test_bad_requests_are_400_with_a_message(server, body, needle):
    with http(server) as h:  # json.dumps escapes a lone surrogate (httpx's json= cannot encode it)
        r = h.post(
            "/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "option, value",
    [
        ("temperature", "hot"),
        ("top_p", 0),
        ("seed", -1),
        ("stop", [f"s{i}" for i in range(17)]),  # more than MAX_STOP_STRINGS
        ("logit_bias", {"99999": 1}),
        ("logit_bias", {"5": 1000}),
    ],
)
def test_a_bad_sampling_option_is_named_as_the_errors_param(server, option, value):
    """As OpenAI's errors do: a client can point at the field without parsing the message."""
    body = {"messages": [{"role": "user", "content": "x"}], option: value}
    with http(server) as h:
        r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == option, r.text


@pytest.mark.parametrize(
    "chat, field, asks, off",
    [
        (True, "tools", [{"type": "function", "function": {"name": "f"}}], []),
        (True, "functions", [{"name": "f"}], None),
        (True, "tool_choice", "auto", "none"),
        (True, "function_call", {"name": "f"}, "none"),
        (True, "response_format", {"type": "json_schema", "json_schema": {}}, {"type": "text"}),
        (True, "logprobs", True, False),
        (True, "top_logprobs", 3, 0),
        (True, "modalities", ["text", "audio"], ["text"]),
        (True, "audio", {"voice": "alloy"}, None),
        (False, "echo", True, False),
        (False, "suffix", "}", ""),
        (False, "best_of", 2, 1),
        (False, "logprobs", 0, None),  # the legacy API's 0 still returns the chosen tokens' logprobs
    ],
)
def test_fields_asking_for_output_we_do_not_produce_are_refused_and_their_off_values_pass(
    chat, field, asks, off
):
    from toolkit.serve.protocol import BadRequest, parse

    base = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    with pytest.raises(BadRequest, match=f"'{field}' is not supported") as e:
        parse({**base, field: asks}, chat=chat)
    assert e.value.param == field
    parse({**base, field: off}, chat=chat)  # what SDKs send when the feature is not asked for


def test_malformed_json_unknown_model_and_auth(server, client, model):
    with http(server) as h:
        r = h.post(
            "/v1/completions", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key
    with pytest.raises(openai.BadRequestError, match="not served"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_fault_of_ours_is_a_json_500(server, model, monkeypatch):
    """An unexpected exception in a request is OpenAI's JSON error shape with status 500 (Starlette's default
    was a plain-text "Internal Server Error", which clients' SDKs cannot parse), and the server goes on."""

    def broken(**changes):
        raise RuntimeError("planted fault")

    monkeypatch.setattr(model, "options", broken)
    with http(server) as h:
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "RuntimeError: planted fault" in err["message"]
    monkeypatch.undo()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _stream_text(server, model, prompt: str, max_tokens: int = 16, started=None, release=None) -> str:
    """A raw SSE chat stream. With `started`/`release` (Events): signal the first content, then hang up
    (close the connection mid-stream) once `release` is set."""
    body = {
        "model": model.name,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    out = []
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                out.append(delta["content"])
                if started is not None:
                    started.set()
                    release.wait(60)
                    break  # leaving the with-blocks closes the connection
    return "".join(out)


def _health_when(h: httpx.Client, cond, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = h.get("/health").json()
        if cond(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_16_concurrent_streams_equal_single_requests(server, model):
    assert len(PROMPTS) == MAX_SEQ == 16
    # each alone, through the API on its own sequence, while the server is idle
    singles = [model.generate(p, temperature=0, max_tokens=16).text for p in PROMPTS]
    assert max(len(model.prompt_ids(p)) for p in PROMPTS) > 4 * CHUNK  # some are prefilled in 5+ chunks
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outs = list(pool.map(lambda p: _stream_text(server, model, p), PROMPTS, timeout=120))
    assert all(outs)
    assert outs == singles


def test_full_server_refuses_at_once_and_hangups_free_every_sequence(server, model):
    started = [threading.Event() for _ in range(MAX_SEQ)]
    release = threading.Event()
    with http(server) as h, ThreadPoolExecutor(MAX_SEQ) as pool:
        start = h.get("/health").json()
        futures = [
            pool.submit(_stream_text, server, model, f"Write a long story number {i}.", 400, e, release)
            for i, e in enumerate(started)
        ]
        try:
            assert all(e.wait(60) for e in started)
            assert _health_when(h, lambda x: x["running"] == MAX_SEQ)["running"] == MAX_SEQ
            t0 = time.monotonic()
            r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            assert time.monotonic() - t0 < 5  # refused, not queued
        finally:
            release.set()
        for f in futures:
            f.result(timeout=60)
        end = _health_when(h, lambda x: x["running"] == 0 and x["free_pages"] == start["free_pages"])
    assert end["running"] == 0 and end["free_pages"] == start["free_pages"] == start["total_pages"]


def test_disconnect_mid_stream_frees_the_sequence(server, model):
    started, release = threading.Event(), threading.Event()
    with http(server) as h, ThreadPoolExecutor(1) as pool:
        start = h.get("/health").json()["free_pages"]
        f = pool.submit(
            _stream_text, server, model, "Write a long story about a dragon.", 400, started, release
        )
        assert started.wait(60)
        mid = _health_when(h, lambda x: x["running"] == 1)
        assert mid["running"] == 1 and mid["free_pages"] < start
        release.set()
        assert f.result(timeout=60)
        end = _health_when(h, lambda x: x["running"] == 0 and x["free_pages"] == start)
    assert end["running"] == 0 and end["free_pages"] == start
    assert not model.engine.seqs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_phi3_serve_command_in_a_subprocess(model):
    import os
    import subprocess
    import sys

    port = _free_port()
    cmd = [sys.executable, "-m", "toolkit.cli", "serve", "--port", str(port), "--max-sequences", "2"]
    cmd += ["--context-window", "256", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health is not None and health["status"] == "ok", proc.stderr.read() if proc.poll() else ""
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=16
        )
        assert r.choices[0].message.content == model.generate(PROMPT, temperature=0, max_tokens=16).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_address_it_cannot_listen_on_is_one_line_before_loading(monkeypatch):
    """A port in use or a host that does not resolve: one line naming them, before the model is loaded. It
    used to load the model, print "serving ... on", then end in uvicorn's log lines and exit 3."""
    import socket

    import toolkit.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded the model"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(main, ["serve", "--port", str(port)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert f"--port {port}: cannot listen there" in lines[0], r.output
    r = CliRunner().invoke(main, ["serve", "--host", "no-such-host.invalid"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "--host no-such-host.invalid" in lines[0], r.output


def test_serve_flags_are_checked_before_loading():
    r = CliRunner().invoke(main, ["serve", "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    r = CliRunner().invoke(main, ["serve", "--max-sequences", "0"])
    assert r.exit_code == 2 and "--max-sequences" in r.output
    r = CliRunner().invoke(main, ["serve", "--prefill-chunk", "0"])
    assert r.exit_code == 2 and "--prefill-chunk" in r.output
    r = CliRunner().invoke(main, ["serve", "--context-window", "64", "--prefill-chunk", "128"])
    assert r.exit_code == 2 and "--prefill-chunk" in r.output and "--context-window 64" in r.output
    args = ["serve", "--port", "0", "--context-window", "100000", "--prefill-chunk", "9000"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "--prefill-chunk 9000 exceeds the library's prefill chunk (8192)" in r.output


def test_token_id_prompts_and_logit_bias(server, client, model):
    raw = "The capital of France is"
    ids = model.prompt_ids(raw, raw=True)
    by_text = client.completions.create(model=model.name, prompt=raw, temperature=0, max_tokens=5)
    by_ids = client.completions.create(model=model.name, prompt=ids, temperature=0, max_tokens=5)
    assert by_ids.choices[0].text == by_text.choices[0].text
    forced = model.tokenizer.encode(" banana", add_bos=False)[0]
    r = client.completions.create(
        model=model.name, prompt=raw, temperature=0, max_tokens=3, logit_bias={str(forced): 100}
    )
    assert r.choices[0].text == model.tokenizer.decode([forced] * 3)
    with http(server) as h:
        r = h.post("/v1/completions", json={"prompt": [ids[0], -1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# -- the scheduler, driven step by step (no thread, no HTTP): what runs between a long prompt's chunks ----


class RecordingEngine:
    """The model's engine, with every prefill / decode_batch call written to `events`."""

    def __init__(self, engine, events: list) -> None:
        self._engine, self._events = engine, events

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, sid, ids, **kw):
        self._events.append(("prefill", sid, len(ids)))
        return self._engine.prefill(sid, ids, **kw)

    def decode_batch(self, sids, tokens, draws=None):
        self._events.append(("decode", tuple(sids)))
        return self._engine.decode_batch(sids, tokens, draws)


def _job(sched, model, events, name: str, ids: list[int], max_tokens: int):
    gen = model.new_generation(ids, model.options(temperature=0, max_tokens=max_tokens))
    pieces: list[str] = []

    def sink(item):
        assert not isinstance(item, Exception), item
        pieces.append(item.text)
        events.append(("token", name))

    return sched.submit(gen, sink), gen, pieces


def test_chunked_prefill_interleaves_decode_steps(model):
    events: list = []
    eng = RecordingEngine(model.engine, events)
    sched = Scheduler(eng, max_sequences=4, max_queue=4)
    free = model.engine.free_pages()
    story = "Write a long story about a dragon."
    single_a = model.generate(story, temperature=0, max_tokens=40)
    assert single_a.finish_reason == "length"  # A is still decoding throughout B's prefill
    long_ids = model.prompt_ids(f"{PASSAGE} {PASSAGE}", raw=True)
    single_b = model.generate(f"{PASSAGE} {PASSAGE}", raw=True, temperature=0, max_tokens=8)
    n_chunks = -(-len(long_ids) // CHUNK)
    assert n_chunks >= 5

    job_a, gen_a, out_a = _job(sched, model, events, "A", model.prompt_ids(story), 40)
    while ("token", "A") not in events:
        assert sched.step()
    job_b, gen_b, out_b = _job(sched, model, events, "B", long_ids, 8)
    while gen_a.finish_reason is None or gen_b.finish_reason is None:
        assert sched.step()
    assert not sched.step()  # nothing left

    b_chunks = [i for i, e in enumerate(events) if e[:2] == ("prefill", job_b.sid)]
    last = len(long_ids) - CHUNK * (n_chunks - 1)
    assert [events[i][2] for i in b_chunks] == [CHUNK] * (n_chunks - 1) + [last]
    for lo, hi in zip(b_chunks, b_chunks[1:]):  # between two chunks of B: a decode step of A, and A's token
        between = events[lo + 1 : hi]
        assert ("decode", (job_a.sid,)) in between and ("token", "A") in between
    assert events.index(("token", "B")) > b_chunks[-1]
    assert ("".join(out_a), "".join(out_b)) == (single_a.text, single_b.text)
    assert model.engine.free_pages() == free and not model.engine.seqs


def test_cancel_during_chunked_prefill_frees_the_sequence(model):
    events: list = []
    eng = RecordingEngine(model.engine, events)
    sched = Scheduler(eng, max_sequences=2, max_queue=2)
    free = model.engine.free_pages()
    job, gen, out = _job(sched, model, events, "C", model.prompt_ids(f"{PASSAGE} {PASSAGE}", raw=True), 8)
    assert sched.step() and sched.stats.prefilling == 1
    assert model.engine.free_pages() < free and model.engine.sequence_length(job.sid) == CHUNK
    sched.cancel(job)
    assert sched.step()  # the step removes it, feeding nothing more
    assert sched.stats.prefilling == 0 and not out and not sched.step()
    assert [e for e in events if e[0] == "prefill"] == [("prefill", job.sid, CHUNK)]
    assert model.engine.free_pages() == free and not model.engine.seqs
