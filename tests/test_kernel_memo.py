"""The in-process kernel memo (toolkit/kernel_memo.py): equal arguments give the kernel built before, any
difference that could change the kernel builds a new one."""

from __future__ import annotations

import dataclasses

import tvm
from tvm import te

from toolkit import kernel_memo
from toolkit.kernel_memo import memo_kernel


def _scale_func(n: int, factor: float, symbol: str | None = None) -> tvm.tirx.PrimFunc:
    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: a[i] * factor, name="b")
    f = te.create_prim_func([a, b])
    return f if symbol is None else f.with_attr("global_symbol", symbol)


@dataclasses.dataclass(frozen=True)
class Sizes:
    rows: int
    tile: int


def test_equal_arguments_reuse_the_kernel_and_any_difference_rebuilds():
    calls = []

    @memo_kernel
    def build(n, dtype, sliding, sizes=Sizes(1, 16), scaling=None):
        calls.append((n, dtype, sliding, sizes, scaling))
        return _scale_func(int(n), 2.0)

    first = build(8, "float16", False)
    assert build(8, "float16", False).same_as(first)
    assert build(n=8, dtype="float16", sliding=False, sizes=Sizes(1, 16)).same_as(first)  # defaults bound
    assert len(calls) == 1
    # each of these could build another kernel: 1.0 and True are not the int 1, a dict's values count
    others = [
        build(8, "float32", False),
        build(8, "float16", True),
        build(8.0, "float16", False),
        build(8, "float16", False, Sizes(2, 16)),
        build(8, "float16", False, scaling={"factor": [1, 2]}),
        build(8, "float16", False, scaling={"factor": [1, 3]}),
    ]
    assert len(calls) == 7 and not any(o.same_as(first) for o in others)
    assert build(8, "float16", False, scaling={"factor": [1, 3]}).same_as(others[-1])
    assert len(calls) == 7


def test_primfunc_arguments_match_by_structure_attributes_included():
    calls = []

    @memo_kernel(derived=("q",))
    def rewrite(func, q, *, tile=16):
        calls.append(q)
        return func.with_attr("tile", tile)

    a = rewrite(_scale_func(8, 2.0), "match of a")
    # built again from scratch: new objects, same structure -> the kernel built for the first
    assert rewrite(_scale_func(8, 2.0), "another match").same_as(a) and calls == ["match of a"]
    rewrite(_scale_func(8, 3.0), "x")  # another constant
    rewrite(_scale_func(16, 2.0), "x")  # another shape
    rewrite(_scale_func(8, 2.0, symbol="f"), "x")  # another global symbol
    rewrite(_scale_func(8, 2.0), "x", tile=32)
    assert len(calls) == 5


def test_a_target_is_keyed_by_its_attributes():
    calls = []

    @memo_kernel
    def build(target):
        calls.append(str(target))
        return _scale_func(4, 1.0)

    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
    build(tvm.target.Target(x86))
    build(tvm.target.Target(dict(x86)))
    build(tvm.target.Target({**x86, "mcpu": "znver3"}))
    assert len(calls) == 2


def test_an_argument_it_cannot_compare_is_built_every_time():
    calls = []

    @memo_kernel
    def build(hook):
        calls.append(hook)
        return _scale_func(4, 1.0)

    hook = object()
    build(hook)
    build(hook)
    assert len(calls) == 2


def test_the_memo_keeps_at_most_its_bound(monkeypatch):
    monkeypatch.setattr(kernel_memo, "MAX_ENTRIES", 3)
    calls = []

    @memo_kernel
    def build(n):
        calls.append(n)
        return _scale_func(n, 1.0)

    for n in (1, 2, 3, 4):
        build(n)
    build(4)  # still there
    build(1)  # the oldest went
    assert calls == [1, 2, 3, 4, 1]


def test_the_toolkit_and_tvm_kv_cache_builders_are_memoized():
    """Our host attention kernel and TVM's KV-cache kernels: a second request is the first kernel."""
    from tvm.relax.frontend.nn.llm import kv_cache

    import toolkit.model.phi3  # noqa: F401  (installs the KV-cache builders' memo)
    from toolkit.compile.cpu_attention import decode_attention_cpu

    ours = decode_attention_cpu(2, 4, 16, "float32", False, 16)
    assert decode_attention_cpu(2, 4, 16, "float32", False, 16).same_as(ours)
    assert not decode_attention_cpu(2, 4, 16, "float16", False, 16).same_as(ours)
    theirs = kv_cache._kv_cache_transpose_append(2, 16, "float32")
    assert kv_cache._kv_cache_transpose_append(2, 16, "float32").same_as(theirs)
    assert not kv_cache._kv_cache_transpose_append(2, 16, "float16").same_as(theirs)
    assert getattr(kv_cache._attention_decode_cpu, "memoized", False)
    assert not getattr(kv_cache._prepare_yarn_rope_scaling, "memoized", False)  # not a kernel builder


def test_values_of_different_types_never_share_a_key():
    values = (1, 1.0, True, "1", None, (1,), [1])
    assert len({kernel_memo._key(v, []) for v in values}) == len(values)
