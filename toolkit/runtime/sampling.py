"""Token sampling on the host: greedy, temperature, top-k / top-p / min-p, penalties, logit bias; seeded.

Per token this runs over the whole vocabulary, beside a decode step of a few milliseconds for a small model:
top-p sorts only the head of the distribution (`top_p_keep`) and the draw walks only the tokens left
(`draw`), each giving what a full sort and `Generator.choice` give, token for token, for a given seed.
"""

from __future__ import annotations

import numpy as np

from .device_sampling import Adjust, Draw
from .options import GenerationOptions

# top_p_keep's heads: tokens within these factors of the most probable one, then the whole vocabulary
_HEADS = (2.0**-12, 2.0**-24, 0.0)


def top_p_keep(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest set of most probable tokens whose mass reaches `top_p` (at least the top token),
    ranked as a stable sort of the whole vocabulary ranks them (ties: lower id first).

    Any {p >= t} is a prefix of that ranking, so sorting such a head gives the same ranking, the same running
    sums and the same cut wherever the head's mass reaches `top_p`; otherwise t is lowered, at last to the
    whole vocabulary (where a NaN distribution goes at once)."""
    n = probs.size
    top = float(probs.max())
    for factor in _HEADS:
        thr = top * factor
        head = np.flatnonzero(probs >= thr) if thr > 0 else np.arange(n)
        head = head[np.argsort(-probs[head], kind="stable")]
        cut = int(np.searchsorted(np.cumsum(probs[head]), top_p))
        if cut < head.size or head.size == n:
            break
    return head[: cut + 1]


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """One token from normalised `probs`: `rng.choice(len(probs), p=probs)`, from the same single uniform
    number and the same cumulative sums (a zero adds nothing to them), over the tokens with p > 0 only."""
    ids = np.flatnonzero(probs)
    cdf = np.cumsum(probs[ids])
    if not (ids.size and np.isfinite(cdf[-1]) and cdf[-1] > 0):
        return int(rng.choice(len(probs), p=probs))  # numpy's own error for a broken distribution
    cdf /= cdf[-1]
    return int(ids[np.searchsorted(cdf, rng.random(), side="right")])


def _renormalised(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    mask = np.zeros_like(probs)
    mask[keep] = probs[keep]
    return mask / mask.sum()


class TokenSampler:
    """Samples with every `GenerationOptions` knob. Order as in transformers / vLLM: logit bias, repetition /
    frequency / presence penalties, then temperature, top-k, top-p, min-p."""

    def __init__(self, options: GenerationOptions, prompt: list[int] | None = None) -> None:
        self.o = options
        self.rng = np.random.default_rng(options.seed)
        self.seen = set(prompt or [])  # the repetition penalty covers the prompt too
        self.counts: dict[int, int] = {}  # generated tokens only (OpenAI's penalties)
        self._rows: _AdjustRows | None = None  # the device's view of the two, from the first device draw

    def accept(self, tok: int) -> None:
        self.seen.add(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        if self._rows is not None:
            self._rows.accept(tok)

    @property
    def adjusts_logits(self) -> bool:
        """Whether a logit bias or a penalty changes the logits before the draw."""
        o = self.o
        return bool(o.logit_bias or o.repetition_penalty != 1.0 or o.frequency_penalty or o.presence_penalty)

    def fits_device(self, adjusts: bool = True) -> bool:
        """Whether the device sampler can draw for these options (`adjusts`: the library has the bias and
        penalties, `adjust_logits`)."""
        o = self.o
        # a top_p that float32 rounds up to 1 would keep tokens the host cuts
        if o.temperature != 0 and o.top_p < 1.0 and np.float32(o.top_p) >= 1.0:
            return False
        return adjusts or not self.adjusts_logits

    def device_draw(self, adjusts: bool = True) -> Draw | None:
        """The next token's draw for the device sampler, from the number `draw` would take from this seed's
        stream (greedy takes none), with this step's bias and penalties; None when these options need the
        host (then no number is taken)."""
        if not self.fits_device(adjusts):
            return None
        o = self.o
        adjust = None
        if self.adjusts_logits:
            if self._rows is None:
                self._rows = _AdjustRows(o, self.seen, self.counts)
            adjust = self._rows.snapshot()
        if o.temperature == 0:
            return Draw(0.0, 0.0, adjust=adjust)
        u = float(self.rng.random())
        return Draw(o.temperature, u, o.top_p, o.top_k or 0, o.min_p or 0.0, adjust=adjust)

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
            probs = _renormalised(probs, top_p_keep(probs, o.top_p))
        if o.min_p > 0:
            probs = np.where(probs >= o.min_p * probs.max(), probs, 0.0)
            probs /= probs.sum()
        return draw(self.rng, probs)


class _AdjustRows:
    """`TokenSampler.adjust`'s changes as the device takes them (runtime/device_sampling.Adjust): one row per
    token they touch, with its bias, whether the repetition penalty covers it and its generated count. Kept
    up to date token by token, so a step copies them instead of rebuilding them from the sets."""

    def __init__(self, o: GenerationOptions, seen: set[int], counts: dict[int, int]) -> None:
        self.o = o
        self.repetition = o.repetition_penalty != 1.0
        self.counted = bool(o.frequency_penalty or o.presence_penalty)
        self.index: dict[int, int] = {}
        self.tokens = np.zeros(64, np.int32)
        self.bias = np.zeros(64, np.float32)
        self.covered = np.zeros(64, np.int32)
        self.counts = np.zeros(64, np.int32)
        # each row index is taken before the array it indexes: taking it may grow (replace) the arrays
        for t, b in o.logit_bias.items():
            i = self._row(t)
            self.bias[i] = b
        if self.repetition:
            for t in seen:
                i = self._row(t)
                self.covered[i] = 1
        if self.counted:
            for t, c in counts.items():
                i = self._row(t)
                self.counts[i] = c

    def _row(self, tok: int) -> int:
        i = self.index.get(tok)
        if i is None:
            i = self.index[tok] = len(self.index)
            if i == self.tokens.size:  # grown by doubling
                for name in ("tokens", "bias", "covered", "counts"):
                    a = getattr(self, name)
                    setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
            self.tokens[i] = tok
        return i

    def accept(self, tok: int) -> None:
        if self.repetition or self.counted:
            i = self._row(tok)
            self.covered[i] |= self.repetition
            self.counts[i] += self.counted

    def snapshot(self) -> Adjust:
        n, o = len(self.index), self.o
        return Adjust(
            self.tokens[:n].copy(),
            self.bias[:n].copy(),
            self.covered[:n].copy(),
            self.counts[:n].copy(),
            o.repetition_penalty,
            o.frequency_penalty,
            o.presence_penalty,
        )
