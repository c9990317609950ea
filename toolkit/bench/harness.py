"""`phi3 bench`: prefill and decode throughput of our engine, optionally side by side with llama.cpp.

Method (the same for every backend, see `timing.timed_generation`): one run = reset the sequence, prefill
a prompt of random token ids in one call, then greedy-decode `decode_tokens` tokens one call each. Per
thread count, backends and prompt lengths are interleaved run by run (ours, llama.cpp FA off, llama.cpp FA
on, ...) so that a noisy neighbour slows all of them alike; the first `warmup` rounds are discarded, the
next `repeats` give the median and spread.

JSON (`schema` "phi3-bench/1"): `model`, `settings`, `machine` (CPU, load average before/after),
`roofline` (weight bytes per token, measured read bandwidth per thread count), `results` (one entry per
thread count: `ours` and, with llama.cpp, `llama_cpp` keyed by flash-attention setting; each has
`by_prompt_length` summaries plus the headline `prefill_tok_s` / `decode_tok_s` / `ttft_s` at the longest
prompt length; on CPU presets `roofline.paired` for ours and `roofline_paired` per llama.cpp setting: decode
steps timed between probe passes, `pairing`), and with llama.cpp the top-level `decode_ratio_vs_llama_cpp` and
`prefill_ratio_vs_llama_cpp`: ours over llama.cpp's best flash-attention setting for that metric, keyed by
thread count (as a string). A ratio > 1 means we are faster.

With several KV cache dtypes (`--kv-cache float16,float32`: one engine per dtype, interleaved run by run
with the other backends) `ours`, the roofline and the llama.cpp ratios are those of the first dtype listed,
and each result also has `ours_by_kv_cache` (dtype -> the same summary as `ours`, in the order listed, plus
`roofline_fraction` / `roofline_paired` as the llama.cpp sides have them) and, with two dtypes,
`kv_cache_ratio`: `of` (the second dtype) over `over` (the first), `decode` and `prefill` medians at the
headline prompt length. One dtype (or none) gives neither key."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import UserError
from ..hostinfo import cpu_name, isa_flags
from ..outputs import save_figure
from .pairing import engine_pairs, paired_decode, summarize_pairs
from .timing import Backend, peak_rss_bytes, summarize_runs, timed_generation

SCHEMA = "phi3-bench/1"


@dataclass
class BenchSettings:
    threads: list[int] = field(default_factory=lambda: [1, 2])
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128])
    decode_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    quantization: str = "q4f32_1"
    device: str = "host"
    # override the preset's KV cache dtype (CPU presets); a comma-separated list runs one engine per dtype
    kv_cache: str | None = None
    vs_llama_cpp: bool = False
    llama_flash_attn: list[bool] = field(default_factory=lambda: [False, True])
    seed: int = 0
    bandwidth_bytes: int = 1 << 30
    # decode steps timed between probe passes, per backend and thread count (`pairing`; 0: none)
    roofline_pairs: int = 24

    def validate(self) -> None:
        from ..targets import load_preset

        if not self.threads or min(self.threads) < 1:
            raise UserError("--threads needs positive thread counts")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise UserError("--prompt-lengths needs positive lengths")
        if self.decode_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise UserError("--decode-tokens and --repeats must be >= 1, --warmup >= 0")
        if self.roofline_pairs < 0:
            raise UserError("--roofline-pairs must be >= 0")
        if self.kv_cache is not None:
            dtypes = self.kv_cache_dtypes
            if "" in dtypes:
                raise UserError(f"--kv-cache {self.kv_cache!r}: an empty entry in the list")
            twice = sorted({d for d in dtypes if dtypes.count(d) > 1})
            if twice:
                raise UserError(f"--kv-cache {self.kv_cache}: {', '.join(twice)} listed twice")
            preset = load_preset(self.device)
            for dtype in dtypes:
                preset.with_kv_cache(dtype)  # a known dtype, CPU presets only
        missing = load_preset(self.device).missing_features
        if missing:
            lacks = ", ".join(missing)
            raise UserError(f"--device {self.device}: this CPU lacks {lacks}; that code can't run here")
        if self.vs_llama_cpp and not _runs_here(self.device):
            raise UserError(f"llama.cpp is only built for the host CPU here, not --device {self.device}")

    @property
    def cpu(self) -> str | None:
        """The CPU class both sides are built for (`--device host:CPU`); None: this machine's own."""
        from ..targets import load_preset

        return load_preset(self.device).cpu

    @property
    def kv_cache_dtypes(self) -> list[str | None]:
        """The KV cache dtype of each of our engines, the headline first; [None]: the preset's own."""
        if self.kv_cache is None:
            return [None]
        return [d.strip() for d in self.kv_cache.split(",")]

    @property
    def context_needed(self) -> int:
        """Positions of the longest run: the headline prompt, then its decode or its paired roofline steps."""
        return max(self.prompt_lengths) + max(self.decode_tokens, self.roofline_pairs) + 1

    def check_context(self, cfg) -> None:
        """UserError, before any build, when the longest run does not fit our engine's context window."""
        from ..runtime.engine import CacheOptions

        window = CacheOptions().window_for(cfg)
        if self.context_needed > window:
            raise UserError(
                f"--context / --prompt-lengths: a prompt of {max(self.prompt_lengths)} tokens and the "
                f"{self.context_needed - max(self.prompt_lengths) - 1} decode steps after it need "
                f"{self.context_needed} positions; the engine holds {window}"
            )


