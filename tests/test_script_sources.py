"""TVMScript reads and parses a kernel's source once per process (tvm_compat.memo_script_sources), while
each build still takes its own closure values."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import tvm
from tvm.script import tirx as T
from tvm.script.parser.core import diagnostics

from toolkit.tvm_compat import memo_script_sources


def _builder(n: int, scale: float) -> tvm.tirx.PrimFunc:
    """A kernel the way ours are written: macro and prim_func defined inside the builder, closing over its
    arguments."""

    @T.macro
    def times(dst, src, i):
        dst[i] = src[i] * T.float32(scale)

    @T.prim_func
    def main(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in range(n):
            times(b, a, i)

    return main


def test_a_second_build_reads_no_source_and_takes_its_own_values(monkeypatch):
    memo_script_sources()
    reads, parses = [], []
    real_lines, real_parse = diagnostics.getsourcelines, ast.parse

    def parse(*args, **kwargs):
        parses.append(kwargs.get("mode", "exec"))
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "getsourcelines", lambda obj: reads.append(obj) or real_lines(obj))
    monkeypatch.setattr(ast, "parse", parse)

    def counts():  # a whole source parsed ("exec"); an annotation's string alone is parsed as "eval"
        return len(reads), parses.count("exec")

    first = _builder(4, 2.0)
    seen = counts()
    second = _builder(8, 3.0)
    # the first build of this process read and parsed both functions; the second neither
    assert seen[0] >= 2 and seen[1] >= 2 and counts() == seen

    for func, n, scale in ((first, 4, 2.0), (second, 8, 3.0)):  # a stale n is refused as a shape mismatch
        lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
        a = np.arange(n, dtype="float32")
        b = tvm.runtime.empty((n,), "float32", tvm.cpu())
        lib["main"](tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), a * scale)


def test_sources_of_distinct_functions_stay_distinct():
    """The memo is keyed by code: another function keeps its own source and lines, the same one gets the
    source it had, and source text (not a function) is taken as given."""
    memo_script_sources()
    one = diagnostics.Source(_builder)
    two = diagnostics.Source(test_a_second_build_reads_no_source_and_takes_its_own_values)
    again = diagnostics.Source(_builder)
    assert one.source != two.source and one.start_line != two.start_line
    assert (again.source, again.start_line) == (one.source, one.start_line)
    assert again.source == inspect.getsource(_builder)
    assert diagnostics.Source("x = 1").source == "x = 1"  # source text goes through unkeyed
