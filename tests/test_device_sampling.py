"""The engine's device-sampling path (runtime/device_sampling.py) against host sampling on the same logits.

The library is a host build that carries the GPU sampler's Relax functions (`gpu_sampler=True`): the same
graphs a GPU preset compiles, lowered for the CPU, so the engine's calls, buffers and row bookkeeping run
here; tests/test_tvm_runtime_plugins.py repeats the check on lavapipe with the GPU kernels.
References are numpy in float64 (TokenSampler and a direct inverse-CDF pick), and the tokens must be equal:
a float32 boundary moving past the drawn number has a chance of about 1e-7 per token at these sizes.
"""

from __future__ import annotations

from collections import Counter
from unittest import mock

import numpy as np
import pytest
import tvm
from click.testing import CliRunner
from tiny import make_tiny_checkpoint
from tiny_tokenizer import write_tiny_tokenizer

from toolkit.api import Model
from toolkit.checkpoint import open_model
from toolkit.cli import main
from toolkit.compile import compile_model as compile_model_module
from toolkit.compile.attach_decode_sample import FUSED, attach_decode_sample
from toolkit.compile.compile_model import compile_model
from toolkit.errors import UserError
from toolkit.runtime.device_sampling import FUSED_STEPS, DeviceSampler, Draw
from toolkit.runtime.engine import CacheOptions, Engine
from toolkit.runtime.options import GenerationOptions
from toolkit.runtime.sampling import TokenSampler
from toolkit.runtime.weights import load_params
from toolkit.serve.scheduler import Scheduler

