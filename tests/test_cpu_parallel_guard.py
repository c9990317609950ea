"""Host kernels use threads only with enough work (`compile/cpu_parallel_guard.py`): a symbolic size gets
both loops behind a run-time test of the extent, a static one is decided at compile time; both branches
compute the same numbers (numpy reference)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from test_cpu_schedule import TARGET, _rms_norm_func, _schedule
from tvm import te, tirx
from tvm.script import tirx as T

from toolkit.compile.cpu_parallel_guard import LEAST_EXTENT, MIN_PARALLEL_ELEMS, guard_small_parallel_loops

RNG = np.random.default_rng(5)
H = 3072  # Phi-3-mini's hidden size: one decode row is far below MIN_PARALLEL_ELEMS


def _silu_mul_func(rows, h: int) -> tirx.PrimFunc:
    gu = te.placeholder((1, rows, 2 * h), "float32", name="gate_up")
    y = te.compute(
        (1, rows, h), lambda a, b, c: gu[a, b, c] * te.sigmoid(gu[a, b, c]) * gu[a, b, c + h], name="silu_mul"
    )
    return te.create_prim_func([gu, y]).with_attr("global_symbol", "main")


def _loops(func: tirx.PrimFunc) -> list[tirx.For]:
    found = []
    tvm_ffi.structural_walk(func.body, (tirx.For, found.append))
    return found


def _guarded_ifs(func: tirx.PrimFunc) -> list[tirx.IfThenElse]:
    """The IfThenElse nodes whose branches are the parallel and the serial copy of one loop."""
    found = []

    def visit(node):
        then, other = node.then_case, node.else_case
        if isinstance(then, tirx.For) and isinstance(other, tirx.For):
            # renamed copies (each variable defined once): same loop but for its variables
            assert tvm_ffi.structural_equal(then.extent, other.extent)
            assert tvm_ffi.structural_equal(then.body, other.body, map_free_vars=True)
            found.append(node)

    tvm_ffi.structural_walk(func.body, (tirx.IfThenElse, visit))
    return found


def _run(mod, arrays, out_shape):
    ex = tvm.compile(mod, target=TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.empty(out_shape, "float32")]
    ex["main"](*args)
    return args[-1].numpy()


def test_symbolic_size_picks_threads_at_run_time_with_the_same_numbers() -> None:
    s = tirx.Var("s", "int64")
    mod = guard_small_parallel_loops(_schedule(_silu_mul_func(s, H)))
    func = mod["main"]
    (branch,) = _guarded_ifs(func)
    assert branch.then_case.kind == tirx.ForKind.PARALLEL and branch.else_case.kind == tirx.ForKind.SERIAL
    assert all(LEAST_EXTENT not in lp.annotations for lp in _loops(func))  # consumed by the pass
    rows_for_threads = -(-MIN_PARALLEL_ELEMS // H)
    for rows in (1, rows_for_threads + 1):  # decode's one row: serial; a prefill chunk: threads
        g = RNG.standard_normal((1, rows, 2 * H)).astype(np.float32)
        out = _run(mod, [g], (1, rows, H))
        g64 = g.astype(np.float64)
        ref = g64[..., :H] / (1 + np.exp(-g64[..., :H])) * g64[..., H:]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)  # a few fp32 ops per element


@pytest.mark.parametrize("rows,threads", [(1, False), (16, True)])
def test_static_size_decides_at_compile_time(rows: int, threads: bool) -> None:
    mod = guard_small_parallel_loops(_schedule(_rms_norm_func((1, rows), H)))
    func = mod["main"]
    assert not _guarded_ifs(func)
    assert any(lp.kind == tirx.ForKind.PARALLEL for lp in _loops(func)) == threads
    x = RNG.standard_normal((1, rows, H)).astype(np.float32)
    wt = RNG.standard_normal(H).astype(np.float32)
    out = _run(mod, [x, wt], (1, rows, H))
    x64 = x.astype(np.float64)
    ref = x64 * wt / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # fp32 sum of 3072 squares, one rsqrt


def test_row_norm_with_symbolic_rows_is_guarded_by_rows() -> None:
    s = tirx.Var("s", "int64")
    func = guard_small_parallel_loops(_schedule(_rms_norm_func((1, s), H)))["main"]
    (branch,) = _guarded_ifs(func)
    # a row is H elements: threads from ceil(MIN_PARALLEL_ELEMS / H) rows on
    assert str(branch.condition) == f"s >= T.int64({-(-MIN_PARALLEL_ELEMS // H)})"


def test_reshape_kernels_still_become_views() -> None:
    """Relax turns a kernel that only reshapes into a view (no copy) by recognising its loop nest; the
    guard runs after that rewrite, so a symbolic-size reshape is not left as a copy kernel."""
    from tvm.s_tir import dlight as dl
    from tvm.script import ir as I
    from tvm.script import relax as R

    from toolkit.compile import cpu_schedule as cs
    from toolkit.compile.pipeline import finalize, lower_to_tir

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor(("n", 3072), "float32")):
            n = T.int64()
            with R.dataflow():
                y = R.reshape(x, R.shape([n, 32, 96]))
                z = R.nn.softmax(y, axis=-1)
                R.output(z)
            return z

    mod = lower_to_tir(Mod, TARGET)
    with TARGET:
        mod = dl.ApplyDefaultSchedule(*cs.cpu_schedule_rules(TARGET))(mod)
    assert any(
        LEAST_EXTENT in str(f.script()) for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)
    )
    text = finalize(mod, TARGET)["main"].script()
    assert "vm.builtin.reshape" in text and "reshape(" not in text.replace("vm.builtin.reshape", "")
