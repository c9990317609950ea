"""`phi3 tune`'s search over our hand kernels' knobs (compile/knobs.py) on this machine.

Each kernel of the model that a hand kernel computes is built once per candidate setting at the size a
step uses (decode: one token; prefill: `prefill_len` tokens; attention: `context` keys), and the
candidates are timed in interleaved rounds (every round runs each once, in a rotated order), so a load
change on the machine hits all of them alike. The fastest by median is then confirmed against the default
on fresh runs, the two back to back in each of `CONFIRM_ROUNDS` pairs (a load change between pairs hits
both alike), and replaces the default only when its median time per pair is below the default's by
`margin` AND it wins a sign test (wins in enough pairs that a tie would do so with probability <= 2%).
Selecting on one set of runs and judging on another keeps the best-of-many pick from passing on luck; the
per-pair rule holds on a machine whose memory bandwidth drifts by 2x within minutes, where requiring every
winner run to beat every default run kept nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..compile.knobs import SCHEMA, SPACE, Knobs, knobs_for, record_path, shape_key
from ..cpu_threads import size_thread_pool
from ..locks import output_lock
from ..read_bandwidth import paired_fractions
from ..targets import Preset

Config = dict[str, int]
COLD_FAMILIES = ("q4_gemv", "attention_decode")  # decode: timed with cold caches (see `timer`)
WEIGHT_FAMILIES = ("q4_gemv",)  # their large arguments are weights: in huge pages, as the engine has them
CONFIRM_ROUNDS = 12
SIGN_TEST_ALPHA = 0.02


@dataclass
class SearchResult:
    family: str
    key: str  # shape key (compile/knobs: shape_key, attention_key)
    default: Config
    best: Config
    kept: bool  # best != default and it won beyond noise
    times_ms: dict[str, list[float]] = field(default_factory=dict)  # label -> per-round times
    read_bytes: int = 0  # bytes a call streams from memory (cold families; 0 for the others)
    bandwidth: float = 0.0  # this machine's read bandwidth (B/s): median of the probe passes around it
    # probe passes (B/s) and the chosen setting's cold timings (ms) between them (`pair_with_probe`)
    pairs: dict[str, list[float]] | None = None

    @property
    def chosen(self) -> Config:
        return self.best if self.kept else self.default

    @property
    def roofline_fraction(self) -> float | None:
        """Bytes/s the chosen setting streams over the probe's: how far from the memory roofline the kernel
        is, whatever the search found (None: not a memory-bound timing). With `pairs`, the median over
        timings each judged against the probe passes around it; else the search median over `bandwidth`."""
        if not self.read_bytes:
            return None
        if self.pairs is not None:
            ms = self.pairs["ms"]
            return float(
                np.median(
                    paired_fractions(self.pairs["probe_bytes_s"], np.asarray(ms) / 1e3, self.read_bytes)
                )
            )
        if not self.bandwidth:
            return None
        return self.read_bytes / (self._median(self.chosen) / 1e3) / self.bandwidth

    def _median(self, cfg: Config) -> float:
        return statistics.median(self.times_ms[label(cfg)])

    @property
    def speedup(self) -> float:
        """Default time / chosen time, per confirmation pair, median (1.0 when the default is kept)."""
        if not self.kept:
            return 1.0
        d, b = (
            self.times_ms.get(f"confirm:{label(self.default)}"),
            self.times_ms.get(f"confirm:{label(self.best)}"),
        )
        if not d or not b:  # a result made without `interleaved_search`'s confirmation
            return self._median(self.default) / self._median(self.best)
        return statistics.median(x / y for x, y in zip(d, b, strict=True))

    @property
    def fastest(self) -> Config:
        """The setting with the lowest median in the search rounds, kept or not."""
        searched = [k for k in self.times_ms if not k.startswith("confirm:")]
        best = min(searched, key=lambda k: statistics.median(self.times_ms[k]))
        return {k: int(v) for k, v in (kv.split("=") for kv in best.split(","))}

    @property
    def fastest_speedup(self) -> float:
        return self._median(self.default) / self._median(self.fastest)


def label(cfg: Config) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def sign_test_wins(pairs: int, alpha: float = SIGN_TEST_ALPHA) -> int:
    """Fewest wins in `pairs` that two equally fast settings reach with probability <= alpha."""
    tail = 0.0
    for wins in range(pairs, -1, -1):
        tail += math.comb(pairs, wins) / 2**pairs
        if tail > alpha:
            return wins + 1
    return 0


def interleaved_search(
    configs: list[Config],
    measure: Callable[[Config], float],
    rounds: int = 4,
    margin: float = 0.03,
    confirm: int = CONFIRM_ROUNDS,
) -> tuple[Config, bool, dict[str, list[float]]]:
    """configs[0] is the default. -> (chosen config, whether it is not the default, times per label; the
    confirmation's pairs under "confirm:<label>" for the default and the candidate)."""
    times: dict[str, list[float]] = {label(c): [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            times[label(c)].append(measure(c))
    default = configs[0]
    best = min(configs, key=lambda c: statistics.median(times[label(c)]))
    if best is default:
        return default, False, times
    d, b = times[f"confirm:{label(default)}"], times[f"confirm:{label(best)}"] = [], []
    for r in range(confirm):
        for c, out in ((default, d), (best, b)) if r % 2 == 0 else ((best, b), (default, d)):
            out.append(measure(c))
    ratios = [x / y for x, y in zip(b, d, strict=True)]
    wins = statistics.median(ratios) < 1 - margin and sum(x < 1 for x in ratios) >= sign_test_wins(confirm)
    return (best if wins else default), wins, times


def candidates(
    family: str, default: Config, valid: Callable[[Config], bool], space: dict | None = None
) -> list[Config]:
    """The default first, then every other valid point of the family's space (`space`: SPACE's)."""
    space = (space or SPACE)[family]
    names = list(space)
    out = [default]
    for values in itertools.product(*(space[n] for n in names)):
        cfg = dict(zip(names, values, strict=True))
        if cfg != default and valid(cfg):
            out.append(cfg)
    return out


# -- timing one built kernel ------------------------------------------------------------------------
def _random_args(func: tvm.tirx.PrimFunc, dev) -> list:
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        if not getattr(p, "shape", None):  # buffer params carry their shape (TVM 0.27)
            raise ValueError(f"knob search needs static buffer params, got {p}")
        shape = [int(x) for x in p.shape]
        dt = str(p.dtype)
        if dt.startswith(("uint", "int")):
            data = rng.integers(0, 8, size=shape).astype(dt)
        else:
            data = (rng.standard_normal(shape) * 0.1).astype(dt)
        args.append(tvm.runtime.tensor(data, dev))
    return args


COLD_BYTES = 256 << 20  # at least this much per cold timing; twice the last-level cache where that is more


def cold_target_bytes() -> int:
    """Bytes a cold timing cycles through (`hostinfo.uncached_bytes`)."""
    from ..hostinfo import uncached_bytes

    return uncached_bytes(COLD_BYTES)


COLD_ARG_BYTES = 1 << 20  # arguments this large get their own copies in a cold timing (weights, KV pages)


def _nbytes(a) -> int:
    return int(np.prod(a.shape)) * np.dtype(str(a.dtype)).itemsize if hasattr(a, "shape") else 0


def cold_bytes(args: list) -> int:
    """Bytes of the arguments a cold timing keeps out of the caches: what a call must read from memory."""
    return sum(n for n in map(_nbytes, args) if n >= COLD_ARG_BYTES)


def cold_sets(args: list, huge: bool = False) -> list[list]:
    """`args` and copies of its large arguments (scalars and small buffers shared), enough copies to
    overflow the caches."""
    dev = tvm.cpu()
    host = [a.numpy() if hasattr(a, "numpy") else None for a in args]  # scalars stay shared
    big = [h is not None and h.nbytes >= COLD_ARG_BYTES for h in host]
    total = sum(h.nbytes for h, b in zip(host, big) if b)
    copies = max(2, -(-cold_target_bytes() // total)) if total else 1  # nothing large: nothing to keep cold
    fresh = [lambda a=a, h=h, b=b: tvm.runtime.tensor(h, dev) if b else a for a, h, b in zip(args, host, big)]
    sets = [list(args)] + [[make() for make in fresh] for _ in range(copies - 1)]
    return [_large_in_huge_pages(s, big) for s in sets] if huge else sets


def _large_in_huge_pages(args: list, big: list[bool]) -> list:
    """`args` with its large arguments moved into huge pages, as the engine keeps a model's weights
    (toolkit/hugepages.py; not the KV cache, which TVM allocates): a weight on 4 KiB pages would time
    another memory system."""
    from ..hugepages import in_huge_pages

    moved = iter(in_huge_pages([a for a, b in zip(args, big) if b], tvm.cpu()))
    return [next(moved) if b else a for a, b in zip(args, big)]


def timer(
    func: tvm.tirx.PrimFunc, target, args: list | None = None, cold: bool = False, sets: list | None = None
) -> Callable[[], float]:
    """Build `func` and return a function that times it, in ms per call: warm, one batch of runs (>= 40
    ms); `cold`, back-to-back calls each on its own copy of the large arguments (`sets`, else made from
    `args` by `cold_sets`), copies enough to overflow the caches, which is how decode meets its weights and
    cache (read once per token, far more than the caches hold, the thread pool busy throughout). Not
    TVM's `cache_flush_bytes`: its flush is a one-thread copy that leaves the cache full of dirty lines, so
    the timed call also pays their write-back and its idle pool threads' wake-up (2-thread GEMVs timed
    ~2.7x slower than in decode, and noisy). Without `args`, the buffers are random at the func's static
    shapes."""
    rt = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu()
    if sets is not None:
        args = sets[0]
    args = args if args is not None else _random_args(func, dev)
    if not cold:
        evaluator = rt.mod.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=40)
        evaluator(*args)  # warm: first touch of the buffers, thread pool start
        return lambda: float(evaluator(*args).mean) * 1e3
    sets = sets if sets is not None else cold_sets(args)
    f = rt.mod["main"]
    for s in sets:  # warm: first touch of every copy, thread pool start
        f(*s)

    def run() -> float:
        t0 = time.perf_counter()
        for s in sets:
            f(*s)
        return (time.perf_counter() - t0) * 1e3 / len(sets)

    return run


# -- the model's hand kernels -----------------------------------------------------------------------
@dataclass
class Target_:
    family: str
    key: str
    build: Callable[[Config], Any]  # config -> PrimFunc (None: the kernel declines those sizes)
    args: Callable[[], list] | None = None  # the call's arguments (None: random, from static shapes)
    weight: float = 0.0  # bytes a step moves through it: the ranking for --quick


def matmul_targets(cfg, quantization: str, preset: Preset, prefill_len: int) -> list[Target_]:
    """The q4 GEMVs (decode) and int8 GEMMs (prefill) of the model, one per distinct shape (GGUF Q4_1, Q8_0
    and Q4_K blocks included: the same kernels and knobs); not the GEMMs on CPUs that run them on AMX
    tiles (`cpu_amx_gemm`: no knobs)."""
    from ..compile.cpu_isa import q8_gemm_isa
    from ..compile.cpu_schedule import CPUQ8VNNIGEMM, INT8_LAYOUTS, CPUQ8DotGEMV, _match_q4_matmul
    from ..compile.workloads import call_counts, specialize, step_binding
    from .extract import lower_model

    if preset.q4_activations != "int8":
        return []
    mod = lower_model(cfg, quantization, preset)
    decode = call_counts(mod, "decode")
    prefill = call_counts(mod, "prefill")
    target = preset.target
    amx = q8_gemm_isa(target) == "amx"
    out: dict[str, Target_] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        q = _match_q4_matmul(func, INT8_LAYOUTS)
        if q is None:
            continue
        key = shape_key(q.n, q.k)
        for step, calls in (("decode", decode[gv.name_hint]), ("prefill", prefill[gv.name_hint])):
            if not calls or (step == "prefill" and amx):  # the AMX GEMM has no knobs to search
                continue
            fam = "q4_gemv" if step == "decode" else "q8_gemm"
            static = specialize(func, step_binding(func, step == "decode", prefill_len))

            def build(c: Config, static=static, fam=fam):
                if fam == "q4_gemv":
                    rule = CPUQ8DotGEMV(
                        rows=c["rows"],
                        tile=c["tile"],
                        prefetch=c["prefetch"],
                        prefetch_level=c["prefetch_level"],
                    )
                else:
                    rule = CPUQ8VNNIGEMM(knobs=Knobs({"q8_gemm": {"*": dict(c)}}))
                sch = rule.apply(static, target, False)
                return None if sch is None else sch.mod["main"]

            weight = q.n * q.k * q.layout.bits / 8 * calls  # code bytes (GGUF Q8_0: 8 bits)
            prev = out.get(f"{fam}:{key}")
            out[f"{fam}:{key}"] = Target_(fam, key, build, weight=weight + (prev.weight if prev else 0))
    return list(out.values())


def attention_targets(cfg, preset: Preset, context: int, prefill_len: int) -> list[Target_]:
    """The decode kernel over `context` cached keys and the ragged prefill kernel over `prefill_len` tokens,
    at the model's head shapes and the preset's cache dtype."""
    from ..compile.compile_model import graph_options
    from ..compile.cpu_attention import AttentionKnobs, decode_attention_cpu, prefill_ragged_attention_cpu
    from ..compile.knobs import attention_key

    dtype = graph_options("q0f32", preset).cache_dtype
    h_kv, h_qo, d = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    page, scale = 16, 1 / float(np.sqrt(d))
    n_pages = -(-context // page)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()

    def t(a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    def decode_args() -> list:
        zeros = np.zeros(1, "int32")
        return [
            t(rng.standard_normal((1, h_qo, d)).astype(dtype)),
            t(rng.standard_normal((n_pages, 2, h_kv, page, d)).astype(dtype)),
            t(np.array([0, n_pages], "int32")),
            t(np.arange(n_pages, dtype="int32")),
            t(np.array([context - (n_pages - 1) * page], "int32")),
            t(zeros),
            t(zeros),
            t(np.zeros((1, h_qo, d), dtype)),
            t(np.zeros((1, h_qo), "float32")),
            0,
            1.0,
            1e4,
            scale,
        ]

    def prefill_args() -> list:
        n = prefill_len
        indptr = np.array([0, n], "int32")
        return [
            t(rng.standard_normal((n, h_qo, d)).astype(dtype)),
            t(indptr),
            t(rng.standard_normal((n, h_kv, d)).astype(dtype)),
            t(rng.standard_normal((n, h_kv, d)).astype(dtype)),
            t(indptr),
            t(np.zeros(n, "int32")),
            t(np.zeros(1, "int32")),
            t(np.zeros((n, h_qo, d), dtype)),
            t(np.zeros((n, h_qo), "float32")),
            1,
            0,
            1.0,
            1e4,
            scale,
        ]

    def fits(c: Config) -> bool:
        return d % c["lanes"] == 0

    def decode(c: Config):
        return (
            decode_attention_cpu(h_kv, h_qo, d, dtype, False, page, 0, AttentionKnobs(**c))
            if fits(c)
            else None
        )

    def prefill(c: Config):
        return prefill_ragged_attention_cpu(h_kv, h_qo, d, dtype, 0, AttentionKnobs(**c)) if fits(c) else None

    kv_bytes = 2 * context * h_kv * d * np.dtype(dtype).itemsize * cfg.num_hidden_layers
    key = attention_key(h_qo, h_kv, d)
    return [
        Target_("attention_decode", key, decode, args=decode_args, weight=kv_bytes),
        Target_("attention_prefill", key, prefill, args=prefill_args, weight=kv_bytes / 4),
    ]


def search_model(
    cfg,
    quantization: str,
    preset: Preset,
    *,
    quick: bool = False,
    rounds: int = 4,
    margin: float = 0.03,
    context: int = 1024,
    prefill_len: int = 128,
    progress: Callable[[str], None] = lambda m: None,
    schedules_root: Path | str | None = None,
) -> list[SearchResult]:
    """Search every hand kernel family of the model (`quick`: the 3 that move the most bytes per step,
    the GEMVs' `rows` fixed at its default) against the sizes a compile with the records under
    `schedules_root` (the package's by default) uses: the record written there is a change of those."""
    if preset.kind != "llvm" or not preset.runs_here:
        raise ValueError(f"knob search measures here: '{preset.name}' is not this machine's CPU")
    # timed with as many threads as the compiled library runs with (TVM's own default can be fewer)
    threads = int(preset.target.attrs.get("num-cores", 1) or 1)
    size_thread_pool(threads)
    current = knobs_for(preset, schedules_root)
    found = attention_targets(cfg, preset, context, prefill_len) + matmul_targets(
        cfg, quantization, preset, prefill_len
    )
    found.sort(key=lambda t: -t.weight)
    if quick:
        found = found[:3]
    results = []
    target = preset.target
    probe = None
    for tgt in found:
        if tgt.family == "q4_gemv":
            n, k = (int(x) for x in tgt.key.split("x"))
            default = current.gemv(n, k)
        else:
            default = current.get(tgt.family, tgt.key)
        # the ceiling a memory-bound kernel is judged against, probed around its timings (it drifts here)
        if tgt.family in COLD_FAMILIES and probe is None:
            from ..read_bandwidth import ReadProbe

            probe = ReadProbe(threads, cold_target_bytes())
        res = _search_one(tgt, default, target, quick, rounds, margin, progress, probe)
        if res is not None:
            results.append(res)
    return results


PAIRS = 16  # cold timings of the chosen setting, each between two probe passes
BANDWIDTH_SHIFT = 1.3  # max/min of the probe passes beyond which the host changed state during the timings


def pair_with_probe(run: Callable[[], float], rate: Callable[[], float], n: int = PAIRS) -> dict:
    """`n` timings of `run` (ms), each between two passes of `rate` (B/s): `n + 1` passes."""
    rates, ms = [rate()], []
    for _ in range(n):
        ms.append(run())
        rates.append(rate())
    return {"probe_bytes_s": rates, "ms": ms}


def _search_one(
    tgt: Target_,
    default: Config,
    target,
    quick: bool,
    rounds: int,
    margin: float,
    progress,
    probe=None,
):
    built: dict[str, Callable[[], float]] = {}
    cold = tgt.family in COLD_FAMILIES
    shared: dict[str, Any] = {}  # one set of arguments (and cold copies) for every setting

    def valid(c: Config) -> bool:
        if quick and tgt.family == "q4_gemv" and c["rows"] != default["rows"]:
            return False
        if c.get("prefetch") == 0 and c.get("prefetch_level", 1) != 1:
            return False  # no prefetch: the level means nothing
        func = tgt.build(c)
        if func is None:
            return False
        if not shared:
            args = tgt.args() if tgt.args else _random_args(func, tvm.cpu())
            sets = cold_sets(args, huge=tgt.family in WEIGHT_FAMILIES) if cold else None
            shared.update(args=args, sets=sets)
        built[label(c)] = timer(func, target, shared["args"], cold, shared["sets"])
        return True

    if not valid(default):
        return None
    configs = candidates(tgt.family, default, valid)
    progress(f"{tgt.family} {tgt.key}: {len(configs)} settings x {rounds} rounds")
    best, kept, times = interleaved_search(configs, lambda c: built[label(c)](), rounds, margin)
    read_bytes = cold_bytes(shared["args"]) if cold else 0
    res = SearchResult(tgt.family, tgt.key, default, best, kept, times, read_bytes)
    if cold and probe is not None:
        res.pairs = pair_with_probe(built[label(res.chosen)], probe.rate)
        res.bandwidth = float(np.median(res.pairs["probe_bytes_s"]))
    verdict = "default"
    if res.fastest != default:
        verdict = (
            f"kept ({res.speedup:.2f}x when confirmed)"
            if kept
            else "not confirmed beyond noise, default kept"
        )
    progress(
        f"  default {label(default)} {statistics.median(times[label(default)]):.3f} ms; "
        f"fastest {label(res.fastest)} ({res.fastest_speedup:.2f}x): {verdict}"
    )
    if res.roofline_fraction is not None:
        progress(f"  {roofline_words(res)}")
    return res


def roofline_words(r: SearchResult) -> str:
    """The line `phi3 tune` prints on a memory-bound kernel: its read rate and fraction of the probe."""
    if r.pairs is None:
        rate = r.roofline_fraction * r.bandwidth
        around = f"probed before it ({r.bandwidth / 1e9:.1f} GB/s)"
    else:
        rate = r.read_bytes / (statistics.median(r.pairs["ms"]) / 1e3)
        around = (
            f"probed around each of {len(r.pairs['ms'])} timings (median; probe "
            f"{min(r.pairs['probe_bytes_s']) / 1e9:.0f}-{max(r.pairs['probe_bytes_s']) / 1e9:.0f} GB/s)"
        )
    words = (
        f"reads {r.read_bytes / 2**20:.1f} MiB per call at {rate / 1e9:.1f} GB/s: "
        f"{r.roofline_fraction:.0%} of the read bandwidth {around}"
    )
    if r.pairs is not None and max(r.pairs["probe_bytes_s"]) > BANDWIDTH_SHIFT * min(
        r.pairs["probe_bytes_s"]
    ):
        words += (
            "; the bandwidth shifted during these timings (a shared host): prefetch settings rank "
            "differently in its slow and fast states, so re-run the tune when it holds steady"
        )
    return words


def roofline_summary(results: list[SearchResult]) -> str | None:
    """One line on how close the memory-bound kernels' chosen settings are to this machine's bandwidth."""
    rows = [r for r in results if r.roofline_fraction is not None]
    if not rows:
        return None
    fr = [r.roofline_fraction for r in rows]
    each = ", ".join(f"{r.family} {r.key} {r.roofline_fraction:.0%}" for r in rows)
    return f"memory-bound kernels at {min(fr):.0%}-{max(fr):.0%} of the probed read bandwidth ({each})"


def write_knob_record(
    preset: Preset, results: list[SearchResult], schedules_root: Path | str | None = None
) -> Path:
    """This machine's record (merged over its earlier one), written atomically."""
    from ..compile.tuned_records import device_fingerprint

    fp = device_fingerprint(preset)
    path = record_path(preset, fp, schedules_root)
    with output_lock(path):  # a second tuner merges over this one's record, not under it
        try:
            old = json.loads(path.read_text())
            ok = old.get("schema") == SCHEMA and old.get("fingerprint", {}).get("match") == fp["match"]
            kernels = old.get("kernels", {}) if ok and old.get("tvm_version") == tvm.__version__ else {}
            measured = old.get("measurements", []) if kernels else []
        except (OSError, ValueError):
            kernels, measured = {}, []
        for r in results:
            if r.kept:
                kernels.setdefault(r.family, {})[r.key] = r.best
            else:  # a re-run that no longer beats the default drops the old choice
                kernels.get(r.family, {}).pop(r.key, None)
            measured = [m for m in measured if (m["family"], m["key"]) != (r.family, r.key)]
            measured.append(
                {
                    "family": r.family,
                    "key": r.key,
                    "default": r.default,
                    "best": r.best,
                    "kept": r.kept,
                    "median_ms": {k: statistics.median(v) for k, v in r.times_ms.items()},
                    **(
                        {
                            "read_bytes": r.read_bytes,
                            "probe_bytes_s": r.bandwidth,
                            "roofline_fraction": r.roofline_fraction,
                        }
                        if r.roofline_fraction is not None
                        else {}
                    ),
                }
            )
        record = {
            "schema": SCHEMA,
            "fingerprint": fp,
            "tvm_version": tvm.__version__,
            "kernels": {f: v for f, v in kernels.items() if v},
            "measurements": measured,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
