"""A timeline build (`compile/kernel_timeline.py`) calls the tick function once at the start of each Relax
function call and once after each kernel, with the kernel's name, in the order the kernels ran; the
outputs stay what the plain build computes (numpy reference)."""

from __future__ import annotations

import numpy as np
import tvm
from test_cpu_schedule import TARGET

from toolkit.compile.kernel_timeline import START, TICK


def _module():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((64,), "float32")):
            with R.dataflow():
                y = R.exp(x)
                s = R.sum(y, axis=0, keepdims=True)
                w = R.divide(y, s)
                R.output(w)
            return w

    return Mod


def _build(timeline: bool):
    from tvm import relax

    from toolkit.compile.pipeline import finalize, lower_to_tir

    mod = lower_to_tir(_module(), TARGET)
    ex = relax.build(
        mod,
        TARGET,
        relax_pipeline=tvm.transform.module_pass(
            lambda m, _c: finalize(m, TARGET, timeline=timeline), 0, "finalize"
        ),
    )
    return relax.VirtualMachine(ex, tvm.cpu())


def test_ticks_name_each_kernel_in_the_order_it_ran():
    names: list[str] = []
    tvm.register_global_func(TICK, lambda name: names.append(str(name)), override=True)
    x = np.linspace(-2, 2, 64, dtype="float32")
    want = np.exp(x) / np.exp(x).sum()
    tol = dict(rtol=1e-5)  # float32 exp to a few ulp, a 64-term float32 sum
    out = _build(True)["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, want, **tol)
    assert names[0] == START and len(names) == 4, names
    assert "exp" in names[1] and "sum" in names[2] and "divide" in names[3], names
    names.clear()
    np.testing.assert_allclose(_build(False)["main"](tvm.runtime.tensor(x)).numpy(), want, **tol)
    assert names == []  # the plain build never calls it