PROMPT = [5, 17, 99, 3, 250, 11, 42, 7, 300, 8]  # 10 tokens: decoding crosses LongRoPE's switch at 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """mini-128k (LongRoPE, original_max 16) with the sampler compiled in; an engine that samples on its
    device (the CPU here), built once."""
    d = tmp_path_factory.mktemp("devsample")
    ckpt = make_tiny_checkpoint(d / "ckpt", "mini-128k")
    src = open_model(ckpt)
    write_tiny_tokenizer(ckpt, src.config.vocab_size)
    src = open_model(ckpt)
    seen = {}  # the module before and after attach_decode_sample, for the fused steps' test

    def spy(mod):
        seen["before"], seen["after"] = mod, attach_decode_sample(mod)
        return seen["after"]

    with mock.patch.object(compile_model_module, "attach_decode_sample", spy):
        compiled = compile_model(src.config, "q0f32", "host-exact", d / "lib", gpu_sampler=True)
    lib = tvm.runtime.load_module(str(compiled.library))
    eng = Engine(
        lib,
        load_params(src, compiled, tvm.cpu()),
        src.config,
        dtype=compiled.manifest["dtype"],
        cache=CacheOptions(max_batch_size=4, context_window=64, prefill_chunk=32),
        device_sampling=True,
    )
    eng.compiled, eng.attach_seen = compiled, seen
    return src, eng


def _pick(logits: np.ndarray, d: Draw) -> int:
    """float64 reference: argmax, or the inverse CDF at d.uniform over softmax(logits / T) in id order, cut
    to the top-k logits (ties kept), then the top-p nucleus of a full stable sort (the shortest ranked
    prefix whose mass reaches top_p), then p >= min_p * max p."""
    if d.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / d.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if 0 < d.top_k < z.size:
        p[z < np.sort(z)[-d.top_k]] = 0
        p /= p.sum()
    if d.top_p < 1:
        ranked = np.argsort(-p, kind="stable")
        cut = np.zeros_like(p)
        nucleus = ranked[: np.searchsorted(np.cumsum(p[ranked]), d.top_p) + 1]
        cut[nucleus] = p[nucleus]
        p = cut
    p[p < d.min_p * p.max()] = 0
    keep = np.flatnonzero(p)
    cdf = np.cumsum(p[keep])
    return int(keep[np.searchsorted(cdf / cdf[-1], d.uniform, side="right")])


def test_greedy_on_the_device_is_the_host_argmax_across_the_longrope_switch(tiny):
    _, eng = tiny
    host, dev = eng.add_sequence(), eng.add_sequence()
    greedy = Draw(0.0, 0.0)
    try:
        tok_h = int(np.argmax(eng.prefill(host, PROMPT)))
        tok_d = eng.prefill(dev, PROMPT, draw=greedy)
        assert isinstance(tok_d, int) and tok_d == tok_h
        for _ in range(10):  # positions 10..19: the switch at 16 re-encodes each sequence once
            tok_h = int(np.argmax(eng.decode(host, tok_h)))
            tok_d = eng.decode(dev, tok_d, greedy)
            assert tok_d == tok_h
        assert eng.seqs[host].tokens == eng.seqs[dev].tokens and eng.sequence_length(dev) == 20
    finally:
        eng.remove_sequence(host)
        eng.remove_sequence(dev)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.7, top_p=1.0),
        dict(temperature=1.3, top_p=1.0),
        dict(temperature=0.7, top_p=0.95),
        dict(temperature=1.3, top_p=0.5),
        dict(temperature=1.5, top_p=1.0, top_k=40),
        dict(temperature=1.5, top_p=0.95, top_k=40, min_p=0.05),  # llama.cpp's defaults, hotter
    ],
)
def test_seeded_sampling_draws_the_host_samplers_tokens(tiny, knobs):
    """A seed gives the same tokens whether TokenSampler samples the logits or the device draws from the
    number it hands over (its stream advances the same way), with and without the cuts."""
    _, eng = tiny
    for seed in (0, 1, 2):
        opts = GenerationOptions(seed=seed, **knobs)
        host_s, dev_s = TokenSampler(opts, PROMPT), TokenSampler(opts, PROMPT)
        host, dev = eng.add_sequence(), eng.add_sequence()
        try:
            th, td = host_s(eng.prefill(host, PROMPT)), eng.prefill(dev, PROMPT, draw=dev_s.device_draw())
            toks_h, toks_d = [th], [td]
            for _ in range(12):
                toks_h.append(host_s(eng.decode(host, toks_h[-1])))
                toks_d.append(eng.decode(dev, toks_d[-1], dev_s.device_draw()))
        finally:
            eng.remove_sequence(host)
            eng.remove_sequence(dev)
        assert toks_d == toks_h, (seed, toks_h, toks_d)
        assert len(set(toks_h)) > 3  # really sampled, not one token over and over


def test_a_batch_mixes_device_rows_and_host_rows(tiny):
    """decode_batch with draws: tokens for the rows with one, logits for the rows without, each what the
    same batch without draws gives (its logits, picked in float64)."""
    _, eng = tiny
    draws = [None, Draw(0.0, 0.0), Draw(0.8, 0.37, 0.9), Draw(1.1, 0.999, 1.0, 30, 0.02)]
    prompts = [PROMPT[: 4 + i] for i in range(4)]
    ref = [eng.add_sequence() for _ in draws]
    dev = [eng.add_sequence() for _ in draws]
    try:
        for sids in (ref, dev):
            for s, p in zip(sids, prompts):
                eng.prefill(s, p)
        tokens = [1, 2, 3, 4]
        logits = eng.decode_batch(ref, tokens)
        out = eng.decode_batch(dev, tokens, draws)
        np.testing.assert_array_equal(out[0], logits[0])
        assert out[1:] == [_pick(logits[i], draws[i]) for i in (1, 2, 3)]
        assert all(isinstance(t, int) for t in out[1:])
    finally:
        for s in ref + dev:
            eng.remove_sequence(s)


def test_the_fused_step_draws_what_the_three_calls_draw(tiny):
    """decode_and_sample / batch_decode_and_sample (compile/attach_decode_sample.py): one library call per
    step draws the tokens that embed, the forward and sample_tokens called one after the other draw, for one
    sequence and for three in a batch, across the LongRoPE switch (where a sequence is re-encoded by a
    prefill instead). A library without them, from before, takes the three calls."""
    _, eng = tiny
    assert {FUSED_STEPS[fwd] for fwd in eng._fused} == set(FUSED) == set(FUSED_STEPS.values())
    fused, calls = dict(eng._fused), Counter()

    def counted(fwd):
        def call(*args):
            calls[fwd] += 1
            return fused[fwd](*args)

        return call

    def run(batch: int) -> list[list[int]]:
        rng = np.random.default_rng(batch)
        knobs = [(0.0, 1.0, 0, 0.0), (0.9, 0.95, 0, 0.0), (1.4, 0.9, 20, 0.05)]
        draw = lambda k: Draw(knobs[k][0], float(rng.random()), *knobs[k][1:])  # noqa: E731
        sids = [eng.add_sequence() for _ in range(batch)]
        try:
            toks = [[eng.prefill(s, PROMPT[: 8 + k], draw=draw(k))] for k, s in enumerate(sids)]
            for _ in range(9):  # past position 16 for every sequence
                if batch == 1:
                    toks[0].append(eng.decode(sids[0], toks[0][-1], draw(1)))
                else:
                    drawn = eng.decode_batch(sids, [t[-1] for t in toks], [draw(k) for k in range(batch)])
                    for t, d in zip(toks, drawn):
                        t.append(d)
        finally:
            for s in sids:
                eng.remove_sequence(s)
        return toks

    eng._fused = {fwd: counted(fwd) for fwd in fused}
    try:
        one, three = run(1), run(3)
    finally:
        eng._fused = fused
    # one sequence: 9 steps, one of them the re-encode at the switch; three: the switch comes one step
    # apart for each (prompts of 8, 9, 10), so 6 steps take all three rows and 3 steps two
    assert calls == {"decode": 8, "batch_decode": 9}, calls
    eng._fused = {}
    try:
        assert (run(1), run(3)) == (one, three)
    finally:
        eng._fused = fused
    assert all(len(set(t)) > 3 for t in three[1:]), three  # sampled, not one token over and over


def test_the_fused_steps_launch_only_the_kernels_of_the_functions_they_join(tiny):
    """attach_decode_sample adds the two functions and no kernel: each fused step calls exactly the kernels
    embed, its forward and sample_tokens call, in that order."""
    _, eng = tiny
    before, after = eng.attach_seen["before"], eng.attach_seen["after"]

    def names(mod, kind) -> set[str]:
        return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, kind)}

    assert names(after, tvm.tirx.PrimFunc) == names(before, tvm.tirx.PrimFunc)
    assert names(after, tvm.relax.Function) == names(before, tvm.relax.Function) | set(FUSED)

    def launched(f) -> list[str]:
        found = []
        tvm.relax.analysis.post_order_visit(
            f.body,
            lambda e: (
                found.append(e.args[0].name_hint)
                if isinstance(e, tvm.relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
                else None
            ),
        )
        return found

    for name, fwd in FUSED.items():
        parts = [launched(before[n]) for n in ("embed", fwd, "sample_tokens")]
        assert all(parts), name
        assert launched(after[name]) == [k for p in parts for k in p], name


def test_a_number_just_below_one_lands_on_a_token_with_probability(tiny):
    """float32 rounds 1 - 1e-9 up to 1.0 and float32 sums can fall short of 1: the draw still lands on the
    last token with any probability, never on a token of zero probability at the end of the vocabulary;
    greedy ties go to the lowest id."""
    _, eng = tiny
    v = eng.vocab
    logits = np.full((3, 1, v), -1e4, np.float32)  # exp(-1e4 / T) is 0 in float32: only 5 tokens count
    hot = [3, 40, 41, 200, 301]
    logits[:, 0, hot] = [2.0, 1.5, 1.0, 0.5, 0.25]
    logits[2, 0, 41] = 2.0  # a tie with token 3
    u = 1 - 1e-9
    got = eng.sampler.sample(
        tvm.runtime.tensor(logits), [(0, Draw(1.0, u)), (1, Draw(0.5, 0.0)), (2, Draw(0.0, 0.0))]
    )
    assert got == [301, 3, 3]


def test_the_top_p_cut_keeps_ties_at_its_edge_by_lower_id(tiny):
    """p = 0.1 (id 5), 0.2 (ids 10, 50, 90), 0.3 (id 70); top_p 0.6: ranked 70, 10, 50, 90, 5 with running
    sums 0.3, 0.5, 0.7, so the nucleus is {70, 10, 50}, and id 90 (tied with 10 and 50) is left out. Drawn
    in id order over the nucleus: u = 0.95 lands on 70 (on 90 without the cut, or with the wrong tie), 0.5
    on 50. Greedy ignores top_p; top_p 1 keeps 90."""
    _, eng = tiny
    logits = np.full((4, 1, eng.vocab), -1e4, np.float32)
    hot = {5: 0.1, 10: 0.2, 50: 0.2, 70: 0.3, 90: 0.2}
    logits[:, 0, list(hot)] = np.log(np.array(list(hot.values()), np.float32))
    cases = [
        (
            [Draw(1.0, 0.95, 0.6), Draw(1.0, 0.5, 0.6), Draw(1.0, 0.95, 1.0), Draw(0.0, 0.0, 0.6)],
            [70, 50, 90, 70],
        ),
        ([Draw(1.0, 0.99, 0.25), Draw(1.0, 0.99, 0.75)], [70, 90]),  # only 70; all three ties
    ]
    for draws, expected in cases:
        got = eng.sampler.sample(tvm.runtime.tensor(logits), list(enumerate(draws)))
        assert got == expected == [_pick(logits[i, 0], d) for i, d in enumerate(draws)]


def test_top_k_and_min_p_cut_on_the_device(tiny):
    """Top-k keeps every token tied with the k-th logit; min-p keeps p >= min_p * max p; with top-p between
    them as the host sampler orders the three. Same hot tokens as above (ids 5, 10, 50, 70, 90 at 0.1,
    0.2, 0.2, 0.2, 0.3 of the mass)."""
    _, eng = tiny
    logits = np.full((4, 1, eng.vocab), -1e4, np.float32)
    hot = {5: 0.1, 10: 0.2, 50: 0.2, 70: 0.3, 90: 0.2}
    logits[:, 0, list(hot)] = np.log(np.array(list(hot.values()), np.float32))
    draws = [
        Draw(1.0, 0.99, 1.0, 2),  # k 2: 70 and the three 0.2 ties; u 0.99 -> 90, the last of them
        Draw(1.0, 0.0, 1.0, 1),  # k 1: only 70
        Draw(1.0, 0.99, 1.0, 0, 0.5),  # p >= 0.15: the 0.1 token goes; 90 still last
        Draw(1.0, 0.6, 0.4, 2, 0.0),  # k 2 keeps 0.9 of the mass; top-p 0.4 of it (0.36): 70 and 10
    ]
    got = eng.sampler.sample(tvm.runtime.tensor(logits), list(enumerate(draws)))
    assert got == [90, 70, 90, 70] == [_pick(logits[i, 0], d) for i, d in enumerate(draws)]
    low = eng.sampler.sample(tvm.runtime.tensor(logits[:1]), [(0, Draw(1.0, 0.05, 1.0, 0, 0.5))])
    assert low == [10] != [_pick(logits[0, 0], Draw(1.0, 0.05))]  # without min-p, 5 comes first


def test_which_options_draw_on_the_device():
    assert TokenSampler(GenerationOptions(temperature=0.7, top_p=1.0)).fits_device()
    assert TokenSampler(GenerationOptions(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05)).fits_device()
    assert TokenSampler(GenerationOptions(temperature=0, top_p=0.5)).fits_device()  # greedy: no cut
    draw = TokenSampler(
        GenerationOptions(temperature=0.7, top_p=0.95, top_k=9, min_p=0.1, seed=0)
    ).device_draw()
    assert draw == Draw(0.7, np.random.default_rng(0).random(), 0.95, 9, 0.1)
    assert not TokenSampler(GenerationOptions(temperature=0.7, top_p=1 - 1e-9)).fits_device()  # float32: 1
    for o in (
        dict(logit_bias={3: 1.0}),
        dict(frequency_penalty=0.5),
        dict(top_p=1.0, repetition_penalty=1.1),
    ):
        s = TokenSampler(GenerationOptions(temperature=0.7, seed=0, **o), prompt=[4, 9])
        # a library without adjust_logits: the host, and the seed's stream is left as it was
        assert s.device_draw(adjusts=False) is None
        d = s.device_draw()
        assert d.uniform == np.random.default_rng(0).random() and d.top_p == o.get("top_p", 0.95)
        assert d.adjust is not None


def _rows(a) -> dict[int, tuple]:
    return {t: (b, c, n) for t, b, c, n in zip(a.tokens.tolist(), a.bias.tolist(), a.covered, a.counts)}


def test_a_draws_adjustment_lists_each_token_once():
    """The rows adjust_logits gets: each token the bias, the repetition penalty (prompt and generated) or the
    frequency / presence penalties (generated only) touch, once, with its bias, coverage and count; kept up
    to date across tokens accepted after the first draw."""
    o = GenerationOptions(
        temperature=1.0,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.2,
        logit_bias={7: 2.0, 100: -1.5},
        seed=0,
    )
    s = TokenSampler(o, prompt=[9, 4, 9])
    s.accept(7)
    first = s.device_draw().adjust
    assert _rows(first) == {4: (0, 1, 0), 7: (2, 1, 1), 9: (0, 1, 0), 100: (-1.5, 0, 0)}
    for t in (50, 7) + tuple(range(200, 300)):  # past the rows' first capacity
        s.accept(t)
    a = s.device_draw().adjust
    assert len(a.tokens) == len(set(a.tokens.tolist())) == 105
    assert _rows(a) == {
        4: (0, 1, 0),
        7: (2, 1, 2),
        9: (0, 1, 0),
        50: (0, 1, 1),
        100: (-1.5, 0, 0),
        **{t: (0, 1, 1) for t in range(200, 300)},
    }
    assert (a.repetition, a.frequency, a.presence) == (1.3, 0.5, 0.2)
    assert _rows(first)[7] == (2, 1, 1)  # an earlier draw's rows stay as they were
    only_bias = TokenSampler(GenerationOptions(temperature=0, logit_bias={3: 1.0}), prompt=[1, 2])
    only_bias.accept(5)
    only_bias.device_draw()
    only_bias.accept(6)
    assert _rows(only_bias.device_draw().adjust) == {3: (1.0, 0, 0)}


def test_bias_and_penalties_on_the_device_equal_the_hosts(tiny):
    """adjust_logits (compile/adjust_logits.py) then the draw, against TokenSampler.adjust in float64 and
    its pick, on random logits in a batch of four rows with different knobs; a row without any is left
    alone."""
    _, eng = tiny
    rng = np.random.default_rng(5)
    v = eng.vocab
    logits = (rng.standard_normal((4, 1, v)) * 2).astype(np.float32)
    knobs = [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=1.5, presence_penalty=0.7, logit_bias={11: 5.0, 12: -100.0}),
        dict(),
        dict(repetition_penalty=0.7, frequency_penalty=-0.8, presence_penalty=-0.3, logit_bias={200: 3.0}),
    ]
    samplers = []
    for k in knobs:
        s = TokenSampler(GenerationOptions(temperature=0, **k), prompt=rng.integers(0, v, 20).tolist())
        for t in rng.integers(0, v, 15).tolist():
            s.accept(t)
        samplers.append(s)
    draws = [s.device_draw() for s in samplers]
    assert [d.adjust is None for d in draws] == [False, False, True, False]
    out = tvm.runtime.tensor(logits)
    got = eng.sampler.sample(out, list(enumerate(draws)))
    want = np.stack([s.adjust(logits[r, 0]) for r, s in enumerate(samplers)])
    np.testing.assert_allclose(out.numpy()[:, 0], want, rtol=1e-6, atol=1e-6)  # float32 against float64
    assert not np.allclose(want, logits[:, 0])
    assert got == [int(np.argmax(w)) for w in want]
    assert got != [int(np.argmax(x)) for x in logits[:, 0]]  # the adjustments moved a token


def test_the_api_and_the_scheduler_give_the_host_samplers_text(tiny):
    """Model.generate and the server's scheduler through the device path give the same text for a seed as
    with the sampler switched off (host sampling of returned logits), penalties and a logit bias
    included."""
    src, eng = tiny
    m = Model(eng, src)
    ids = m.prompt_ids("hello there", raw=True)
    cases = [
        dict(temperature=0.8, top_p=1.0, seed=3),
        dict(temperature=0),
        dict(temperature=1.5, seed=4),  # top_p 0.95 by default: cut on the device
        dict(temperature=1.2, top_k=20, min_p=0.02, seed=5),  # cut on the device
        dict(temperature=1.2, repetition_penalty=1.3, seed=6),
        dict(temperature=0.9, frequency_penalty=1.0, presence_penalty=0.5, logit_bias={7: 3.0}, seed=7),
    ]

    def run_all() -> list[tuple[str, str]]:
        api = [m.generate("hello there", raw=True, max_tokens=12, **c).text for c in cases]
        sched = Scheduler(eng, max_sequences=4, max_queue=len(cases))
        gens, texts = [], []
        for c in cases:
            gen = m.new_generation(ids, m.options(max_tokens=12, **c))
            pieces: list[str] = []
            sched.submit(gen, lambda st, pieces=pieces: pieces.append(st.text))
            gens.append(gen)
            texts.append(pieces)
        while sched.step():
            pass
        return list(zip(api, ["".join(t) for t in texts]))

    on_device = run_all()
    sampler, eng.sampler = eng.sampler, None
    try:
        on_host = run_all()
    finally:
        eng.sampler = sampler
    assert on_device == on_host
    assert all(a == s for a, s in on_host)  # one request alone, or three in one batch: the same text
    assert len({a for a, _ in on_host}) == 6, on_host


def test_a_library_without_the_sampler_is_refused():
    """A VM whose module has functions, none of them the sampler's (as a library compiled without
    --sample-on-device)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    logits = relax.Var("logits", relax.TensorType([1, 1, 8], "float32"))
    with bb.function("softmax_with_temperature", [logits]):
        bb.emit_func_output(logits)
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    with pytest.raises(UserError, match="no sampler functions .sample_tokens"):
        DeviceSampler(vm, tvm.cpu(), 4)


def test_a_sampler_with_the_old_params_is_refused_at_load(tmp_path):
    """A library compiled before top-k / min-p took params [3, b]: named at load, not a TVM shape error at
    the first token."""
    from tvm import relax, tirx

    v = 64
    b = tirx.Var("b", "int64")
    bb = relax.BlockBuilder()
    logits = relax.Var("logits", relax.TensorType([b, 1, v], "float32"))
    params = relax.Var("params", relax.TensorType([3, b], "float32"))
    with bb.function("sample_tokens", [logits, params]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.argmax(relax.op.reshape(logits, [b, v]), axis=1))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target="llvm")
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    with pytest.raises(UserError, match=r"failed a test draw \(.*5 vs\. 3.*other params than \[5, b\]"):
        DeviceSampler(vm, tvm.cpu(), 4, v)
    DeviceSampler(vm, tvm.cpu(), 4)  # without a vocabulary there is no probe


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_sample_on_device_needs_a_gpu_preset_before_loading(command, tmp_path):
    args = [command, str(tmp_path / "no-such-model"), "--sample-on", "device"]
    if command == "generate":
        args += ["--prompt", "hi"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--sample-on device needs a GPU preset, not --device host" in lines[0], (
        r.output
    )
