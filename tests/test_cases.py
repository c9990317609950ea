"""tests/cases.py: which combinations of a parametrization the fast tier runs."""

from __future__ import annotations

import itertools

import pytest
from cases import covering


def _split(params: list) -> tuple[list[tuple], list[tuple]]:
    fast = [tuple(p.values) for p in params if not any(m.name == "slow" for m in p.marks)]
    slow = [tuple(p.values) for p in params if any(m.name == "slow" for m in p.marks)]
    return fast, slow


def test_every_combination_once_and_every_value_in_the_fast_tier() -> None:
    kernels, blocks = ["gemv", "batched", "gemm"], ["q4_k", "q5_k", "q6_k"]
    fast, slow = _split(covering(kernels, blocks))
    assert sorted(fast + slow) == sorted(itertools.product(kernels, blocks))
    assert len(fast) == 3
    assert {k for k, _ in fast} == set(kernels) and {b for _, b in fast} == set(blocks)


def test_tuple_entries_unpack_and_slow_entries_stay_out_of_the_fast_tier() -> None:
    cases = [(1, "a"), pytest.param(2, "b", marks=pytest.mark.slow), (3, "c")]
    fast, slow = _split(covering(cases, ["x", "y"]))
    assert sorted(fast) == [(1, "a", "x"), (3, "c", "y")]
    assert sorted(slow) == [(1, "a", "y"), (2, "b", "x"), (2, "b", "y"), (3, "c", "x")]