class Runner(Protocol):
    """Something that performs one timed generation (in this process or in a worker)."""

    info: dict[str, Any]

    def run(self, tokens: Sequence[int], decode_tokens: int) -> dict[str, Any]: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Times a `Backend` in this process; pairs its decode steps with probe passes when given a probe."""

    def __init__(
        self,
        backend: Backend,
        info: dict[str, Any] | None = None,
        close=None,
        probe_rate: Callable[[], float] | None = None,
    ) -> None:
        self.backend, self.info, self._close, self.probe_rate = backend, info or {}, close, probe_rate

    def run(self, tokens: Sequence[int], decode_tokens: int) -> dict[str, Any]:
        out = timed_generation(self.backend, tokens, decode_tokens)
        out["rss_peak_bytes"] = peak_rss_bytes()
        return out

    def pair(self, tokens: Sequence[int], steps: int, nbytes: int) -> dict[str, list[float]] | None:
        if self.probe_rate is None:
            return None
        return paired_decode(self.backend, tokens, steps, self.probe_rate)

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self.backend = None  # drop the engine before the next thread count loads its own


class EngineBackend:
    """Our `Engine` seen as a Backend: one live sequence, replaced on reset."""

    def __init__(self, engine) -> None:
        self.engine, self.seq = engine, None

    def reset(self) -> None:
        if self.seq is not None:
            self.engine.remove_sequence(self.seq)
        self.seq = self.engine.add_sequence()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.prefill(self.seq, list(tokens))

    def decode(self, token: int) -> np.ndarray:
        return self.engine.decode(self.seq, token)


def _runs_here(device: str) -> bool:
    from ..targets import load_preset

    return load_preset(device).runs_here


def _on_cpu(device: str) -> bool:
    from ..targets import load_preset

    return not load_preset(device).is_gpu


# factories: (model, settings, threads) -> Runner; tests inject doubles, the CLI uses the defaults below.
# Our engine's factory and pairs get settings whose `kv_cache` is the one dtype of that engine.
OursFactory = Callable[[Any, BenchSettings, int], Runner]
LlamaFactory = Callable[[Path, BenchSettings, int, bool], Runner]
# (model, settings, threads, prompt) -> raw pairs of our engine (`pairing.paired_decode`)
OursPairs = Callable[[Any, BenchSettings, int, Sequence[int]], dict[str, list[float]]]


def load_our_engine(model: Any, quantization: str, device: str, threads: int, kv_cache: str | None = None):
    """Our engine for `model` (compiled and cached on first use) with a CPU pool of `threads` threads."""
    from ..runtime import engine as rt

    engine, _source = rt.load_engine(
        model, quantization=quantization, device=device, threads=threads, kv_cache=kv_cache
    )
    return engine


def default_quantization() -> str:
    from ..quantization import DEFAULT_QUANTIZATION

    return DEFAULT_QUANTIZATION


def engine_runner(model: Any, s: BenchSettings, threads: int) -> Runner:
    (kv_cache,) = s.kv_cache_dtypes  # one engine per dtype: run_bench hands each its own settings
    engine = load_our_engine(model, s.quantization, s.device, threads, kv_cache)
    info: dict[str, Any] = {
        "quantization": s.quantization,
        "device": s.device,
        "kv_cache_dtype": engine.compiled.manifest.get("kv_cache_dtype"),
    }
    return InProcessRunner(EngineBackend(engine), info)


def llama_cpp_runner(gguf_path: Path, s: BenchSettings, threads: int, flash_attn: bool) -> Runner:
    from .llama_cpp import LlamaCppWorker

    n_ctx = max(512, -(-s.context_needed // 256) * 256)
    n_batch = max(512, max(s.prompt_lengths))  # the whole prompt is one ubatch, as in the reference method
    worker = LlamaCppWorker(
        gguf_path, threads=threads, flash_attn=flash_attn, n_ctx=n_ctx, n_batch=n_batch, cpu=s.cpu
    )
    worker.info["kv_cache_dtype"] = "float16"  # llama.cpp's default type_k / type_v, which we leave
    return worker


def llama_gguf_for(model: Any, src, log: Callable[[str], None]) -> Path:
    """The GGUF llama.cpp runs: the model if it is one, else a Q4_0 export cached by source path+mtime."""
    if src.kind == "gguf":
        return Path(src.path)
    import hashlib

    from ..checkpoint.gguf_export import export_gguf
    from ..paths import cache_root

    stamp = max((p.stat().st_mtime_ns for p in Path(src.path).rglob("*") if p.is_file()), default=0)
    key = hashlib.sha256(f"{Path(src.path).resolve()}:{stamp}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{Path(src.path).name}-{key}-q4_0.gguf"
    if not out.is_file():
        log(f"exporting {src.path} to {out} (Q4_0) for llama.cpp")
        export_gguf(src.path, out, qtype="q4_0")
    return out


def measure_bandwidth(threads: Sequence[int], nbytes: int) -> dict[str, float]:
    """Read bandwidth per thread count, measured in a child so its 1 GiB array never counts in our RSS."""
    code = (
        "import json,sys; from toolkit.tvm_compat import tvm_without_torch; tvm_without_torch(); "
        "from toolkit.read_bandwidth import measure_read_bandwidth as m; "
        f"print(json.dumps({{str(t): m(t, {int(nbytes)}) for t in {list(threads)!r}}}))"
    )
    env = dict(os.environ, TVM_NUM_THREADS=str(max(threads)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bandwidth measurement failed: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ours_key(index: int, kv_cache: str | None) -> str:
    """Runner / pairs key of our engine with the `index`-th listed KV dtype: the first is plain `ours`."""
    return "ours" if index == 0 else f"ours_kv_{kv_cache}"


def _side_summary(runs_by_len: dict[int, list[dict]], headline: int) -> dict[str, Any]:
    by_len = [summarize_runs(runs_by_len[p]) for p in sorted(runs_by_len)]
    head = next(b for b in by_len if b["prompt_len"] == headline)
    peak = max(r.get("rss_peak_bytes", 0) for runs in runs_by_len.values() for r in runs)
    return {
        "by_prompt_length": by_len,
        "prefill_tok_s": head["prefill_tok_s"],
        "decode_tok_s": head["decode_tok_s"],
        "ttft_s": head["ttft_s"],
        "peak_rss_bytes": peak,
        "greedy_tokens": runs_by_len[headline][-1]["tokens"][:16],
    }


def run_bench(
    model: Any,
    settings: BenchSettings,
    *,
    config=None,
    llama_gguf: Path | None = None,
    ours_factory: OursFactory = engine_runner,
    llama_factory: LlamaFactory = llama_cpp_runner,
    measure_bw: Callable[[Sequence[int], int], dict[str, float]] = measure_bandwidth,
    ours_pairs: OursPairs = engine_pairs,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    """Run the whole bench and return the JSON-ready result. `config` is the model's Phi3Config."""
    from .roofline import gguf_weight_bytes_per_token, weight_bytes_per_token

    s = settings
    s.validate()
    s.check_context(config)
    vocab = config.vocab_size
    headline = max(s.prompt_lengths)
    rng = np.random.default_rng(s.seed)
    # ids 0..2 are special in most vocabularies; random text-like ids keep both engines on the common path
    prompts = {p: rng.integers(3, vocab, size=p).tolist() for p in sorted(set(s.prompt_lengths))}

    load_before = os.getloadavg()
    on_cpu = _on_cpu(s.device)
    bandwidth: dict[str, float] = {}
    if on_cpu:  # the host's DRAM: no ceiling for a GPU's decode
        log("measuring memory read bandwidth ...")
        bandwidth = measure_bw(s.threads, s.bandwidth_bytes)
    our_bytes = weight_bytes_per_token(config, s.quantization)
    llama_bytes = gguf_weight_bytes_per_token(llama_gguf) if s.vs_llama_cpp and llama_gguf else None

    results = []
    llama_meta: dict[str, Any] = {}
    n_pairs = s.roofline_pairs if on_cpu else 0
    kv_caches = s.kv_cache_dtypes
    # one settings per engine, each with its one KV dtype (the list form never reaches the engine)
    ours_settings = {_ours_key(i, kv): replace(s, kv_cache=kv) for i, kv in enumerate(kv_caches)}
    for t in s.threads:
        runners: dict[str, Runner] = {}
        try:
            # every KV variant is loaded at once (two Phi-3-mini engines fit) so that runs interleave
            for key, vs in ours_settings.items():
                kv = f" (kv cache {vs.kv_cache})" if len(kv_caches) > 1 else ""
                log(f"[threads={t}] loading our engine{kv} ...")
                runners[key] = ours_factory(model, vs, t)
            our_bytes = runners["ours"].info.get("weight_bytes_per_token", our_bytes)
            if s.vs_llama_cpp:
                for fa in s.llama_flash_attn:
                    log(f"[threads={t}] loading llama.cpp (flash_attn={'on' if fa else 'off'}) ...")
                    runners[f"llama_cpp_fa_{'on' if fa else 'off'}"] = llama_factory(llama_gguf, s, t, fa)
            kv_dtypes = {k: r.info.get("kv_cache_dtype") for k, r in runners.items()}
            runs: dict[str, dict[int, list[dict]]] = {k: {p: [] for p in prompts} for k in runners}
            for it in range(s.warmup + s.repeats):
                for key, runner in runners.items():
                    for p, toks in prompts.items():
                        r = runner.run(toks, s.decode_tokens)
                        if it >= s.warmup:
                            runs[key][p].append(r)
                        log(
                            f"[threads={t}] {'warm-up' if it < s.warmup else f'run {it - s.warmup + 1}'} "
                            f"{key} prompt {p}: prefill {p / r['prefill_s']:.1f} tok/s, "
                            f"decode {r['decode_tokens'] / r['decode_s']:.2f} tok/s"
                        )
            for key, runner in runners.items():
                if key.startswith("llama_cpp") and not llama_meta:
                    llama_meta = {k: runner.info.get(k) for k in ("version", "amx", "system_info")}
            pairs: dict[str, dict[str, list[float]]] = {}
            if n_pairs:
                for key, runner in runners.items():
                    if key.startswith("llama_cpp") and hasattr(runner, "pair"):
                        log(f"[threads={t}] {key}: {n_pairs} decode steps between probe passes ...")
                        raw = runner.pair(prompts[headline], n_pairs, s.bandwidth_bytes)
                        if raw is not None:
                            pairs[key] = raw
        finally:
            for runner in runners.values():
                runner.close()
        if n_pairs:  # after the runners are gone: the child loads an engine of its own
            for key, vs in ours_settings.items():
                log(f"[threads={t}] {key}: {n_pairs} decode steps between probe passes ...")
                pairs[key] = ours_pairs(model, vs, t, prompts[headline])
        kv_reads = _kv_reads(config, kv_dtypes, headline)
        entry = _thread_entry(
            t, runs, headline, bandwidth.get(str(t)), our_bytes, llama_bytes, pairs, kv_caches, kv_reads
        )
        results.append(entry)

    from tvm.target import codegen

    from ..targets import load_preset

    out: dict[str, Any] = {
        "schema": SCHEMA,
        "model": _model_info(model, config, s),
        "settings": asdict(s),
        "machine": {
            "cpu": cpu_name(),
            "llvm_cpu": codegen.llvm_get_system_cpu(),
            # what host detection adds to or takes from that CPU name (a VM that hides AMX): the code's ISA
            "llvm_mattr": list(load_preset("host").target_dict.get("mattr", [])),
            "isa_flags": isa_flags(),
            "cores": os.cpu_count(),
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "python": platform.python_version(),
        },
        "roofline": {
            "weight_bytes_per_token": our_bytes,
            "read_bandwidth_bytes_s": bandwidth,
            "llama_cpp_weight_bytes_per_token": llama_bytes,
        },
        "results": results,
    }
    if s.vs_llama_cpp:
        out["llama_cpp"] = {"gguf": str(llama_gguf), "march": s.cpu or "native", **llama_meta}
        out["decode_ratio_vs_llama_cpp"] = {
            str(e["threads"]): e["decode_ratio_vs_llama_cpp"] for e in results
        }
        out["prefill_ratio_vs_llama_cpp"] = {
            str(e["threads"]): e["prefill_ratio_vs_llama_cpp"] for e in results
        }
    return out


