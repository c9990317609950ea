"""Phi-3-mini-shaped q4f16_1 on a CUDA GPU: decode / prefill speed, where the decode time goes, and whether
the small-batch kernels agree with the batch-1 ones.

    python examples/cuda_speed.py prepare OUT --name N [--graph] [--gemv-table T]  # here: a cuda-sm90 library
    python examples/cuda_speed.py run OUT                  # on the GPU machine (TVM runtime only is enough)

`run` takes every library folder under OUT (each with case.json + manifest.json) and, with random weights
made there (codes uniform, scales 0.002: activations stay finite through 32 layers):
- prefill of 128 tokens and decode of 128 tokens, 3 repeats, median tok/s;
- decode tok/s at the default sampling (T 0.7, top-p 0.95) drawn on the host, on the GPU after the forward
  (`sample_tokens`, ids back only) and in one call with it (`decode_and_sample`), and with penalties on the
  host and on the GPU (`adjust_logits`), and whether the GPU gave the host's tokens;
- a kernel profile of 16 decode steps (torch.profiler sees every kernel of the process, TVM's included):
  GPU time per token against wall time per token, and the top kernels;
- batch_decode of 2, 3 and 5 sequences against the same sequences decoded one at a time (the batch kernels
  are other schedules: GEMV for one row, LowBatchGEMV for a few, Matmul beyond): max |diff| / max |ref|.
Results: one JSON line per library after `RESULT`, and OUT_JSON (if set) gets them all.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT, DECODE, REPEATS, PROFILE_STEPS = 128, 128, 3, 16


# dlight's GEMV rule picks its tile sizes from a table per target kind; scheduling under another kind's
# target (with CUDA's limits) gives that table's schedule, which still compiles for CUDA: candidates to time
GEMV_TABLES = {
    "vulkan": {"kind": "vulkan", "supports_float16": True},
    "rocm": {"kind": "rocm", "mcpu": "gfx900"},
    "metal": {"kind": "metal"},
    "mali": {"kind": "opencl", "device": "mali"},
}


def gemv_under(table: str):
    """dlight's GEMV rule, scheduling under `table`'s parameter table."""
    import tvm
    from tvm.s_tir import dlight as dl

    limits = {"max_num_threads": 1024, "max_shared_memory_per_block": 49152, "thread_warp_size": 32}
    proxy = tvm.target.Target({**GEMV_TABLES[table], **limits})

    class TableGEMV(dl.gpu.GEMV):
        def apply(self, func, target, tunable):  # noqa: ARG002 - dlight's signature
            return super().apply(func, proxy, tunable)

    return TableGEMV


def prepare(out: Path, graph: bool, name: str, table: str | None = None, preset=None) -> None:
    """A Phi-3-mini q4f16_1 library in out/name, for `preset` (default cuda-sm90)."""
    from toolkit.compile.compile_model import compile_model
    from toolkit.config import phi3_mini_4k

    if table:
        from tvm.s_tir import dlight as dl

        dl.gpu.GEMV = gemv_under(table)  # this process builds one library

    cfg = phi3_mini_4k(sliding_window=None)  # a 256-token run needs no window
    t0 = time.time()
    compile_model(cfg, "q4f16_1", preset or "cuda-sm90", out / name, cuda_graph=graph)
    (out / name / "case.json").write_text(
        json.dumps({"cfg": cfg.to_dict(), "compile_s": round(time.time() - t0, 1)})
    )


def _load_cuda_runtime():
    import ctypes

    import tvm

    # runtime-only TVM (TVM_USE_RUNTIME_LIB=1) does not load its CUDA device API on its own
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm.cuda(0)


def _engine(d: Path, dev, max_batch: int = 8):
    import tvm

    from toolkit.config import Phi3Config
    from toolkit.runtime.engine import CacheOptions, Engine

    case = json.loads((d / "case.json").read_text())
    manifest = json.loads((d / "manifest.json").read_text())
    cfg = Phi3Config.from_dict(case["cfg"])
    rng = np.random.default_rng(0)
    params = []
    for p in manifest["params"]:
        shape = tuple(p["shape"])
        if p["dtype"] == "uint32":
            a = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        elif p["name"].endswith("q_scale"):
            a = np.full(shape, 0.002, dtype=p["dtype"])
        else:
            a = np.ones(shape, dtype=p["dtype"])
        params.append(tvm.runtime.tensor(a, dev))
    cache = CacheOptions(max_batch_size=max_batch, context_window=1024, prefill_chunk=512)
    lib = tvm.runtime.load_module(str(d / manifest["library"]))
    return Engine(lib, params, cfg, dtype=manifest["dtype"], device=dev, cache=cache), case, manifest


def _speed(eng, dev, rng) -> dict:
    prompt = rng.integers(0, eng.cfg.vocab_size, PROMPT).tolist()
    pre, dec = [], []
    for _ in range(REPEATS + 1):  # the first round warms up (module load, graph capture)
        sid = eng.add_sequence()
        t0 = time.perf_counter()
        logits = eng.prefill(sid, prompt)
        dev.sync()
        t1 = time.perf_counter()
        for _ in range(DECODE):
            logits = eng.decode(sid, int(np.argmax(logits)))
        dev.sync()
        t2 = time.perf_counter()
        eng.remove_sequence(sid)
        pre.append(PROMPT / (t1 - t0))
        dec.append(DECODE / (t2 - t1))
    return {
        "prefill_tok_s": round(statistics.median(pre[1:]), 1),
        "decode_tok_s": round(statistics.median(dec[1:]), 1),
        "decode_runs": [round(x, 1) for x in dec[1:]],
        "finite_logits": bool(np.isfinite(logits).all()),
    }


def _sampling_speed(eng, dev, rng, steps: int = DECODE) -> dict:
    """Decode tok/s at the default sampling (T 0.7, top-p 0.95, seeded) drawn on the host from returned
    logits, against the same draws made on the GPU by the library's `sample_tokens` (ids back only) after
    the forward, and by the fused step (embed, decode and sample_tokens in one call); and with a repetition
    and a frequency penalty on top, on the host against on the GPU (`adjust_logits` first). Whether each
    GPU run gave its host run's tokens."""
    from toolkit.runtime.device_sampling import DeviceSampler
    from toolkit.runtime.options import GenerationOptions
    from toolkit.runtime.sampling import TokenSampler

    prompt = rng.integers(0, eng.cfg.vocab_size, PROMPT).tolist()
    plain = GenerationOptions(temperature=0.7, top_p=0.95, seed=0)
    penalised = GenerationOptions(
        temperature=0.7, top_p=0.95, seed=0, repetition_penalty=1.1, frequency_penalty=0.2
    )
    modes = {  # name: (options, sampled on the device, fused step)
        "host": (plain, False, False),
        "device": (plain, True, False),
        "fused": (plain, True, True),
        "host_penalty": (penalised, False, False),
        "device_penalty": (penalised, True, True),  # the fused step is skipped: adjust_logits runs first
    }
    device = DeviceSampler(eng.vm, dev, eng.cache_opts.max_batch_size)
    out: dict = {}
    fused = eng._fused
    for name in [*modes, *modes]:  # the first round warms up
        opts, on_device, use_fused = modes[name]
        sampler = TokenSampler(opts, prompt)
        eng.sampler = device if on_device else None
        eng._fused = fused if use_fused else {}  # "device": embed, decode, sample_tokens, 3 calls

        def step(out, sampler=sampler, on_device=on_device) -> int:
            tok = out if on_device else sampler(out)
            sampler.accept(tok)  # as Generation.step: the penalties count it
            return tok

        sid = eng.add_sequence()
        try:
            tokens = [step(eng.prefill(sid, prompt, draw=sampler.device_draw() if on_device else None))]
            dev.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                tokens.append(step(eng.decode(sid, tokens[-1], sampler.device_draw() if on_device else None)))
            dev.sync()
            out[f"{name}_tok_s"] = round(steps / (time.perf_counter() - t0), 1)
            out[f"{name}_tokens"] = tokens
        finally:
            eng.remove_sequence(sid)
            eng.sampler, eng._fused = None, fused
    if not fused:
        out["fused_tok_s"] = "no decode_and_sample in this library"
    tokens = {k[: -len("_tokens")]: out.pop(k) for k in [k for k in out if k.endswith("_tokens")]}
    same = [tokens[w] == tokens["host"] for w in ("device", "fused")]
    return {
        **out,
        "same_tokens": all(same),
        "same_tokens_penalty": tokens["device_penalty"] == tokens["host_penalty"],
    }


