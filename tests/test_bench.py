"""The bench: timing loop, summaries, ratios, JSON schema and plot (with test doubles for the engines), the
roofline byte counts (config formula vs a real GGUF's tensors), and `phi3 bench --json` on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit import targets
from toolkit.bench import harness
from toolkit.bench.harness import BenchSettings, InProcessRunner, run_bench
from toolkit.bench.pairing import paired_decode, summarize_pairs
from toolkit.bench.roofline import (
    gguf_weight_bytes_per_token,
    kv_bytes_of_steps,
    kv_bytes_per_step,
    weight_bytes_per_token,
)
from toolkit.bench.timing import summarize, timed_generation
from toolkit.cli import main as cli
from toolkit.config import Phi3Config
from toolkit.errors import UserError
from toolkit.read_bandwidth import measure_read_bandwidth

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

VOCAB = 50


class FakeBackend:
    """A test double: logits are a deterministic function of the sequence so far; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.seq: list[int] = []

    def _logits(self) -> np.ndarray:
        out = np.zeros(VOCAB, dtype=np.float32)
        out[(sum(self.seq) * 7 + len(self.seq)) % VOCAB] = 1.0
        return out

    def reset(self) -> None:
        self.calls.append(("reset", None))
        self.seq = []

    def prefill(self, tokens):
        self.calls.append(("prefill", list(tokens)))
        self.seq += list(tokens)
        return self._logits()

    def decode(self, token):
        self.calls.append(("decode", token))
        self.seq.append(token)
        return self._logits()


def test_timed_generation_feeds_back_argmax():
    b = FakeBackend()
    r = timed_generation(b, [3, 4, 5], decode_tokens=4)
    assert b.calls[0] == ("reset", None) and b.calls[1] == ("prefill", [3, 4, 5])
    decoded = [arg for kind, arg in b.calls if kind == "decode"]
    assert len(decoded) == 4
    # each decode input is the argmax of the previous step, recomputed here independently
    seq = [3, 4, 5]
    for tok in decoded:
        assert tok == (sum(seq) * 7 + len(seq)) % VOCAB
        seq.append(tok)
    assert r["tokens"][:4] == decoded and r["prompt_len"] == 3 and r["decode_tokens"] == 4
    assert r["prefill_s"] > 0 and r["decode_s"] > 0


def test_summarize():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_paired_decode_alternates_probe_and_single_steps():
    """Probe pass, one decode step, probe pass, ...: every step between two passes, fed its argmax."""
    b = FakeBackend()
    rates = iter([1.0, 2.0, 3.0, 4.0])

    def probe() -> float:
        b.calls.append(("probe", None))
        return next(rates)

    raw = paired_decode(b, [3, 4], 3, probe)
    assert [k for k, _ in b.calls] == ["reset", "prefill", "probe", "decode", "probe", "decode", "probe",
                                       "decode", "probe"]  # fmt: skip
    assert raw["probe_bytes_s"] == [1.0, 2.0, 3.0, 4.0] and len(raw["decode_s"]) == 3
    assert all(t > 0 for t in raw["decode_s"])
    seq = [3, 4]
    for tok in [a for k, a in b.calls if k == "decode"]:
        assert tok == (sum(seq) * 7 + len(seq)) % VOCAB
        seq.append(tok)


def test_paired_fraction_uses_the_passes_around_each_step():
    """30 bytes per step: 30 B/s over (10+20)/2 = 2.0 for the first, 15 B/s over 25 = 0.6 for the second."""
    p = summarize_pairs(FAKE_PAIRS, 30)
    assert p["steps"] == 2
    assert p["fraction"] == pytest.approx((2.0 + 0.6) / 2)
    assert p["decode_tok_s"] == {"median": 0.75, "min": 0.5, "max": 1.0, "n": 2}
    assert p["probe_bytes_s"]["median"] == 20.0


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_kv_bytes_per_step_count_the_keys_the_new_token_sees(window, dtype):
    """A decode step with n cached tokens reads the K and V rows of every key its query attends to: HF's
    mask (0 <= q - k < window) counted key by key, times the rows' size as a [layers, 2, kv heads, keys,
    head dim] array of the cache's dtype."""
    cfg = Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
    )  # fmt: skip
    for cached in (0, 3, 4, 5, 11):
        q = cached  # the new token's position
        seen = sum(1 for k in range(q + 1) if window is None or q - k < window)
        rows = np.empty((cfg.num_hidden_layers, 2, cfg.num_key_value_heads, seen, cfg.head_dim), dtype)
        assert kv_bytes_per_step(cfg, dtype, cached) == rows.nbytes
    assert kv_bytes_of_steps(cfg, dtype, 4, 3) == [kv_bytes_per_step(cfg, dtype, n) for n in (4, 5, 6)]
    with pytest.raises(UserError, match="int8"):
        kv_bytes_per_step(cfg, "int8", 1)


def test_paired_fraction_with_kv_adds_each_steps_cache_reads():
    """Step i read weights + kv[i] bytes in decode_s[i], against the mean of the passes around it."""
    p = summarize_pairs(FAKE_PAIRS, 30, kv_bytes=[10, 0])
    assert p["fraction"] == pytest.approx((30 / 1 / 15 + 30 / 2 / 25) / 2)
    assert p["fraction_with_kv"] == pytest.approx((40 / 1 / 15 + 30 / 2 / 25) / 2)
    assert "fraction_with_kv" not in summarize_pairs(FAKE_PAIRS, 30)
    with pytest.raises(ValueError, match="2 steps need 2"):
        summarize_pairs(FAKE_PAIRS, 30, kv_bytes=[1])