def _kv_reads(config, kv_dtypes: dict[str, str | None], prompt: int) -> dict[str, Callable[[int], list[int]]]:
    """Per runner key whose KV dtype is known: the KV cache bytes of each of n decode steps after the
    headline prompt."""
    from .roofline import kv_bytes_of_steps

    return {k: functools.partial(kv_bytes_of_steps, config, dt, prompt) for k, dt in kv_dtypes.items() if dt}


def _kv_mean(side: dict[str, Any], kv: Callable[[int], list[int]]) -> float:
    """The KV cache bytes of the side's timed decode steps at the headline prompt (the longest: the last
    summary), on average."""
    return float(np.mean(kv(side["by_prompt_length"][-1]["decode_tokens"])))


def _with_kv(side: dict[str, Any], bw: float, weight_bytes: int, kv: Callable[[int], list[int]]) -> float:
    """The side's decode tok/s as a fraction of the roofline with its KV cache reads counted."""
    return side["decode_tok_s"]["median"] * (weight_bytes + _kv_mean(side, kv)) / bw


def _thread_entry(
    t: int,
    runs: dict[str, dict[int, list[dict]]],
    headline: int,
    bw: float | None,
    our_bytes: int,
    llama_bytes: int | None,
    pairs: dict[str, dict[str, list[float]]] | None = None,
    kv_caches: Sequence[str | None] = (None,),
    kv_reads: dict[str, Callable[[int], list[int]]] | None = None,
) -> dict[str, Any]:
    """One thread count's results. `kv_reads` (runner key -> KV bytes of n decode steps, `_kv_reads`) adds
    the fractions with the KV cache's reads counted, for the runners whose KV dtype is known."""
    pairs, kv_reads = pairs or {}, kv_reads or {}

    def paired(key: str, weight_bytes: int) -> dict[str, Any]:
        raw = pairs[key]
        kv = kv_reads[key](len(raw["decode_s"])) if key in kv_reads else None
        return summarize_pairs(raw, weight_bytes, kv)

    ours = _side_summary(runs["ours"], headline)
    entry: dict[str, Any] = {"threads": t, "ours": ours}
    if len(kv_caches) > 1:
        by_kv: dict[str, dict[str, Any]] = {}
        for i, kv in enumerate(kv_caches):
            key = _ours_key(i, kv)
            side = {**ours} if i == 0 else _side_summary(runs[key], headline)
            # weight bytes only, as for `ours`: the fp32 cache's larger KV reads count in no fraction
            if bw:
                side["roofline_fraction"] = side["decode_tok_s"]["median"] / (bw / our_bytes)
                if key in kv_reads:
                    side["roofline_fraction_with_kv"] = _with_kv(side, bw, our_bytes, kv_reads[key])
            if key in pairs:
                side["roofline_paired"] = paired(key, our_bytes)
            by_kv[str(kv)] = side
        entry["ours_by_kv_cache"] = by_kv
    if len(kv_caches) == 2:
        first, second = (entry["ours_by_kv_cache"][str(kv)] for kv in kv_caches)
        entry["kv_cache_ratio"] = {
            "of": kv_caches[1],
            "over": kv_caches[0],
            "decode": second["decode_tok_s"]["median"] / first["decode_tok_s"]["median"],
            "prefill": second["prefill_tok_s"]["median"] / first["prefill_tok_s"]["median"],
        }
    if bw:
        roof = bw / our_bytes
        entry["roofline"] = {
            "read_bandwidth_bytes_s": bw,
            "weight_bytes_per_token": our_bytes,
            "decode_tok_s_ceiling": roof,
            "fraction": ours["decode_tok_s"]["median"] / roof,
        }
        if "ours" in kv_reads:
            entry["roofline"]["kv_bytes_per_step"] = _kv_mean(ours, kv_reads["ours"])
            entry["roofline"]["fraction_with_kv"] = _with_kv(ours, bw, our_bytes, kv_reads["ours"])
    if "ours" in pairs:
        entry.setdefault("roofline", {"weight_bytes_per_token": our_bytes})
        entry["roofline"]["paired"] = paired("ours", our_bytes)
    llama = {
        k.removeprefix("llama_cpp_"): _side_summary(v, headline)
        for k, v in runs.items()
        if k.startswith("llama_cpp")
    }
    if llama:
        if bw and llama_bytes:
            for k, side in llama.items():
                side["roofline_fraction"] = side["decode_tok_s"]["median"] / (bw / llama_bytes)
                if f"llama_cpp_{k}" in kv_reads:
                    kv = kv_reads[f"llama_cpp_{k}"]
                    side["roofline_fraction_with_kv"] = _with_kv(side, bw, llama_bytes, kv)
        if llama_bytes:
            for k, side in llama.items():
                if f"llama_cpp_{k}" in pairs:
                    side["roofline_paired"] = paired(f"llama_cpp_{k}", llama_bytes)
        entry["llama_cpp"] = llama
        best_decode = max(v["decode_tok_s"]["median"] for v in llama.values())
        best_prefill = max(v["prefill_tok_s"]["median"] for v in llama.values())
        entry["decode_ratio_vs_llama_cpp"] = ours["decode_tok_s"]["median"] / best_decode
        entry["prefill_ratio_vs_llama_cpp"] = ours["prefill_tok_s"]["median"] / best_prefill
        entry["prefill_ratio_by_prompt_length"] = {
            str(o["prompt_len"]): o["prefill_tok_s"]["median"]
            / max(
                next(b for b in v["by_prompt_length"] if b["prompt_len"] == o["prompt_len"])["prefill_tok_s"][
                    "median"
                ]
                for v in llama.values()
            )
            for o in ours["by_prompt_length"]
        }
    return entry