def _profile(eng, dev, rng, name: str) -> dict:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return {"error": f"no torch profiler: {e}"}
    sid = eng.add_sequence()
    logits = eng.prefill(sid, rng.integers(0, eng.cfg.vocab_size, PROMPT).tolist())
    for _ in range(4):
        logits = eng.decode(sid, int(np.argmax(logits)))
    dev.sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            logits = eng.decode(sid, int(np.argmax(logits)))
        dev.sync()
        wall = time.perf_counter() - t0
    eng.remove_sequence(sid)
    if name in os.environ.get("TRACE_LIBS", "").split(","):  # the whole timeline, to read the gaps here
        prof.export_chrome_trace(str(Path(os.environ["TRACE_DIR"]) / f"trace-{name}.json"))
    api = {}
    for e in prof.key_averages():
        if e.key.startswith("cuda") and e.count:
            api[e.key] = {
                "per_token": round(e.count / PROFILE_STEPS, 1),
                "cpu_us_per_token": round(e.self_cpu_time_total / PROFILE_STEPS, 1),
            }
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            rows.append((e.key, e.count, t))
    kernels = [r for r in rows if not r[0].startswith(("cuda", "Memcpy", "Memset", "ProfilerStep"))]
    gpu_us = sum(t for _, _, t in kernels)
    rows.sort(key=lambda r: -r[2])
    return {
        "wall_ms_per_token": round(wall * 1e3 / PROFILE_STEPS, 3),
        "gpu_kernel_ms_per_token": round(gpu_us / 1e3 / PROFILE_STEPS, 3),
        "kernels_per_token": round(sum(c for _, c, _ in kernels) / PROFILE_STEPS, 1),
        "runtime_api": api,
        "top": [
            {
                "kernel": k[:90],
                "per_token": round(c / PROFILE_STEPS, 2),
                "us_per_token": round(t / PROFILE_STEPS, 1),
            }
            for k, c, t in rows[:25]
        ],
    }


