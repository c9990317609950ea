"""The host sampler's shortcuts (top-p over the head of the distribution, the draw over the tokens left)
against what they replace: a stable sort of the whole vocabulary and numpy's `Generator.choice`."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.runtime.options import GenerationOptions
from toolkit.runtime.sampling import TokenSampler, draw, top_p_keep


def full_sort_keep(probs: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-probs, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]


def distributions(seed: int):
    """Softmaxes of logits of every shape a model gives: peaked, flat, with ties (rounded logits), with
    zeros (top-k's -inf), a vocabulary of 2 or of 49152."""
    rng = np.random.default_rng(seed)
    for n in (2, 7, 500, 49152):
        for spread in (0.05, 1.0, 4.0, 30.0):
            z = rng.standard_normal(n) * spread
            if rng.random() < 0.5:
                z = np.round(z * 2) / 2  # many exact ties
            if n > 2 and rng.random() < 0.3:
                z[rng.random(n) < 0.5] = -np.inf
                z[0] = 1.0
            p = np.exp(z - z.max())
            yield p / p.sum()
    # a spike holding half the mass over a flat tail far below it: a top-p cut inside the tail
    tail = np.full(49152, 0.5 / 49151)
    tail[rng.integers(49152)] = 0.5
    yield tail


@pytest.mark.parametrize("seed", range(4))
def test_top_p_keeps_the_same_tokens_as_a_full_stable_sort(seed):
    for probs in distributions(seed):
        for top_p in (1e-9, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0 - 1e-12):
            np.testing.assert_array_equal(top_p_keep(probs, top_p), full_sort_keep(probs, top_p))


def test_top_p_of_a_broken_distribution_returns():
    probs = np.full(100, np.nan)
    assert np.array_equal(np.sort(top_p_keep(probs, 0.9)), np.sort(full_sort_keep(probs, 0.9)))


@pytest.mark.parametrize("seed", range(3))
def test_draw_is_generator_choice_token_for_token(seed):
    for i, probs in enumerate(distributions(seed)):
        a, b = np.random.default_rng(i), np.random.default_rng(i)
        got = [draw(a, probs) for _ in range(30)]
        want = [int(b.choice(len(probs), p=probs)) for _ in range(30)]
        assert got == want
    with pytest.raises(ValueError):  # numpy's own refusal of a NaN distribution
        draw(np.random.default_rng(0), np.full(10, np.nan))


def reference_token(o: GenerationOptions, z: np.ndarray, rng: np.random.Generator) -> int:
    """TokenSampler's steps after the penalties, with a full sort and Generator.choice."""
    z = z / o.temperature
    if o.top_k and o.top_k < len(z):
        z = np.where(z < np.partition(z, -o.top_k)[-o.top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if o.top_p < 1.0:
        keep = full_sort_keep(probs, o.top_p)
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    if o.min_p > 0:
        probs = np.where(probs >= o.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


@pytest.mark.parametrize(
    "changes",
    [{}, {"top_p": 0.5}, {"top_k": 40}, {"min_p": 0.05, "top_p": 1.0}, {"temperature": 1.3, "top_p": 0.99}],
)
def test_seeded_tokens_are_those_of_the_full_sort_sampler(changes):
    o = GenerationOptions(seed=11).replace(**changes)
    logits = np.random.default_rng(5).standard_normal((60, 49152)).astype(np.float32) * 3
    s, rng = TokenSampler(o), np.random.default_rng(11)
    assert [s(row) for row in logits] == [reference_token(o, row.astype(np.float64), rng) for row in logits]
