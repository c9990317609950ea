"""Whole-model parity of a device library against `host-exact`: the same engine calls, teacher-forced.

One scenario, run on each engine: sequence A's prompt prefilled in chunks (the engine's prefill chunk is set
small), sequence B's prompt in one call, then greedy decode steps where A and B go through `batch_decode`
together. The tokens fed are the reference engine's greedy choices (teacher forcing), so every row of logits
on the device is compared at identical inputs: max |Δlogit| over all rows, and token agreement = the share
of rows where the device's argmax equals the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scenario:
    prompt_a: list[int]
    prompt_b: list[int]
    steps: int  # decode steps: one for A alone, then `steps - 1` batched with B


@dataclass
class Rows:
    logits: list[np.ndarray] = field(default_factory=list)  # one [V] row per compared position
    labels: list[str] = field(default_factory=list)


def scenario_for(vocab: int, prompt_a: int, prompt_b: int, steps: int, seed: int = 0) -> Scenario:
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(t) for t in rng.integers(3, vocab, n)]  # noqa: E731 - skip bos/eos/pad ids
    return Scenario(ids(prompt_a), ids(prompt_b), steps)


def run(
    engine, sc: Scenario, forced: list[tuple[int, int]] | None = None
) -> tuple[Rows, list[tuple[int, int]]]:
    """Run `sc` on `engine`. `forced` = the tokens to feed per decode step (A, B); None = greedy here (the
    reference run), returned for the device run."""
    rows = Rows()
    a, b = engine.add_sequence(), engine.add_sequence()
    rows.logits.append(engine.prefill(a, sc.prompt_a))
    rows.labels.append("prefill A (chunked)")
    rows.logits.append(engine.prefill(b, sc.prompt_b))
    rows.labels.append("prefill B")
    chosen: list[tuple[int, int]] = []
    last_a, last_b = rows.logits[0], rows.logits[1]
    for step in range(sc.steps):
        ta = int(np.argmax(last_a)) if forced is None else forced[step][0]
        tb = int(np.argmax(last_b)) if forced is None else forced[step][1]
        chosen.append((ta, tb))
        if step == 0:
            last_a = engine.decode(a, ta)
            rows.logits.append(last_a)
            rows.labels.append("decode A")
            chosen[-1] = (ta, -1)
            continue
        out = engine.decode_batch([a, b], [ta, tb])
        last_a, last_b = out[0], out[1]
        rows.logits += [out[0], out[1]]
        rows.labels += [f"batch decode A step {step}", f"batch decode B step {step}"]
    for s in (a, b):
        engine.remove_sequence(s)
    return rows, chosen


@dataclass
class Parity:
    max_abs_diff: float
    max_abs_ref: float
    agreement: float  # share of rows whose argmax matches
    rows: int
    worst_row: str

    @property
    def rel(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-30)


def compare(ref: Rows, got: Rows) -> Parity:
    diffs = [
        float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max())
        for r, g in zip(ref.logits, got.logits, strict=True)
    ]
    worst = int(np.argmax(diffs))
    agree = [int(np.argmax(r)) == int(np.argmax(g)) for r, g in zip(ref.logits, got.logits, strict=True)]
    return Parity(
        max(diffs),
        max(float(np.abs(r).max()) for r in ref.logits),
        sum(agree) / len(agree),
        len(agree),
        ref.labels[worst],
    )
