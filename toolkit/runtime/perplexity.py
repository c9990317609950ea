"""Perplexity over a text with fixed-length sliding windows (the same windows for every quantization).

Window w covers tokens [w*stride, w*stride + context); the first window scores every prediction, later ones
only the `stride` newest tokens, so every token after the first is scored exactly once with at least
context - stride tokens of history (the usual strided evaluation). stride == context gives disjoint windows.

`through="prefill"` scores a window with one forward (the prefill kernels); `through="decode"` feeds it one
token at a time through the KV cache, so the scores come from the kernels generation runs (on the host: the
int8-activation GEMVs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .engine import Engine


@dataclass
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _target_log_probs(logits: np.ndarray, first: int, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[first + i])[targets[i]] in float64: only the scored rows, and only their targets'
    entries formed (the same operations on them as a whole log-softmax matrix)."""
    x = logits[first : first + len(targets)].astype(np.float64)
    m = x.max(-1)
    lse = np.log(np.exp(x - m[:, None]).sum(-1))
    return x[np.arange(len(targets)), targets] - m - lse


def perplexity(
    engine: Engine,
    ids: list[int],
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    through: str = "prefill",
) -> PerplexityResult:
    if through not in ("prefill", "decode"):
        raise ValueError("through must be 'prefill' or 'decode'")
    stride = stride or context // 2
    if not 0 < stride <= context:
        raise ValueError("stride must be in (0, context]")
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens")
    nll, scored, windows = 0.0, 0, 0
    start = 0
    while True:
        window = ids[start : start + context]
        # index i predicts window[i+1]; the previous window already scored up to window[context - stride - 1]
        # (with stride == context, a window's first token has no history and is not scored)
        first = 0 if start == 0 else max(context - stride - 1, 0)
        if len(window) - 1 <= first:  # disjoint windows: a last window of one token has nothing to score
            break
        sid = engine.add_sequence()
        try:
            if through == "prefill":
                logits = engine.prefill(sid, window, all_logits=True)
            else:
                rows = [engine.prefill(sid, window[:1])]
                rows += [engine.decode(sid, t) for t in window[1:-1]]
                logits = np.stack(rows)
        finally:
            engine.remove_sequence(sid)
        targets = np.asarray(window[first + 1 :], dtype=np.int64)
        nll -= float(_target_log_probs(logits, first, targets).sum())
        scored += len(targets)
        windows += 1
        if start + context >= len(ids):
            break
        start += stride
    return PerplexityResult(math.exp(nll / scored), scored, windows, context, stride)
