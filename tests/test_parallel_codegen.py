"""Host libraries compiled in parts (`compile/parallel_codegen.py`): every kernel lands in exactly one part,
the parts link into one library that computes what a one-module `relax.build` library computes (numpy
reference), and the caller's PassContext settings reach the threads that run LLVM."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from toolkit.compile.parallel_codegen import build_vm, export_shared, split

TARGET = tvm.target.Target({"kind": "llvm"})
N = 64


def _graph() -> tvm.IRModule:
    """Five element-wise ops in a row: five kernels once legalized, enough to fill several parts."""

    @I.ir_module
    class Graph:
        @R.function
        def main(x: R.Tensor((N,), "float32"), y: R.Tensor((N,), "float32")) -> R.Tensor((N,), "float32"):
            with R.dataflow():
                a = R.add(x, y)
                b = R.multiply(a, x)
                c = R.subtract(b, y)
                d = R.exp(R.negative(c))
                R.output(d)
            return d

    return Graph


def _run(path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()


def test_split_deals_every_function_to_one_part() -> None:
    mod = relax.get_pipeline("default")(_graph())
    tir = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(tir) >= 4
    for parts in (1, 2, 3, 100):
        got = split(mod, parts)
        assert len(got) == min(parts, len(mod.functions_items()))
        names = [gv.name_hint for m in got for gv, _ in m.functions_items()]
        assert all(len(m.functions_items()) > 0 for m in got)
        assert sorted(names) == sorted(gv.name_hint for gv, _ in mod.functions_items())


def test_parts_link_into_one_library_equal_to_relax_build(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(N).astype("float32"), rng.standard_normal(N).astype("float32")
    pipeline = relax.get_pipeline("default")

    ex = build_vm(_graph(), TARGET, pipeline, threads=2)
    parts = [m for m in ex.mod._collect_dso_modules() if m.kind == "llvm"]
    assert len(parts) >= 2  # the kernels really were compiled as separate LLVM modules
    export_shared(ex, tmp_path / "parts.so", threads=2)

    with TARGET:
        one = relax.build(_graph(), TARGET, relax_pipeline=pipeline)
    one.export_library(str(tmp_path / "one.so"))

    got = _run(tmp_path / "parts.so", x, y)
    np.testing.assert_array_equal(got, _run(tmp_path / "one.so", x, y))  # same LLVM code per kernel
    np.testing.assert_allclose(got, np.exp(-((x + y) * x - y)), rtol=1e-6)


def test_the_callers_pass_config_reaches_the_llvm_threads() -> None:
    """With `tirx.disable_assert` the kernels lose their argument checks (and their error messages); a
    thread that ran under its own default PassContext would keep them."""

    def kernel_ir(config: dict) -> str:
        with tvm.transform.PassContext(config=config):
            ex = build_vm(_graph(), TARGET, relax.get_pipeline("default"), threads=2)
        return "".join(m.inspect_source("ll") for m in ex.mod._collect_dso_modules())

    message = "Mismatched type on argument"
    assert message in kernel_ir({})
    assert message not in kernel_ir({"tirx.disable_assert": True})
