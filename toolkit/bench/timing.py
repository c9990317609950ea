"""One timed generation, identical for every backend: prefill a prompt, then greedy-decode N tokens.

Kept apart from the harness so the llama.cpp worker process runs exactly the same loop as our engine does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """What the bench needs from an engine: logits of the last position, one sequence at a time."""

    def reset(self) -> None: ...

    def prefill(self, tokens: Sequence[int]) -> np.ndarray: ...

    def decode(self, token: int) -> np.ndarray: ...


def timed_generation(backend: Backend, prompt: Sequence[int], decode_tokens: int) -> dict[str, Any]:
    """Prefill `prompt`, then feed back the argmax `decode_tokens` times. Times exclude the KV reset.

    The argmax of each step is part of the timed loop because a user's generation loop has to do it too.
    """
    backend.reset()
    t0 = time.perf_counter()
    tok = int(np.argmax(backend.prefill(list(prompt))))
    t1 = time.perf_counter()
    generated = [tok]
    for _ in range(decode_tokens):
        tok = int(np.argmax(backend.decode(tok)))
        generated.append(tok)
    t2 = time.perf_counter()
    return {
        "prompt_len": len(prompt),
        "decode_tokens": decode_tokens,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "tokens": generated,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives fork+exec, so a worker process would report
    its parent's peak instead of its own."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughputs (tok/s) and time to first token (s) of repeated `timed_generation` results."""
    prefill = [r["prompt_len"] / r["prefill_s"] for r in runs]
    decode = [r["decode_tokens"] / r["decode_s"] for r in runs if r["decode_tokens"] > 0]
    out: dict[str, Any] = {
        "prompt_len": runs[0]["prompt_len"],
        "decode_tokens": runs[0]["decode_tokens"],
        "prefill_tok_s": summarize(prefill),
        "ttft_s": summarize([r["prefill_s"] for r in runs]),
    }
    if decode:
        out["decode_tok_s"] = summarize(decode)
    return out
