"""The hand kernels' knobs: the search (interleaved rounds, default kept unless beaten beyond noise), the
per-CPU records (this machine's only), and knob values reaching the compiled kernels."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tvm
from test_cpu_q8_gemv import AVX2, HOST_HAS_AVX2, _build, _q8_reference
from test_cpu_schedule import _matmul_func, _q4_weights

from toolkit.compile import cpu_schedule as cs
from toolkit.compile.cpu_attention import AttentionKnobs
from toolkit.compile.knobs import (
    DEFAULTS,
    X86_GEMV_PREFETCH,
    X86_GEMV_PREFETCH_LEVEL,
    Knobs,
    heuristic_knobs,
    knobs_for,
    record_path,
)
from toolkit.compile.tuned_records import device_fingerprint
from toolkit.read_bandwidth import paired_fractions
from toolkit.targets import load_preset
from toolkit.tune.knob_search import (
    SearchResult,
    candidates,
    cold_bytes,
    cold_sets,
    interleaved_search,
    label,
    pair_with_probe,
    roofline_summary,
    roofline_words,
    sign_test_wins,
    write_knob_record,
)

TOY = {"toy": {"x": (1, 2, 3, 4), "y": (1, 2)}}


def _sleeper(planted: dict):
    """A real timed workload: 1 ms for the planted setting, 10 ms for every other (sleep overshoots by a few
    ms on a busy 2-core machine: with 3 ms, one planted run in ~15 searches lost to a default run)."""

    def measure(cfg: dict) -> float:
        t0 = time.perf_counter()
        time.sleep(0.001 if cfg == planted else 0.010)
        return (time.perf_counter() - t0) * 1e3

    return measure


def test_search_finds_the_planted_faster_setting():
    default, planted = {"x": 1, "y": 1}, {"x": 3, "y": 2}
    configs = candidates("toy", default, lambda c: True, space=TOY)
    assert configs[0] == default and len(configs) == 8 and planted in configs
    chosen, kept, times = interleaved_search(configs, _sleeper(planted), rounds=4)
    assert chosen == planted and kept
    assert all(len(v) == 4 for k, v in times.items() if not k.startswith("confirm:"))
    res = SearchResult("toy", "*", default, chosen, kept, times)
    assert res.fastest == planted and res.speedup > 1.5
    # judged on fresh pairs, not on the runs it was picked from
    assert len(times[f"confirm:{label(planted)}"]) == len(times[f"confirm:{label(default)}"]) == 12


def test_sign_test_threshold():
    """The wins two equally fast settings reach with probability <= 2%: 10 of 12 (P = 79/4096 = 1.9%;
    9 of 12 would be 7.3%)."""
    assert sign_test_wins(12) == 10
    assert sign_test_wins(6) == 6  # 1/64 = 1.6%
    assert sign_test_wins(4) == 5  # even 4 of 4 (6.25%) is not enough: never keep


def test_a_lucky_pick_is_not_kept():
    """The candidate that ranked fastest on its search runs only by chance (its first runs were fast, the
    confirming runs are not): the confirmation keeps the default."""
    default = {"x": 1, "y": 1}
    configs = candidates("toy", default, lambda c: c["y"] == 1, space=TOY)
    calls: dict[str, int] = {}

    def measure(cfg: dict) -> float:
        n = calls[label(cfg)] = calls.get(label(cfg), 0) + 1
        lucky = cfg == {"x": 2, "y": 1} and n <= 4  # fast in the search rounds only
        return 1.0 if lucky else 5.0 + (n % 3)  # same work for everyone otherwise

    chosen, kept, times = interleaved_search(configs, measure, rounds=4)
    assert chosen == default and not kept
    assert f"confirm:{label({'x': 2, 'y': 1})}" in times  # it was the pick, and was tried again


def test_search_keeps_the_default_when_nothing_is_faster():
    """All settings do the same work: no candidate beats every default run by the margin (a chance order
    that clean over 6 rounds: 1/924 per candidate)."""
    default = {"x": 1, "y": 1}
    configs = candidates("toy", default, lambda c: c["y"] == 1, space=TOY)
    assert len(configs) == 4 and all(c["y"] == 1 for c in configs)
    chosen, kept, _ = interleaved_search(configs, _sleeper({"none": 0}), rounds=6, margin=0.2)
    assert chosen == default and not kept


def test_heuristics_follow_the_cpu_features():
    skx = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 4})
    zen3 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 4})
    # one key range per core for a long sequence's decode attention
    assert heuristic_knobs(skx).attention("decode") == AttentionKnobs(16, 16, prefetch=1, splits=4)
    assert heuristic_knobs(zen3).attention("decode") == AttentionKnobs(8, 16, prefetch=1, splits=4)
    no_count = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    assert heuristic_knobs(no_count).attention("decode").splits == 0
    assert heuristic_knobs(zen3).attention("prefill").prefetch == 0  # its rows are reused: no prefetch
    assert heuristic_knobs(skx).get("q8_gemm")["mr"] == 12  # 32 zmm registers
    # a small GEMV gets smaller tasks so 4 threads each have TASKS_PER_THREAD of them
    assert heuristic_knobs(zen3).gemv(9216, 3072)["tile"] == 16
    assert heuristic_knobs(zen3).gemv(128, 576)["tile"] == 8
    assert Knobs().get("attention_decode") == DEFAULTS["attention_decode"]
    # x86 decode GEMVs prefetch their weights; a CPU this project has not measured (arm64) does not
    assert heuristic_knobs(zen3).gemv(9216, 3072)["prefetch"] == X86_GEMV_PREFETCH
    assert heuristic_knobs(zen3).gemv(9216, 3072)["prefetch_level"] == X86_GEMV_PREFETCH_LEVEL == 2
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    assert heuristic_knobs(arm).gemv(9216, 3072)["prefetch"] == 0
    assert heuristic_knobs(arm).attention("decode").prefetch == 0
    # an arm64 CPU with i8mm (Graviton 3, Apple M2+): its prefill GEMM is `smmla`, which has no GEMV twin
    # to take a register budget from (this raised KeyError: 'neon-i8mm' for every such compile)
    i8mm = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}
    )
    assert heuristic_knobs(i8mm).get("q8_gemm")["mr"] == 6


def test_records_apply_only_on_the_machine_they_were_measured_on(tmp_path):
    host = load_preset("host")
    won = SearchResult(
        "attention_decode",
        "*",
        {"lanes": 16, "chunk": 16, "prefetch": 1},
        {"lanes": 8, "chunk": 32, "prefetch": 2},
        True,
        {"chunk=16,lanes=16,prefetch=1": [2.0, 2.1], "chunk=32,lanes=8,prefetch=2": [1.0, 1.1]},
    )
    path = write_knob_record(host, [won], tmp_path)
    assert path == record_path(host, device_fingerprint(host), tmp_path)
    tuned = knobs_for(host, tmp_path)
    # a record's values over the heuristics' (a knob the record predates keeps its heuristic value)
    splits = heuristic_knobs(host.target).attention("decode").splits
    assert tuned.attention("decode") == AttentionKnobs(lanes=8, chunk=32, prefetch=2, splits=splits)
    assert "tuned record" in tuned.source
    assert tuned.digest() != knobs_for(host, tmp_path / "none").digest()  # a new library, not a stale one
    # the same file claiming another CPU: ignored, heuristics instead
    rec = json.loads(path.read_text())
    rec["fingerprint"]["match"] = rec["fingerprint"]["match"].replace("avx2", "sse2")
    path.write_text(json.dumps(rec))
    assert knobs_for(host, tmp_path).source.startswith("heuristics")
    # a value outside the search space is not trusted either
    rec = json.loads(write_knob_record(host, [won], tmp_path).read_text())
    rec["kernels"]["attention_decode"]["*"]["lanes"] = 7
    path.write_text(json.dumps(rec))
    assert (
        knobs_for(host, tmp_path).attention("decode").lanes
        == heuristic_knobs(host.target).attention("decode").lanes
    )
    # a re-run where the setting no longer wins drops it
    lost = SearchResult(
        "attention_decode", "*", {"lanes": 16, "chunk": 16}, {"lanes": 16, "chunk": 16}, False, won.times_ms
    )
    rec = json.loads(write_knob_record(host, [lost], tmp_path).read_text())
    assert rec["kernels"] == {} and rec["measurements"][0]["kept"] is False


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2: the int8 kernel cannot run here")
def test_gemv_knobs_reach_the_kernel_and_keep_its_numbers():
    n, k = 128, 256
    func = _matmul_func(n, k, ("b", 1), quant=True, scale_dtype="float16", add=False)
    knobs = Knobs({"q4_gemv": {f"{n}x{k}": {"tile": 64, "rows": 2}}})
    tuned = cs.CPUQ8DotGEMV(knobs=knobs).apply(func, AVX2, False).mod
    default = cs.CPUQ8DotGEMV().apply(func, AVX2, False).mod
    assert tuned.script() != default.script()
    ex = _build(func, AVX2, [cs.CPUQ8DotGEMV(knobs=knobs)])
    qw, qs, _ = _q4_weights(n, k, "float16")
    x = np.random.default_rng(0).standard_normal((2, 1, k)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.empty((2, 1, n), "float32", dev)
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in (x, qw, qs)], out)
    ref, bound = _q8_reference(x, qw, qs)
    assert np.all(np.abs(out.numpy() - ref) <= bound)


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2: the int8 kernel cannot run here")
@pytest.mark.parametrize("prefetch", [64, 4096])  # within a task's rows / past the end of the weights
def test_gemv_prefetch_is_emitted_and_changes_no_number(prefetch):
    """A software prefetch only moves lines into the cache: the outputs equal the kernel without it bit
    for bit, and the object code has the prefetch instructions (none without the knob)."""
    n, k = 64, 512
    func = _matmul_func(n, k, (1, 1), quant=True, scale_dtype="float16", add=True)
    qw, qs, _ = _q4_weights(n, k, "float16")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    res = rng.standard_normal((1, 1, n)).astype(np.float32)
    dev, outs, asm = tvm.cpu(), [], []
    for pf, level in ((0, 1), (prefetch, 1), (prefetch, 2)):
        ex = _build(func, AVX2, [cs.CPUQ8DotGEMV(prefetch=pf, prefetch_level=level)])
        asm.append(ex.mod.inspect_source("s"))
        out = tvm.runtime.empty((1, 1, n), "float32", dev)
        ex["main"](*[tvm.runtime.tensor(a, dev) for a in (x, qw, qs, res)], out)
        outs.append(out.numpy())
    assert "prefetcht" not in asm[0]
    assert asm[1].count("prefetcht0") >= 2 and "prefetcht1" not in asm[1]  # weights and scales, into L1
    assert asm[2].count("prefetcht1") >= 2 and "prefetcht0" not in asm[2]  # into L2
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    ref, bound = _q8_reference(x, qw, qs)
    assert np.all(np.abs(outs[1] - res - ref) <= bound + 1e-6 * np.abs(res))


def test_search_labels_round_trip():
    times = {label({"x": 1}): [2.0], label({"x": 4}): [1.0]}
    res = SearchResult("toy", "*", {"x": 1}, {"x": 1}, False, times)
    assert res.fastest == {"x": 4} and res.fastest_speedup == 2.0 and res.speedup == 1.0


def test_roofline_fraction_is_the_chosen_settings_read_rate_over_the_probe(tmp_path):
    """10 MB in a median 2 ms is 5 GB/s; against a 20 GB/s probe that is 25%. A kept setting is judged on
    its own times, and the record keeps the numbers."""
    d, b = {"x": 1}, {"x": 2}
    times = {label(d): [1.0, 2.0, 3.0], label(b): [1.0, 1.0, 9.0]}
    res = SearchResult("q4_gemv", "8x8", d, d, False, times, read_bytes=10_000_000, bandwidth=20e9)
    assert res.roofline_fraction == pytest.approx(0.25)
    kept = SearchResult("q4_gemv", "8x8", d, b, True, times, read_bytes=10_000_000, bandwidth=20e9)
    assert kept.roofline_fraction == pytest.approx(0.5)
    assert SearchResult("q8_gemm", "8x8", d, d, False, times).roofline_fraction is None
    line = roofline_summary([res, kept, SearchResult("q8_gemm", "8x8", d, d, False, times)])
    assert line.startswith("memory-bound kernels at 25%-50%") and "q8_gemm" not in line
    host = load_preset("host")
    rec = json.loads(write_knob_record(host, [res], tmp_path).read_text())
    (m,) = rec["measurements"]
    assert m["read_bytes"] == 10_000_000 and m["probe_bytes_s"] == 20e9
    assert m["roofline_fraction"] == pytest.approx(0.25)


def test_paired_fraction_judges_each_timing_against_the_probe_passes_around_it():
    """The bandwidth flips between 2x states within seconds on shared hosts: 15 MB in 1 ms is 15 GB/s, half
    of the 30 GB/s mean of the passes around it, whichever state each pass caught; one figure probed before
    the search (here the slow 20 GB/s) would have said 75%. Passes and timings alternate, n + 1 passes."""
    calls = []
    rates = iter([20e9, 40e9, 20e9, 40e9])
    pairs = pair_with_probe(
        lambda: calls.append("run") or 1.0, lambda: calls.append("probe") or next(rates), n=3
    )
    assert calls == ["probe", "run", "probe", "run", "probe", "run", "probe"]
    d = {"x": 1}
    res = SearchResult("q4_gemv", "8x8", d, d, False, {label(d): [9.0]}, read_bytes=15_000_000, pairs=pairs)
    assert res.roofline_fraction == pytest.approx(0.5)
    words = roofline_words(res)
    assert "around each of 3 timings" in words and "15.0 GB/s" in words and "shifted" in words
    steady = SearchResult(
        "q4_gemv",
        "8x8",
        d,
        d,
        False,
        {},
        read_bytes=15_000_000,
        pairs={"probe_bytes_s": [30e9] * 2, "ms": [1.0]},
    )
    assert steady.roofline_fraction == pytest.approx(0.5) and "shifted" not in roofline_words(steady)
    with pytest.raises(ValueError, match="3 probe passes"):
        paired_fractions([1.0], [1.0, 2.0], 1)


def test_cold_bytes_counts_the_arguments_kept_out_of_the_caches():
    """A GEMV's weight codes and scales are read from memory each call; its activations and output (small,
    cache-resident in decode) and scalars are not counted."""
    dev = tvm.cpu()
    w = tvm.runtime.tensor(np.zeros((1024, 512), "uint32"), dev)  # 2 MiB
    s = tvm.runtime.tensor(np.zeros((1024, 1024), "float16"), dev)  # 2 MiB
    x = tvm.runtime.tensor(np.zeros((1, 4096), "float32"), dev)  # 16 KiB
    assert cold_bytes([x, w, s, x, 1.0]) == 4 << 20


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="the int8 kernels need AVX2")
def test_tuner_targets_include_gguf_q4_1_and_q8_0_matmuls(tmp_path):
    """`phi3 tune` searches the same int8 kernels a GGUF's Q4_1 / Q8_0 Linears compile to: one target per
    (family, shape), weighted by the code bytes they stream (8 bits per Q8_0 code, 4 per Q4_1), and each
    builds with the default knobs."""
    from tiny import make_tiny_checkpoint

    from toolkit.compile.cpu_isa import q8_gemm_isa
    from toolkit.compile.knobs import DEFAULTS
    from toolkit.config import load_hf_config
    from toolkit.tune.knob_search import matmul_targets

    cfg = load_hf_config(make_tiny_checkpoint(tmp_path / "c", "mini-4k", hidden_size=256, tokenizer=False))
    preset = load_preset("host")
    weights = {}
    for scheme in ("gguf_q4_1", "gguf_q8_0"):
        targets = {f"{t.family}:{t.key}": t for t in matmul_targets(cfg, scheme, preset, prefill_len=32)}
        gemvs = [t for t in targets.values() if t.family == "q4_gemv"]
        assert len(gemvs) >= 3, sorted(targets)  # qkv, gate_up, o and down (one shape here)
        assert all(t.build(DEFAULTS["q4_gemv"]) is not None for t in gemvs)
        weights[scheme] = sum(t.weight for t in gemvs)
        # the prefill GEMM's knob (`mr`) is searched where it means something: not on AMX tiles
        gemm = q8_gemm_isa(preset.target)
        assert any(t.family == "q8_gemm" for t in targets.values()) == (gemm not in (None, "amx"))
    assert weights["gguf_q8_0"] == pytest.approx(2 * weights["gguf_q4_1"])


@pytest.mark.parametrize("huge", [False, True])
def test_cold_copies_of_weights_sit_in_huge_pages_as_in_the_engine(huge: bool) -> None:
    """A GEMV's cold timing reads its weights from huge pages when the engine would (toolkit/hugepages.py);
    the KV cache's pages (attention) stay where TVM puts them. Small arguments are shared by every copy."""
    import numpy as np
    import tvm

    from toolkit.hugepages import HUGE_PAGE, thp_mode

    if huge and thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 2**32, (4096, 384), dtype=np.uint32)  # 6 MiB: large
    x = rng.standard_normal(3072).astype(np.float32)  # 12 KiB: shared
    sets = cold_sets([tvm.runtime.tensor(x), tvm.runtime.tensor(weight)], huge=huge)
    assert len(sets) >= 2 and all(s[0].same_as(sets[0][0]) for s in sets)
    starts = [np.from_dlpack(s[1]).ctypes.data for s in sets]
    assert len(set(starts)) == len(sets)  # a copy each
    for s in sets:
        np.testing.assert_array_equal(s[1].numpy(), weight)
    assert all(a % HUGE_PAGE == 0 for a in starts) == huge


def test_cold_timings_cycle_through_twice_the_last_level_cache(tmp_path, monkeypatch) -> None:
    """The largest cache level sysfs lists sizes a cold timing (a VM may report 480 MiB of L3: 256 MiB of
    copies would then be timed partly from that cache)."""
    import toolkit.hostinfo as hi
    from toolkit.tune.knob_search import COLD_BYTES, cold_target_bytes

    for i, (level, size) in enumerate([(1, "48K"), (1, "32K"), (2, "2048K"), (3, "480M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    monkeypatch.setattr(hi, "CPU_CACHES", tmp_path)
    hi.last_level_cache_bytes.cache_clear()
    try:
        assert hi.last_level_cache_bytes() == 480 << 20
        assert cold_target_bytes() == 960 << 20
        (tmp_path / "index3" / "size").write_text("32M\n")
        hi.last_level_cache_bytes.cache_clear()
        assert cold_target_bytes() == COLD_BYTES  # a small cache: the floor
    finally:
        hi.last_level_cache_bytes.cache_clear()