def _model_info(model: Any, config, s: BenchSettings) -> dict[str, Any]:
    return {
        "path": None if model is None else str(model),
        "default_model": model is None,
        "quantization": s.quantization,
        "params": config.num_params(),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


# ---- reporting ------------------------------------------------------------------------------------------


def _fmt(stat: dict[str, float]) -> str:
    return f"{stat['median']:.2f} [{stat['min']:.2f}-{stat['max']:.2f}]"


def _machine_line(m: dict[str, Any]) -> str:
    """The CPU, its vector extensions and the load around the run: a number means little without them."""
    cpu = m.get("cpu") or "unknown CPU"
    if m.get("llvm_cpu"):
        cpu += f" (LLVM {' '.join([m['llvm_cpu'], *m.get('llvm_mattr', [])])})"
    parts = [f"machine: {cpu}, {m.get('cores', '?')} cpus"]
    if m.get("isa_flags"):
        parts.append(" ".join(m["isa_flags"]))
    if "loadavg_before" in m and "loadavg_after" in m:
        parts.append(f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after")
    return "; ".join(parts)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per thread count and backend, headline prompt length."""
    lines = [f"model: {result['model']['path'] or 'default model'} ({result['model']['quantization']})"]
    device = result.get("settings", {}).get("device", "host")
    if ":" in device:  # another CPU class's code on this machine: say so above its numbers
        march = result.get("llama_cpp", {}).get("march")
        both = f"; llama.cpp -march={march}" if march else ""
        lines.append(f"device: {device} (code for CPU {device.split(':', 1)[1]}{both}; run on this machine)")
    lines.append(_machine_line(result.get("machine", {})))
    lines.append(
        f"{'threads':>7}  {'backend':<16} {'prefill tok/s':>24} {'decode tok/s':>24} {'roofline':>9}"
    )
    for e in result["results"]:
        # one row per KV cache variant of ours when there are several; their sides carry their own roofline
        ours = [("ours", e["ours"])]
        if "ours_by_kv_cache" in e:
            ours = [(f"ours kv {kv}", side) for kv, side in e["ours_by_kv_cache"].items()]
        sides = ours + [(f"llama.cpp {k.replace('_', ' ')}", v) for k, v in e.get("llama_cpp", {}).items()]
        for name, side in sides:
            roof = e.get("roofline", {}) if name == "ours" else {}
            paired = roof.get("paired") if name == "ours" else side.get("roofline_paired")
            frac = paired["fraction"] if paired else roof.get("fraction", side.get("roofline_fraction"))
            frac_s = f"{100 * frac:.0f}%" if frac else "-"
            lines.append(
                f"{e['threads']:>7}  {name:<16} {_fmt(side['prefill_tok_s']):>24} "
                f"{_fmt(side['decode_tok_s']):>24} {frac_s:>9}"
            )
        if "kv_cache_ratio" in e:
            r = e["kv_cache_ratio"]
            lines.append(
                f"{'':>7}  ours kv {r['of']} / kv {r['over']}: decode {r['decode']:.2f}x, "
                f"prefill {r['prefill']:.2f}x"
            )
        if "decode_ratio_vs_llama_cpp" in e:
            head = f"ours kv {next(iter(e['ours_by_kv_cache']))}" if "ours_by_kv_cache" in e else "ours"
            lines.append(
                f"{'':>7}  {head} / llama.cpp best: decode {e['decode_ratio_vs_llama_cpp']:.2f}x, "
                f"prefill {e['prefill_ratio_vs_llama_cpp']:.2f}x"
            )
    if any("paired" in e.get("roofline", {}) for e in result["results"]):
        probes = [
            f"{e['threads']} thread{'s' if e['threads'] > 1 else ''} "
            f"{e['roofline']['paired']['probe_bytes_s']['median'] / 1e9:.1f} GB/s"
            for e in result["results"]
            if "paired" in e.get("roofline", {})
        ]
        lines.append(
            "roofline: weight bytes read per second in decode over the read bandwidth probed just before "
            f"and after each step (median over steps; probe median: {', '.join(probes)})"
        )
        with_kv = [
            f"{e['threads']} thread{'s' if e['threads'] > 1 else ''} "
            f"{100 * e['roofline']['paired']['fraction_with_kv']:.0f}%"
            for e in result["results"]
            if "fraction_with_kv" in e.get("roofline", {}).get("paired", {})
        ]
        if with_kv:
            lines.append(f"roofline of ours with the KV cache's reads counted too: {', '.join(with_kv)}")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: str | Path) -> Path:
    """Bars of prefill and decode tok/s per thread count and backend (min-max as error bars), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["results"]
    # (label, the side in each result): one bar per KV cache variant of ours, then llama.cpp's settings
    backends: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [("ours", lambda e: e["ours"])]
    if "ours_by_kv_cache" in results[0]:
        backends = [
            (f"ours kv {kv}", lambda e, kv=kv: e["ours_by_kv_cache"][kv])
            for kv in results[0]["ours_by_kv_cache"]
        ]
    for k in sorted({k for e in results for k in e.get("llama_cpp", {})}):
        backends.append((f"llama.cpp {k.replace('_', ' ')}", lambda e, k=k: e["llama_cpp"][k]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(results))
    width = 0.8 / len(backends)
    for ax, metric, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for i, (label, side_of) in enumerate(backends):
            stats = [side_of(e) for e in results]
            med = np.array([st[metric]["median"] for st in stats])
            lo = [m - st[metric]["min"] for m, st in zip(med, stats, strict=True)]
            hi = [st[metric]["max"] - m for m, st in zip(med, stats, strict=True)]
            err = np.array([lo, hi])
            ax.bar(x + (i - (len(backends) - 1) / 2) * width, med, width, yerr=err, capsize=3, label=label)
        if metric == "decode_tok_s" and all("decode_tok_s_ceiling" in e.get("roofline", {}) for e in results):
            ceil = [e["roofline"]["decode_tok_s_ceiling"] for e in results]
            ax.scatter(x, ceil, marker="_", s=800, color="black", label="roofline (ours)")
        ax.set_xticks(x, [f"{e['threads']} thr" for e in results])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} (prompt {max(result['settings']['prompt_lengths'])})")
        ax.legend(fontsize=8)
    fig.suptitle(f"phi3 bench: {result['model']['path'] or 'default model'}", fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, out)
    finally:
        plt.close(fig)
