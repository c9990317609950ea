"""Parametrizations whose full product runs with --runslow and a covering subset in the fast tier."""

from __future__ import annotations

import itertools

import pytest
from _pytest.mark import ParameterSet


def _slow(value) -> bool:
    return isinstance(value, ParameterSet) and any(m.name == "slow" for m in value.marks)


def _flat(value) -> tuple[tuple, list]:
    """(argument values, marks) of one axis entry: a pytest.param, a tuple of several arguments or one."""
    if isinstance(value, ParameterSet):
        return tuple(value.values), list(value.marks)
    return (value if isinstance(value, tuple) else (value,)), []


def covering(*axes: list) -> list:
    """Every combination of the axes' entries as pytest params. The fast tier runs a diagonal: its case i
    takes the i-th fast entry (mod their count) of every axis, so each fast entry of each axis runs at least
    once; the other combinations, and any with an entry already marked slow, run with --runslow. An entry
    is one argument, a tuple of several, or a pytest.param."""
    fast_idx = [[i for i, v in enumerate(a) if not _slow(v)] for a in axes]
    n = max(len(f) for f in fast_idx)
    diagonal = {tuple(f[i % len(f)] for f in fast_idx) for i in range(n)}
    out = []
    for idx in itertools.product(*(range(len(a)) for a in axes)):
        values, marks = (), []
        for a, i in zip(axes, idx):
            v, m = _flat(a[i])
            values, marks = values + v, marks + m
        if idx not in diagonal and not any(m.name == "slow" for m in marks):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(*values, marks=marks))
    return out