def _tiny_config() -> Phi3Config:
    return Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
    )


def _fake_run(prefill_s: float, decode_s: float, p: int, n: int) -> dict:
    return {"prompt_len": p, "decode_tokens": n, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": [1]}


def test_ratios_use_llama_cpps_best_setting():
    """Exact numbers from synthetic runs: ours 2x faster decode than FA-off, prefill 0.5x of FA-on."""
    runs = {
        "ours": {8: [_fake_run(0.1, 1.0, 8, 10)] * 3},  # prefill 80 tok/s, decode 10 tok/s
        "llama_cpp_fa_off": {8: [_fake_run(0.2, 2.0, 8, 10)] * 3},  # 40, 5
        "llama_cpp_fa_on": {8: [_fake_run(0.05, 4.0, 8, 10)] * 3},  # 160, 2.5
    }
    e = harness._thread_entry(1, runs, 8, bw=1000.0, our_bytes=10, llama_bytes=20)
    assert e["decode_ratio_vs_llama_cpp"] == pytest.approx(10 / 5)
    assert e["prefill_ratio_vs_llama_cpp"] == pytest.approx(80 / 160)
    assert e["prefill_ratio_by_prompt_length"] == {"8": pytest.approx(0.5)}
    assert e["roofline"]["decode_tok_s_ceiling"] == pytest.approx(100.0)
    assert e["roofline"]["fraction"] == pytest.approx(0.1)
    assert e["llama_cpp"]["fa_off"]["roofline_fraction"] == pytest.approx(5 / 50)


# what a fake run of `paired_decode` returns: probe passes of 10, 20, 30 bytes/s around steps of 1 s and 2 s
FAKE_PAIRS = {"probe_bytes_s": [10.0, 20.0, 30.0], "decode_s": [1.0, 2.0]}


class LoggedBackend(FakeBackend):
    """A FakeBackend that also writes its name to a shared log on each reset (one per timed generation)."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def reset(self) -> None:
        self.log.append(self.name)
        super().reset()


def _fake_bench(tmp_path, order: list[str] | None = None, kv_info: bool = False, **kw):
    """The bench on test doubles; `order` collects the backends' names generation by generation; with
    `kv_info` the runners say their KV cache dtype, as the real ones do."""
    order = [] if order is None else order
    backends: dict[str, FakeBackend] = {}
    paired: list[tuple[int, str | None, list[int]]] = []  # our engine's pairing: threads, KV dtype, prompt

    def ours(model, s, t):
        name = f"ours{t}" + (f"_{s.kv_cache}" if s.kv_cache else "")
        backends[name] = LoggedBackend(name, order)
        info = {"quantization": s.quantization}
        if kv_info:
            info["kv_cache_dtype"] = s.kv_cache or "float16"
        return InProcessRunner(backends[name], info)

    def llama(gguf, s, t, fa):
        backends[f"llama{t}{fa}"] = LoggedBackend(f"llama{t}{fa}", order)
        info = {"version": "fake", "amx": True} | ({"kv_cache_dtype": "float16"} if kv_info else {})
        return InProcessRunner(backends[f"llama{t}{fa}"], info, probe_rate=lambda: 5.0)

    def ours_pairs(model, s, t, prompt):
        paired.append((t, s.kv_cache, list(prompt)))
        return FAKE_PAIRS

    s = BenchSettings(threads=[1, 2], prompt_lengths=[4, 8], decode_tokens=3, repeats=2, warmup=1, **kw)
    res = run_bench(
        None,
        s,
        config=_tiny_config(),
        llama_gguf=tmp_path / "x.gguf",
        ours_factory=ours,
        llama_factory=llama,
        measure_bw=lambda th, n: {str(t): 1e9 * t for t in th},
        ours_pairs=ours_pairs,
        log=lambda m: None,
    )
    # each engine (one per KV dtype) paired once per thread count, with its own dtype, on the headline prompt
    assert [(t, kv) for t, kv, _ in paired] == [(t, kv) for t in (1, 2) for kv in s.kv_cache_dtypes]
    assert all(len(p) == 8 for _, _, p in paired)
    return res, backends


def test_run_bench_schema_with_test_doubles(tmp_path, monkeypatch):
    monkeypatch.setattr("toolkit.bench.roofline.gguf_weight_bytes_per_token", lambda p: 12345)
    res, backends = _fake_bench(tmp_path, vs_llama_cpp=True)
    json.dumps(res)  # JSON-ready
    assert res["schema"] == "phi3-bench/1"
    assert set(res["decode_ratio_vs_llama_cpp"]) == {"1", "2"} == set(res["prefill_ratio_vs_llama_cpp"])
    assert res["roofline"]["weight_bytes_per_token"] == weight_bytes_per_token(_tiny_config(), "q4f32_1")
    for e in res["results"]:
        ours, llama = e["ours"], e["llama_cpp"]
        assert set(llama) == {"fa_off", "fa_on"}
        assert [b["prompt_len"] for b in ours["by_prompt_length"]] == [4, 8]
        assert ours["decode_tok_s"]["n"] == 2  # warm-up dropped
        best = max(v["decode_tok_s"]["median"] for v in llama.values())
        assert e["decode_ratio_vs_llama_cpp"] == pytest.approx(ours["decode_tok_s"]["median"] / best)
        assert res["decode_ratio_vs_llama_cpp"][str(e["threads"])] == e["decode_ratio_vs_llama_cpp"]
        assert 0 < ours["ttft_s"]["min"] <= ours["ttft_s"]["median"] <= ours["ttft_s"]["max"]
        assert ours["peak_rss_bytes"] > 0
        bytes_ = weight_bytes_per_token(_tiny_config(), "q4f32_1")
        assert e["roofline"]["paired"] == summarize_pairs(FAKE_PAIRS, bytes_)
        for side in llama.values():  # the llama.cpp runners paired in their own process, with their probe
            assert (
                side["roofline_paired"]["steps"] == 24
                and side["roofline_paired"]["probe_bytes_s"]["median"] == 5
            )
    assert "probed just before and after each step" in harness.format_table(res)
    probe = [e["roofline"]["paired"]["probe_bytes_s"]["median"] / 1e9 for e in res["results"]]
    assert f"probe median: 1 thread {probe[0]:.1f} GB/s, 2 threads {probe[1]:.1f} GB/s)" in (
        harness.format_table(res)
    )
    assert "device:" not in harness.format_table(res) and res["llama_cpp"]["march"] == "native"
    # the CPU, its vector extensions and the load stand above the numbers
    from tvm.target import codegen

    from toolkit import hostinfo

    m = res["machine"]
    assert m["isa_flags"] == hostinfo.isa_flags() and m["llvm_cpu"] == codegen.llvm_get_system_cpu()
    # the features host detection adds to or takes from the CPU's name stand beside it (none: the name alone)
    mattr = targets.load_preset("host").target_dict.get("mattr", [])
    assert m["llvm_mattr"] == mattr
    machine = harness.format_table(res).splitlines()[1]
    llvm = " ".join([m["llvm_cpu"], *mattr])
    assert machine.startswith(f"machine: {m['cpu']} (LLVM {llvm}), {m['cores']} cpus; ")
    assert " ".join(m["isa_flags"]) in machine
    assert machine.endswith(
        f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after"
    )
    # another CPU class's code: the table says so above its numbers
    pinned = {**res, "settings": {**res["settings"], "device": "host:znver3"}}
    pinned["llama_cpp"] = {**res["llama_cpp"], "march": "znver3"}
    line = harness.format_table(pinned).splitlines()[1]
    assert line == "device: host:znver3 (code for CPU znver3; llama.cpp -march=znver3; run on this machine)"
    # every backend ran (warmup + repeats) x prompt lengths generations, each a prefill of the shared prompt
    for name, b in backends.items():
        prefills = [arg for kind, arg in b.calls if kind == "prefill"]
        # llama.cpp's runners pair in their own process: one more prefill, of the headline prompt
        assert len(prefills) == (1 + 2) * 2 + name.startswith("llama")
        assert sorted({len(p) for p in prefills}) == [4, 8]
    p8 = {tuple(a) for b in backends.values() for k, a in b.calls if k == "prefill" and len(a) == 8}
    assert len(p8) == 1  # the same prompt for every backend


def test_pairing_child_failure_is_one_line(tmp_path):
    """The child that pairs our engine fails (here: a model path that does not exist) -> a UserError of one
    line that names the way around it, not a traceback of the child."""
    from toolkit.bench.pairing import engine_pairs

    s = BenchSettings(threads=[1], roofline_pairs=2, bandwidth_bytes=1 << 20)
    with pytest.raises(UserError) as e:
        engine_pairs(tmp_path / "missing", s, 1, [1, 2, 3])
    assert "--roofline-pairs 0" in str(e.value) and "\n" not in str(e.value)


def test_gpu_bench_claims_no_host_roofline():
    """A GPU preset's decode does not read host DRAM: no bandwidth probe, no pairs, no roofline column."""
    calls = []
    s = BenchSettings(
        threads=[1], prompt_lengths=[4], decode_tokens=2, repeats=1, warmup=0, device="cuda-sm90"
    )
    res = run_bench(
        None,
        s,
        config=_tiny_config(),
        ours_factory=lambda model, s, t: InProcessRunner(FakeBackend()),
        measure_bw=lambda th, n: calls.append("probe") or {"1": 1e9},
        ours_pairs=lambda *a: calls.append("pairs") or FAKE_PAIRS,
        log=lambda m: None,
    )
    assert calls == [] and "roofline" not in res["results"][0]
    assert res["roofline"]["read_bandwidth_bytes_s"] == {}
    assert "%" not in harness.format_table(res)


def test_run_bench_counts_each_sides_kv_cache_reads_beside_the_weights(tmp_path, monkeypatch):
    """Runners that name their KV dtype get fractions with the cache's reads of the headline prompt's decode
    steps counted too (f32 cache: twice the bytes); the weights-only fractions stay as they were."""
    monkeypatch.setattr("toolkit.bench.roofline.gguf_weight_bytes_per_token", lambda p: 12345)
    plain, _ = _fake_bench(tmp_path, vs_llama_cpp=True)
    res, _ = _fake_bench(tmp_path, vs_llama_cpp=True, kv_info=True, kv_cache="float16,float32")
    json.dumps(res)
    cfg, bytes_ = _tiny_config(), weight_bytes_per_token(_tiny_config(), "q4f32_1")
    for e, p in zip(res["results"], plain["results"], strict=True):
        bw = 1e9 * e["threads"]
        roof = e["roofline"]
        assert roof["fraction"] == pytest.approx(e["ours"]["decode_tok_s"]["median"] * bytes_ / bw)
        kv16 = kv_bytes_of_steps(cfg, "float16", 8, 3)  # headline prompt 8, 3 decode steps
        assert roof["kv_bytes_per_step"] == pytest.approx(np.mean(kv16))
        assert roof["fraction_with_kv"] == pytest.approx(roof["fraction"] * (bytes_ + np.mean(kv16)) / bytes_)
        assert roof["paired"] == summarize_pairs(FAKE_PAIRS, bytes_, kv_bytes_of_steps(cfg, "float16", 8, 2))
        f32 = e["ours_by_kv_cache"]["float32"]
        kv32 = kv_bytes_of_steps(cfg, "float32", 8, 3)
        assert np.mean(kv32) == 2 * np.mean(kv16)
        assert f32["roofline_fraction_with_kv"] == pytest.approx(
            f32["roofline_fraction"] * (bytes_ + np.mean(kv32)) / bytes_
        )
        assert f32["roofline_paired"]["fraction_with_kv"] > f32["roofline_paired"]["fraction"]
        for side in e["llama_cpp"].values():  # llama.cpp's own bytes, its f16 cache's reads: 24 pairs
            assert side["roofline_fraction_with_kv"] == pytest.approx(
                side["roofline_fraction"] * (12345 + np.mean(kv16)) / 12345
            )
            assert side["roofline_paired"]["fraction_with_kv"] > side["roofline_paired"]["fraction"]
        for key in ("fraction_with_kv", "kv_bytes_per_step"):  # a runner that names no dtype: no such key
            assert key not in p["roofline"] and key not in p["roofline"]["paired"]
    assert "with the KV cache's reads counted too: 1 thread" in harness.format_table(res)
    assert "KV cache's reads" not in harness.format_table(plain)


def test_run_bench_without_llama_and_plot(tmp_path):
    res, backends = _fake_bench(tmp_path)
    assert "decode_ratio_vs_llama_cpp" not in res and "llama_cpp" not in res["results"][0]
    assert set(backends) == {"ours1", "ours2"}
    png = harness.plot(res, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ours" in harness.format_table(res)


def test_single_kv_cache_keeps_the_json(tmp_path, monkeypatch):
    """One --kv-cache dtype: the engine gets it, and the results have the very keys of a run without one."""
    monkeypatch.setattr("toolkit.bench.roofline.gguf_weight_bytes_per_token", lambda p: 12345)
    plain, _ = _fake_bench(tmp_path, vs_llama_cpp=True)
    res, backends = _fake_bench(tmp_path, vs_llama_cpp=True, kv_cache="float32")
    assert {"ours1_float32", "ours2_float32"} <= set(backends) and "ours1" not in backends
    assert res["settings"]["kv_cache"] == "float32"
    for e, p in zip(res["results"], plain["results"], strict=True):
        assert set(e) == set(p) and set(e["ours"]) == set(p["ours"])
        assert set(e["roofline"]) == set(p["roofline"])
    table = harness.format_table(res)
    assert "ours kv" not in table and "\n      1  ours " in table


def test_kv_cache_list_interleaves_one_engine_per_dtype(tmp_path, monkeypatch):
    """--kv-cache float16,float32: two engines per thread count, timed round by round between the other
    backends; `ours` stays the first dtype (and the llama.cpp ratios use it), each dtype has its summary and
    paired roofline, and the ratio of the two is float32's median over float16's."""
    monkeypatch.setattr("toolkit.bench.roofline.gguf_weight_bytes_per_token", lambda p: 12345)
    order: list[str] = []
    res, backends = _fake_bench(tmp_path, order, vs_llama_cpp=True, kv_cache="float16,float32")
    json.dumps(res)
    assert {"ours1_float16", "ours1_float32", "ours2_float16", "ours2_float32"} <= set(backends)
    # per thread count: 1 warm-up + 2 timed rounds, each round every backend once per prompt length (4, 8)
    for t in (1, 2):
        one_round = [n for n in (f"ours{t}_float16", f"ours{t}_float32", f"llama{t}False", f"llama{t}True")
                     for _ in (4, 8)]  # fmt: skip
        mine = [n for n in order if n.startswith((f"ours{t}_", f"llama{t}"))]
        # then llama.cpp's runners pair in their own process (ours pair in a child: `ours_pairs`)
        assert mine == one_round * 3 + [f"llama{t}False", f"llama{t}True"]
    bytes_ = weight_bytes_per_token(_tiny_config(), "q4f32_1")
    for e in res["results"]:
        by_kv = e["ours_by_kv_cache"]
        assert list(by_kv) == ["float16", "float32"]
        headline = {k: v for k, v in by_kv["float16"].items() if not k.startswith("roofline")}
        assert headline == e["ours"]  # `ours` is the first dtype listed
        for side in by_kv.values():
            assert side["decode_tok_s"]["n"] == 2  # warm-up dropped
            assert [b["prompt_len"] for b in side["by_prompt_length"]] == [4, 8]
            assert side["roofline_paired"] == summarize_pairs(FAKE_PAIRS, bytes_)
            bw = 1e9 * e["threads"]
            assert side["roofline_fraction"] == pytest.approx(side["decode_tok_s"]["median"] * bytes_ / bw)
        r = e["kv_cache_ratio"]
        assert (r["of"], r["over"]) == ("float32", "float16")
        f16, f32 = by_kv["float16"], by_kv["float32"]
        assert r["decode"] == pytest.approx(f32["decode_tok_s"]["median"] / f16["decode_tok_s"]["median"])
        assert r["prefill"] == pytest.approx(f32["prefill_tok_s"]["median"] / f16["prefill_tok_s"]["median"])
        best = max(v["decode_tok_s"]["median"] for v in e["llama_cpp"].values())
        assert e["decode_ratio_vs_llama_cpp"] == pytest.approx(f16["decode_tok_s"]["median"] / best)
    table = harness.format_table(res)
    rows = [ln.split() for ln in table.splitlines()]
    assert [r[:4] for r in rows if r[1:2] == ["ours"]] == [
        [t, "ours", "kv", kv] for t in ("1", "2") for kv in ("float16", "float32")
    ]
    assert "ours kv float32 / kv float16: decode" in table and "ours kv float16 / llama.cpp best" in table
    png = harness.plot(res, tmp_path / "kv.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "value, needle",
    [
        ("float16,float16", "float16 listed twice"),
        ("float8", "float8"),
        ("float16,", "empty entry"),
        ("", "empty entry"),
        ("float16,,float32", "empty entry"),
    ],
)
def test_bench_bad_kv_cache_list(value, needle):
    """A bad --kv-cache list is refused before any model is opened: one line naming the flag, no traceback."""
    r = CliRunner().invoke(cli, ["bench", "/nonexistent-model", "--kv-cache", value])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and "--kv-cache" in lines[0] and needle in lines[0], lines
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_kv_cache_list_needs_a_cpu_preset():
    with pytest.raises(UserError, match="--kv-cache float16.*CPU preset"):
        BenchSettings(device="cuda-sm90", kv_cache="float16,float32").validate()
    assert BenchSettings(kv_cache="float16, float32").kv_cache_dtypes == ["float16", "float32"]
    assert BenchSettings().kv_cache_dtypes == [None]


@pytest.mark.parametrize("variant", ["mini-4k", "phi4-mini"])
def test_weight_bytes_formula_matches_a_gguf(tmp_path, variant):
    """Two independent routes to the bytes read per token: the config formula and a written GGUF's tensors
    (phi4-mini: tied embeddings, so the table is read as the output layer and counted)."""
    from tiny import make_tiny_checkpoint

    from toolkit.checkpoint import open_model
    from toolkit.checkpoint.gguf_export import export_gguf

    ckpt = make_tiny_checkpoint(tmp_path / "m", variant)
    export_gguf(ckpt, tmp_path / "m.gguf", qtype="q4_0")
    cfg = open_model(ckpt).config
    assert gguf_weight_bytes_per_token(tmp_path / "m.gguf") == weight_bytes_per_token(cfg, "q4_0")


def test_phi3_mini_bytes_and_random_q4_0_blocks():
    import gguf
    from make_phi3_mini_random import phi3_mini_config, random_q4_0

    _, cfg = phi3_mini_config()
    assert weight_bytes_per_token(cfg, "q4_0") == 2_094_637_056  # shared/notes/cpu-speed-anchor.md
    blocks = random_q4_0((64, 3072), np.random.default_rng(0))
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert w.shape == (64, 3072) and np.isfinite(w).all()
    # scales were chosen for unit output variance: std(w) * sqrt(cols) ~ 1 (uniform codes, +-25% scale jitter)
    assert 0.8 < float(w.std()) * np.sqrt(3072) < 1.2


def test_bandwidth_probe_reads_every_word():
    """The probe's kernel XOR-folds an array of ones (an even count per lane: zero when every load ran, which
    it checks itself) and reports a rate for every thread count TVM's pool has; more threads than the pool
    is an error, not a one-thread figure; a bad thread count is a user error."""
    import tvm

    pool = int(tvm.get_global_func("runtime.NumThreads")())
    for threads in range(1, pool + 1):
        bw = measure_read_bandwidth(threads, 4 << 20, repeats=2)
        assert np.isfinite(bw) and bw > 0
    with pytest.raises(RuntimeError, match="TVM_NUM_THREADS"):  # never a silently single-threaded figure
        measure_read_bandwidth(pool + 1, 4 << 20)
    with pytest.raises(UserError, match="threads"):
        measure_read_bandwidth(0)


def test_bench_bad_input():
    r = CliRunner().invoke(cli, ["bench", "--threads", "0"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["bench", "--threads", "a,b"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_bench_refuses_more_threads_than_cpus_and_caps_its_default(monkeypatch):
    """A count above the CPUs would run fewer threads under that count's label (and stall the bandwidth
    probe for minutes); the default 1,2 on a one-CPU machine measures 1."""
    import click

    from toolkit.cli import cmd_bench
    from toolkit.cpu_threads import usable_cpus

    too_many = str(usable_cpus() + 1)
    r = CliRunner().invoke(cli, ["bench", "--threads", f"1,{too_many}"])
    assert r.exit_code == 2 and f"{too_many} is more than the {usable_cpus()} CPU(s)" in r.output, r.output
    monkeypatch.setattr("toolkit.cpu_threads.usable_cpus", lambda: 1)
    ctx = click.Context(cmd_bench.command)
    param = next(p for p in cmd_bench.command.params if p.name == "threads")
    ctx.set_parameter_source("threads", click.core.ParameterSource.DEFAULT)
    assert cmd_bench._thread_counts(ctx, param, "1,2") == [1]
    ctx.set_parameter_source("threads", click.core.ParameterSource.COMMANDLINE)
    with pytest.raises(click.BadParameter, match="2 is more than the 1 CPU"):
        cmd_bench._thread_counts(ctx, param, "1,2")


# -- another CPU class measured here: both sides built for it (`--device host:CPU`) ------------------------
ZEN4_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | REPACK = 1 |"
)
ZEN3_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 |"
)


def test_llama_cpp_for_another_cpu_is_built_for_it_and_kept_apart():
    from toolkit.bench import llama_cpp as lc

    args = lc.build_env("znver3")["CMAKE_ARGS"]
    assert "-DGGML_NATIVE=OFF" in args and "-march=znver3" in args and "-DGGML_NATIVE=ON" not in args
    # ggml's own switches would add -mavx512f etc. on top of the CPU's flags
    assert all(f"-DGGML_{o}=OFF" in args for o in ("AVX2", "AVX512", "AVX512_VNNI", "AMX_INT8"))
    assert "__AMX_INT8__" not in args and "__AMX_INT8__" in lc.build_env("sapphirerapids")["CMAKE_ARGS"]
    assert lc.wheelhouse("znver3") != lc.wheelhouse() and lc.variant_site("znver3").parent == lc.wheelhouse(
        "znver3"
    )
    path = lc.worker_env("znver3")["PYTHONPATH"].split(":")
    assert path[0] == str(lc.variant_site("znver3"))
    assert lc.worker_env() == dict(os.environ)  # this machine's own build: the installed package
    lc.check_variant_info(ZEN3_INFO, "znver3")
    lc.check_variant_info(ZEN4_INFO, "znver4")
    with pytest.raises(
        UserError, match="reports AVX512, AVX512_BF16, AVX512_VBMI, AVX512_VNNI, which znver3"
    ):
        lc.check_variant_info(ZEN4_INFO, "znver3")  # the flags did not reach the compiler: a native build
    with pytest.raises(UserError, match="no AVX2"):
        lc.check_variant_info("CPU : SSE3 = 1 | SSSE3 = 1 |", "znver3")


def test_two_benches_that_need_llama_cpp_build_it_once(monkeypatch, tmp_path):
    """A second bench waits on the first one's build and install (the lock), then finds it installed."""
    import subprocess
    import threading
    import time

    from toolkit.bench import llama_cpp as lc

    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path))
    installed, builds = [], []
    ok = subprocess.CompletedProcess([], 0, "/site/llama_cpp/__init__.py\nCPU : AVX2 = 1 |", "")

    def install_and_probe(cpu, *, build, log, broken):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # the other caller arrives while this one builds
        installed.append(lc.LLAMA_CPP_VERSION)
        return ok

    monkeypatch.setattr(lc, "_probe", lambda cpu: ok if installed else None)
    monkeypatch.setattr(lc, "_install_and_probe", install_and_probe)
    lines = []
    threads = [
        threading.Thread(target=lambda: lines.append(lc.ensure_llama_cpp(log=print))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and lines == ["CPU : AVX2 = 1 |"] * 2


def test_bench_refuses_a_cpu_class_whose_code_cannot_run_here(monkeypatch):
    from toolkit import targets

    monkeypatch.setattr(targets, "_host_cpu_features", lambda: {"amx-tile": False, "amx-int8": False})
    targets._load.cache_clear()
    try:
        r = CliRunner().invoke(cli, ["bench", "--device", "host:sapphirerapids", "--vs-llama-cpp"])
    finally:
        targets._load.cache_clear()
    assert r.exit_code == 1 and "this CPU lacks amx-int8, amx-tile" in r.output, r.output
    assert "Traceback" not in r.output


def _engine_ready() -> bool:
    if importlib.util.find_spec("toolkit.runtime.engine") is None:
        return False
    from toolkit.runtime import engine as rt

    return hasattr(rt.Engine, "load") or hasattr(rt, "load_engine")


@pytest.mark.skipif(not _engine_ready(), reason="our engine (toolkit.runtime.engine) is not there yet")
def test_cli_bench_json_tiny(tmp_path):
    from tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "m", "mini-4k")
    args = [
        "bench",
        str(ckpt),
        "--threads",
        "1",
        "--prompt-lengths",
        "4,8",
        "--decode-tokens",
        "4",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--bandwidth-mib",
        "64",
        "--roofline-pairs",
        "5",
        "--quantization",
        "q4f16_1",  # the tiny library test_sampling_functions and test_scheme_table compile: cached once
        "--json",
        "--plot",
        str(tmp_path / "p.png"),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output + "".join(traceback.format_exception(*r.exc_info))
    res = json.loads(r.stdout)
    assert res["schema"] == "phi3-bench/1" and res["model"]["vocab_size"] == 512
    e = res["results"][0]
    assert e["threads"] == 1 and e["ours"]["decode_tok_s"]["median"] > 0
    assert all(0 <= t < 512 for t in e["ours"]["greedy_tokens"])
    assert 0 < e["roofline"]["fraction"]
    paired = e["roofline"]["paired"]  # our engine in a child process, between passes of the real probe
    assert paired["steps"] == 5 and paired["fraction"] > 0 and paired["probe_bytes_s"]["n"] == 6
    assert paired["fraction_with_kv"] > paired["fraction"]  # the engine says its KV dtype: its reads count
    assert (tmp_path / "p.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not _engine_ready() or importlib.util.find_spec("llama_cpp") is None,
    reason="needs Engine.load and llama-cpp-python",
)
def test_cli_bench_vs_llama_cpp_tiny(tmp_path, monkeypatch):
    from tiny import make_tiny_checkpoint

    monkeypatch.setenv("PHI3_TOOLKIT_CACHE", str(tmp_path / "cache"))
    ckpt = make_tiny_checkpoint(tmp_path / "m", "mini-4k")
    args = [
        "bench",
        str(ckpt),
        "--threads",
        "1",
        "--prompt-lengths",
        "8",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--bandwidth-mib",
        "64",
        "--vs-llama-cpp",
        "--no-build",
        "--roofline-pairs",
        "3",
        "--json",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["decode_ratio_vs_llama_cpp"]["1"] > 0 and res["prefill_ratio_vs_llama_cpp"]["1"] > 0
    assert set(res["results"][0]["llama_cpp"]) == {"fa_off", "fa_on"}
    for side in res["results"][0]["llama_cpp"].values():  # paired in the llama.cpp worker
        assert side["roofline_paired"]["steps"] == 3 and side["roofline_paired"]["fraction"] > 0


def test_peak_rss_is_per_process():
    """A worker must report its own peak RSS, not its parent's (getrusage's ru_maxrss survives fork+exec)."""
    import subprocess

    from toolkit.bench.timing import peak_rss_bytes

    big = np.ones(50_000_000)  # 400 MB touched in this process
    code = "from toolkit.bench.timing import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert peak_rss_bytes() > big.nbytes > child


# ---- the serving bench (toolkit/bench/serve.py, examples/bench_serve.py) ----


class FakeOpenAIServer:
    """A test double for an OpenAI server: /v1/completions streams `max_tokens` one-character chunks, the
    last with `finish`; usage at the end only when the client asks (as ours does; llama_cpp.server never)."""

    def __init__(self, finish: str = "length", send_usage: bool = True) -> None:
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.bodies: list[dict] = []

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)

            async def events():
                n = body["max_tokens"]
                for i in range(n):
                    choice = {"text": "x", "finish_reason": finish if i == n - 1 else None}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                if send_usage and body.get("stream_options", {}).get("include_usage"):
                    yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def models(request):
            return JSONResponse({"data": []})

        app = Starlette(
            routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models)]
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.mark.parametrize("send_usage", [True, False])
def test_serve_bench_level_counts_every_request(send_usage):
    from toolkit.bench.serve import PROMPTS, run_level

    with FakeOpenAIServer(send_usage=send_usage) as srv:
        res = run_level(srv.url, streams=3, rounds=2, max_tokens=5, ban=[0, 2])
    assert (res["streams"], res["requests"], res["tokens"]) == (3, 6, 30)
    assert res["aggregate_tok_s"] == pytest.approx(30 / res["wall_s"])
    assert 0 < res["ttft_p50_s"] <= res["ttft_p99_s"] <= res["wall_s"]
    bodies = srv.bodies
    assert len({b["prompt"] for b in bodies}) == 6 and {b["prompt"] for b in bodies} <= set(PROMPTS)
    assert all(b["logit_bias"] == {"0": -100, "2": -100} and b["temperature"] == 0 for b in bodies)


def test_serve_bench_refuses_a_request_that_stopped_early():
    from toolkit.bench.serve import run_level
    from toolkit.errors import UserError

    with FakeOpenAIServer(finish="stop") as srv, pytest.raises(UserError, match="finished with 'stop'"):
        run_level(srv.url, streams=1, rounds=1, max_tokens=3, ban=[])


def test_serve_bench_summary_percentiles():
    from toolkit.bench.serve import RequestRecord, summarize_level

    recs = [RequestRecord(ttft_s=t, total_s=t + 1, tokens=4, finish_reason="length") for t in range(1, 101)]
    res = summarize_level(recs, wall_s=50.0, streams=10)
    assert res["tokens"] == 400 and res["aggregate_tok_s"] == 8.0
    assert res["ttft_p50_s"] == pytest.approx(50.5) and res["ttft_p99_s"] == pytest.approx(99.01)


def test_serve_bench_table_names_the_cpu_and_its_extensions():
    from toolkit.bench.serve import format_table

    level = {"aggregate_tok_s": 10.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2}
    res = {
        "machine": {"cpu": "AMD EPYC", "cpus": 2, "isa_flags": ["avx2", "avx512_vnni"]},
        "levels": [{"streams": 1, "ours": level, "llama_cpp": level, "throughput_ratio": 1.0}],
        "loadavg_before": [0.5, 0.4, 0.3],
        "loadavg_after": [1.0, 0.9, 0.8],
    }
    rows = format_table(res).splitlines()
    assert rows[0] == "machine: AMD EPYC, 2 cpus; avx2 avx512_vnni"
    res["machine"]["isa_flags"] = []  # a CPU that names none of them (or no /proc/cpuinfo)
    assert format_table(res).splitlines()[0] == "machine: AMD EPYC, 2 cpus"
    assert rows[-1] == "load average before 0.50 0.40 0.30, after 1.00 0.90 0.80"


def test_serve_bench_server_that_fails_to_start_is_one_line():
    from toolkit.bench.serve import ServerProcess
    from toolkit.errors import UserError

    cmd = [sys.executable, "-c", "import sys; print('loading'); print('boom: bad model'); sys.exit(3)"]
    srv = ServerProcess("llama_cpp", cmd, port=9)
    with pytest.raises(UserError) as e:
        srv.wait_ready(timeout_s=60)
    assert str(e.value) == "llama_cpp server exited (code 3) before it was ready: boom: bad model"
    srv.stop()


def test_serve_bench_says_what_to_install(monkeypatch):
    from toolkit.bench import llama_cpp, serve
    from toolkit.errors import UserError

    monkeypatch.setattr(llama_cpp, "installed_version", lambda: None)
    with pytest.raises(UserError, match=r"python -m toolkit\.bench\.llama_cpp install"):
        serve.check_llama_server_importable()
    reqs = [
        "numpy>=1.20.0",
        'sse-starlette>=1.6.1; extra == "server"',
        'starlette-context<0.4,>=0.3.6; extra == "server"',
        'httpx>=0.24.1; extra == "test"',
    ]
    monkeypatch.setattr(serve.importlib.metadata, "requires", lambda dist: reqs)
    assert serve.llama_server_requirements() == ["sse-starlette>=1.6.1", "starlette-context<0.4,>=0.3.6"]


def test_bench_serve_script_bad_input_is_one_line(tmp_path):
    import subprocess

    script = Path(__file__).parents[1] / "examples" / "bench_serve.py"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for args, needle in [
        (["--max-tokens", "2000"], "--max-tokens 2000 leaves no room in --context-window 1024"),
        (["--streams", "1,0"], "positive integers"),
        (["--gguf", str(tmp_path / "none.gguf")], "no such GGUF file"),
        (["--plot", str(tmp_path)], "output is a folder"),
    ]:
        r = subprocess.run([sys.executable, str(script), *args, "--json", str(tmp_path / "o.json")],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_bench_serve_script_end_to_end(tmp_path):
    """Both real servers on the embedded model, a few tokens: the JSON has every level for both, the PNG."""
    import os
    import subprocess

    from toolkit.bench.serve import check_llama_server_importable
    from toolkit.errors import UserError

    try:
        check_llama_server_importable()
    except UserError as e:
        pytest.skip(str(e))
    script = Path(__file__).parents[1] / "examples" / "bench_serve.py"
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    args = [
        "--threads",
        "1",
        "--streams",
        "1,2",
        "--max-tokens",
        "4",
        "--rounds",
        "1",
        "--context-window",
        "256",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [e["streams"] for e in res["levels"]] == [1, 2]
    from toolkit.hostinfo import isa_flags

    assert res["machine"]["isa_flags"] == isa_flags()
    for e in res["levels"]:
        for name in ("ours", "llama_cpp"):
            assert e[name]["requests"] == e["streams"] and e[name]["tokens"] == 4 * e["streams"]
            assert 0 < e[name]["ttft_p50_s"] <= e[name]["ttft_p99_s"]
        assert e["throughput_ratio"] == pytest.approx(
            e["ours"]["aggregate_tok_s"] / e["llama_cpp"]["aggregate_tok_s"]
        )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_bench_dead_server_is_one_line():
    from toolkit.bench.serve import free_port, run_level
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="ConnectError") as e:
        run_level(f"http://127.0.0.1:{free_port()}", streams=1, rounds=1, max_tokens=3, ban=[])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,needle", [(["--cpu"], "needs an LLVM CPU name"), (["--cpu", "zen9"], "zen9")])
def test_llama_cpp_install_for_a_bad_cpu_fails_before_building(capsys, args, needle):
    from toolkit.bench import llama_cpp as lc

    assert lc.main(["install", *args]) == 2
    assert needle in capsys.readouterr().err


def test_bench_refuses_what_it_cannot_run_before_building_anything(tmp_path, monkeypatch):
    """A thread count or prompt length listed twice, a run longer than the engine's context window and an
    unreadable --llama-gguf are one line each, before llama.cpp or our engine is built (the last two used to
    end in tracebacks: ContextFullError after the build, gguf-py's ValueError after llama.cpp's)."""
    import toolkit.bench.harness as h
    import toolkit.bench.llama_cpp as lc

    monkeypatch.setattr(h, "run_bench", lambda *a, **k: pytest.fail("ran the bench"))
    monkeypatch.setattr(lc, "ensure_llama_cpp", lambda *a, **k: pytest.fail("built llama.cpp"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    cases = [
        (["--threads", "2,1,2"], "2 listed twice"),
        (["--prompt-lengths", "8,8"], "8 listed twice"),
        (["--context", "5000", "--decode-tokens", "8"], "need 5025 positions; the engine holds"),
        (["--llama-gguf", str(tmp_path / "bad.gguf"), "--vs-llama-cpp"], "not a readable GGUF file"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(cli, ["bench", *args])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        assert len(lines) == 1 and needle in lines[0], lines
    assert BenchSettings(prompt_lengths=[100], decode_tokens=8, roofline_pairs=24).context_needed == 125


def test_machine_line_shows_what_host_detection_took_from_the_cpu_name():
    # an Emerald Rapids VM without AMX: "LLVM emeraldrapids" alone would read as AMX code
    m = {"cpu": "Intel(R) Xeon(R) Processor", "llvm_cpu": "emeraldrapids", "cores": 2}
    m |= {"llvm_mattr": ["-amx-int8", "-amx-tile"], "isa_flags": ["avx512_vnni"]}
    line = harness._machine_line(m)
    assert (
        line
        == "machine: Intel(R) Xeon(R) Processor (LLVM emeraldrapids -amx-int8 -amx-tile), 2 cpus; avx512_vnni"
    )
    del m["llvm_mattr"]  # a JSON written before the field: the name alone
    assert harness._machine_line(m).startswith("machine: Intel(R) Xeon(R) Processor (LLVM emeraldrapids), 2")