def _batch_check(eng, rng) -> dict:
    out = {}
    for b in (2, 3, 5):
        prompts = [rng.integers(0, eng.cfg.vocab_size, 8 + 3 * i).tolist() for i in range(b)]
        toks = [int(t) for t in rng.integers(0, eng.cfg.vocab_size, b)]
        singles = []
        for p, t in zip(prompts, toks, strict=True):
            sid = eng.add_sequence()
            eng.prefill(sid, p)
            singles.append(eng.decode(sid, t))
            eng.remove_sequence(sid)
        sids = [eng.add_sequence() for _ in range(b)]
        for s, p in zip(sids, prompts, strict=True):
            eng.prefill(s, p)
        batched = eng.decode_batch(sids, toks)
        for s in sids:
            eng.remove_sequence(s)
        ref = np.stack(singles)
        out[f"b{b}"] = {
            "rel_err": float(np.abs(batched - ref).max() / np.abs(ref).max()),
            "argmax_agree": float((batched.argmax(-1) == ref.argmax(-1)).mean()),
        }
    return out


def run(out: Path) -> None:
    dev = _load_cuda_runtime()
    print("device:", dev.device_name, flush=True)
    results = []
    for d in sorted(p.parent for p in out.glob("*/manifest.json")):
        res: dict = {"library": d.name}
        try:
            eng, case, manifest = _engine(d, dev)
            res["cuda_graph"] = manifest.get("cuda_graph")
            res["decode_attention"] = manifest.get("decode_attention")
            res["compile_s"] = case.get("compile_s")
            rng = np.random.default_rng(1)
            res["speed"] = _speed(eng, dev, rng)
            print(d.name, "speed", json.dumps(res["speed"]), flush=True)
            res["sampling"] = _sampling_speed(eng, dev, rng)
            print(d.name, "sampling", json.dumps(res["sampling"]), flush=True)
            res["batch"] = _batch_check(eng, rng)
            print(d.name, "batch", json.dumps(res["batch"]), flush=True)
            res["profile"] = _profile(eng, dev, rng, d.name)
        except Exception as e:  # one library failing must not cost the others' numbers
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
        results.append(res)
        print("RESULT", json.dumps(res), flush=True)
    if os.environ.get("OUT_JSON"):
        Path(os.environ["OUT_JSON"]).write_text(json.dumps(results, indent=1))
    for r in results:
        s, p = r.get("speed", {}), r.get("profile", {})
        print(
            f"{r['library']:<28} prefill {s.get('prefill_tok_s')} decode {s.get('decode_tok_s')} tok/s | "
            f"wall {p.get('wall_ms_per_token')} ms gpu {p.get('gpu_kernel_ms_per_token')} ms "
            f"{p.get('kernels_per_token')} kernels/token | {r.get('error', '')[:200]}"
        )


if __name__ == "__main__":
    cmd, path = sys.argv[1], Path(sys.argv[2])
    if cmd == "prepare":
        table = sys.argv[sys.argv.index("--gemv-table") + 1] if "--gemv-table" in sys.argv else None
        prepare(path, "--graph" in sys.argv, sys.argv[sys.argv.index("--name") + 1], table)
    else:
        run(path)
