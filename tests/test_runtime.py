"""Runtime behaviour: sampling, host logits, perplexity, and the generate CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from engine_util import build_engine
from tiny import load_hf_model, make_tiny_checkpoint
from tiny_tokenizer import write_tiny_tokenizer

from toolkit.cli import main
from toolkit.runtime.options import GenerationOptions
from toolkit.runtime.perplexity import perplexity
from toolkit.runtime.sampling import TokenSampler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    ckpt = make_tiny_checkpoint(d / "ckpt", "medium")
    write_tiny_tokenizer(ckpt, 512)
    return ckpt, build_engine(ckpt, d / "lib")


def test_sampler_greedy_seeded_and_top_p():
    logits = np.array([0.0, 3.0, 2.9, -5.0])
    assert TokenSampler(GenerationOptions(temperature=0))(logits) == 1

    def draws(seed: int) -> list[int]:
        s = TokenSampler(GenerationOptions(temperature=1.0, top_p=1.0, seed=seed))
        return [s(logits) for _ in range(50)]

    assert draws(7) == draws(7)  # same seed, same tokens
    assert draws(7) != draws(8)
    # top_p=0.5: the top token alone holds > 50% of the mass at temperature 0.1 -> always token 1
    s = TokenSampler(GenerationOptions(temperature=0.1, top_p=0.5, seed=0))
    assert {s(logits) for _ in range(50)} == {1}
    # top_p keeps {1, 2} (cum mass ~0.97 before token 0): token 3 never drawn, token 2 sometimes
    s = TokenSampler(GenerationOptions(temperature=1.0, top_p=0.9, seed=0))
    seen = {s(logits) for _ in range(300)}
    assert seen == {1, 2}


def test_host_logits_are_views_that_later_steps_leave_alone(tiny):
    """On the CPU `decode` returns a view of the forward's output tensor, not a copy; each step's array keeps
    its values after later steps and equals what a fresh run of the same tokens computes."""
    _, eng = tiny
    ids = [5, 17, 99, 3]
    sid = eng.add_sequence()
    try:
        kept = [eng.prefill(sid, ids)]
        tok = int(np.argmax(kept[-1]))
        for _ in range(4):
            kept.append(eng.decode(sid, tok))
            tok = int(np.argmax(kept[-1]))
        fed = eng.seqs[sid].tokens[len(ids) :]
    finally:
        eng.remove_sequence(sid)
    for a in kept[1:]:
        while isinstance(a.base, np.ndarray):  # reshapes of the array numpy made
            a = a.base
        assert not a.flags.owndata  # the memory is the VM tensor's (a .numpy() copy owns its own)
    snapshot = [a.copy() for a in kept]
    sid = eng.add_sequence()
    try:
        fresh = [eng.prefill(sid, ids)] + [eng.decode(sid, t) for t in fed]
    finally:
        eng.remove_sequence(sid)
    for a, b, c in zip(kept, snapshot, fresh):
        np.testing.assert_array_equal(a, b)  # untouched by the second run's steps
        np.testing.assert_array_equal(a, c)  # same library, same tokens: the same numbers


def test_perplexity_matches_transformers_same_windows(tiny):
    ckpt, eng = tiny
    hf = load_hf_model(ckpt)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, 70).tolist()
    res = perplexity(eng, ids, context=32, stride=16)
    by_decode = perplexity(eng, ids, context=32, stride=16, through="decode")
    nll, n, start = 0.0, 0, 0
    with torch.no_grad():
        while True:
            w = ids[start : start + 32]
            logp = torch.log_softmax(hf(torch.tensor([w])).logits[0].double(), -1).numpy()
            first = 0 if start == 0 else 15
            tg = np.array(w[first + 1 :])
            nll -= logp[np.arange(first, len(w) - 1), tg].sum()
            n += len(tg)
            if start + 32 >= len(ids):
                break
            start += 16
    assert res.tokens_scored == n == len(ids) - 1
    # fp32 logits agree to ~1e-6 relative; the mean NLL is then equal to ~1e-5
    assert math.isclose(res.perplexity, math.exp(nll / n), rel_tol=1e-4)
    assert by_decode.tokens_scored == n and math.isclose(by_decode.perplexity, res.perplexity, rel_tol=1e-4)
    # disjoint windows whose last one is a single token (no history, nothing to score): two windows
    disjoint = perplexity(eng, ids[:65], context=32, stride=32)
    assert (disjoint.windows, disjoint.tokens_scored) == (2, 62)


def test_generate_cli_end_to_end_is_reproducible(tiny, tmp_path, monkeypatch):
    ckpt, _ = tiny
    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path / "cache"))
    args = [
        "generate",
        str(ckpt),
        "--prompt",
        "Hello",
        "-q",
        "q0f32",
        "--max-tokens",
        "8",
        "--seed",
        "5",
        "--no-stats",
    ]
    r1 = CliRunner().invoke(main, args)
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(main, args)  # second run: cached library
    assert r2.stdout == r1.stdout  # stderr: notices of the first run's compile (e.g. records for another CPU)
    greedy = CliRunner().invoke(main, [*args[:-3], "--temperature", "0", "--raw", "--no-stats"])
    assert greedy.exit_code == 0, greedy.output


def test_generate_cli_bad_model_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    r = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "x"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0]
    assert "Traceback" not in r.output
