"""Token sampling on the host: greedy, temperature, top-k / top-p / min-p, penalties, logit bias; seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import GenerationOptions


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(len(probs), p=probs))


class TokenSampler:
    """Samples with every `GenerationOptions` knob. Order as in transformers / vLLM: logit bias, repetition /
    frequency / presence penalties, then temperature, top-k, top-p, min-p."""

    def __init__(self, options: GenerationOptions, prompt: list[int] | None = None) -> None:
        self.o = options
        self.rng = np.random.default_rng(options.seed)
        self.seen = set(prompt or [])  # the repetition penalty covers the prompt too
        self.counts: dict[int, int] = {}  # generated tokens only (OpenAI's penalties)

    def accept(self, tok: int) -> None:
        self.seen.add(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        o = self.o
        z = logits.astype(np.float64)  # a copy: the caller's row is left alone
        for t, b in o.logit_bias.items():
            z[t] += b
        if o.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            v = z[ids]
            z[ids] = np.where(v > 0, v / o.repetition_penalty, v * o.repetition_penalty)
        if (o.frequency_penalty or o.presence_penalty) and self.counts:
            ids = np.fromiter(self.counts, dtype=np.int64)
            cnt = np.fromiter(self.counts.values(), dtype=np.float64)
            z[ids] -= cnt * o.frequency_penalty + o.presence_penalty
        return z

    def __call__(self, logits: np.ndarray) -> int:
        o = self.o
        z = self.adjust(logits)
        if o.temperature == 0:
            return int(np.argmax(z))
        z = z / o.temperature
        if o.top_k and o.top_k < len(z):
            kth = np.partition(z, -o.top_k)[-o.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if o.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, o.top_p) + 1)]  # at least the top token
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        if o.min_p > 0:
            probs = np.where(probs >= o.min_p * probs.max(), probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
