"""The decode roofline measured in pairs: probe pass, decode step, probe pass, decode step, ...

On a shared host the read bandwidth moves by 2x within seconds (neighbours), so a fraction of one figure
probed before a minutes-long bench says more about the neighbours than about the kernels. Here each decode
step is timed between two probe passes (`read_bandwidth.ReadProbe`) in the process that decodes (one
thread pool: no idle pool of another process spinning beside the probe), and each step's fraction is its
weight bytes per second over the mean of the two passes around it; the median over the steps is the
figure. Our engine pairs in a child process (the probe's array would count in the bench's peak RSS),
llama.cpp in its worker (`llama_cpp`, "pair")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from ..read_bandwidth import paired_fractions
from .timing import Backend, summarize


def paired_decode(
    backend: Backend, prompt: Sequence[int], steps: int, probe_rate: Callable[[], float]
) -> dict[str, list[float]]:
    """Prefill `prompt`, then `steps` greedy decode steps, each timed alone between two probe passes
    (`steps + 1` passes). Returns the passes' bytes/s and the steps' seconds."""
    backend.reset()
    tok = int(np.argmax(backend.prefill(list(prompt))))
    rates, times = [probe_rate()], []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(np.argmax(backend.decode(tok)))
        times.append(time.perf_counter() - t0)
        rates.append(probe_rate())
    return {"probe_bytes_s": rates, "decode_s": times}


def summarize_pairs(
    raw: dict[str, list[float]], weight_bytes: int, kv_bytes: Sequence[int] | None = None
) -> dict[str, Any]:
    """Median fraction of the probed bandwidth that the decode steps' weight reads reached, its quartiles,
    and the spread of both sides; with `kv_bytes` (each step's KV cache reads, `roofline.kv_bytes_of_steps`)
    also `fraction_with_kv`, the weights and the KV cache together."""
    rates, times = np.asarray(raw["probe_bytes_s"]), np.asarray(raw["decode_s"])
    frac = paired_fractions(rates, times, weight_bytes)
    out = {
        "steps": int(len(times)),
        "fraction": float(np.median(frac)),
        "fraction_quartiles": [float(q) for q in np.percentile(frac, [25, 75])],
        "probe_bytes_s": summarize(rates),
        "decode_tok_s": summarize(1 / times),
    }
    if kv_bytes is not None:
        if len(kv_bytes) != len(times):
            raise ValueError(f"{len(times)} steps need {len(times)} KV byte counts, got {len(kv_bytes)}")
        with_kv = paired_fractions(rates, times, weight_bytes + np.asarray(kv_bytes))
        out["fraction_with_kv"] = float(np.median(with_kv))
    return out


def engine_pairs(model: Any, s, threads: int, prompt: Sequence[int]) -> dict[str, list[float]]:
    """`paired_decode` of our engine in a child process (settings `s`: a `harness.BenchSettings` of one KV
    cache dtype, the engine's; `run_bench` pairs each dtype of a `--kv-cache` list with its own)."""
    (kv_cache,) = s.kv_cache_dtypes  # a list would reach the child as one unknown dtype
    req = {
        "model": None if model is None else str(model),
        "quantization": s.quantization,
        "device": s.device,
        "kv_cache": kv_cache,
        "threads": threads,
        "prompt": [int(t) for t in prompt],
        "steps": s.roofline_pairs,
        "nbytes": s.bandwidth_bytes,
    }
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-m", "toolkit.bench.pairing"],
        input=json.dumps(req),
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:  # one line, with the way around it (the timed runs are done by now)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"the paired roofline run of our engine failed (exit {proc.returncode}: {last}); "
            "--roofline-pairs 0 skips it"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    """Child of `engine_pairs`: the request on stdin, the raw pairs as one JSON line on stdout."""
    from ..tvm_compat import tvm_without_torch

    tvm_without_torch()  # a child starts about 2 s sooner (tvm_compat.py)
    req = json.loads(sys.stdin.read())
    from ..read_bandwidth import ReadProbe
    from .harness import EngineBackend, load_our_engine

    engine = load_our_engine(
        req["model"], req["quantization"], req["device"], req["threads"], req["kv_cache"]
    )
    probe = ReadProbe(req["threads"], req["nbytes"])
    raw = paired_decode(EngineBackend(engine), req["prompt"], req["steps"], probe.rate)
    print(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
