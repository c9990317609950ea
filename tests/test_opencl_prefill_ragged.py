"""TVM's ragged-prefill attention kernel on OpenCL with head_dim 16 (the tiny GQA "medium" model's shape),
run on PoCL through our own pyopencl launcher against a numpy reference.

PoCL 3.1 miscompiles the wheel's kernel there (every work-item takes the last one's V-load branch after a
barrier; toolkit/model/kv_kernels.py `prefill_ragged_for_opencl` explains it); ours drops the one barrier
that the kernel does not need, and is right.
"""

from __future__ import annotations

import gpu_apis
import numpy as np
import pytest
import tvm

from toolkit.compile.kernel_info import NO_CSE, describe
from toolkit.model import kv_kernels
from toolkit.targets import load_preset

H_KV, H_Q, D = 2, 8, 16  # tests/tiny.py "medium": 8 query heads, 2 KV heads, hidden 128


def _reference(q, k, v, indptr, causal: bool, sm_scale: float) -> np.ndarray:
    """Causal (bottom-right aligned, as the KV cache uses it) GQA attention per sequence, in float64."""
    out = np.zeros(q.shape, "float64")
    group = q.shape[1] // k.shape[1]
    for b in range(len(indptr) - 1):
        lo, hi = indptr[b], indptr[b + 1]
        for h in range(q.shape[1]):
            s = q[lo:hi, h].astype("float64") @ k[lo:hi, h // group].T.astype("float64") * sm_scale
            if causal:
                n = hi - lo
                s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            out[lo:hi, h] = (p / p.sum(1, keepdims=True)) @ v[lo:hi, h // group]
    return out


@pytest.fixture(scope="module")
def kernels() -> dict[str, tvm.tirx.PrimFunc]:
    """The wheel's ragged-prefill kernel and ours, both generated for the OpenCL preset."""
    target = load_preset("opencl").target
    return {
        "wheel": kv_kernels._ORIGINAL_PREFILL_RAGGED(H_KV, H_Q, D, D, "float32", {}, target),
        "ours": kv_kernels.prefill_ragged_for_opencl(H_KV, H_Q, D, D, "float32", {}, target),
    }


@pytest.fixture(scope="module")
def on_pocl(kernels):
    """name -> run(lens, causal): the kernel built once (OpenCL C + launch shape), launched on PoCL."""
    from toolkit.verify.opencl_runner import OpenCLRunner

    gpu_apis.require("opencl")
    target = load_preset("opencl").target
    runs = {}
    for name, func in kernels.items():
        mod = tvm.IRModule({"prefill": func.with_attr("global_symbol", "prefill")})
        with tvm.transform.PassContext(config=NO_CSE):  # as compile/pipeline.py builds OpenCL
            built = tvm.compile(mod, target=target)
        source = next(m for m in built.mod.imports if m.kind != "llvm").inspect_source()
        (launch,) = describe(mod, target)["prefill"].kernels
        runs[name] = (OpenCLRunner(source), launch)
    return runs


def _max_error(runner_and_launch, lens: list[int], causal: bool, seed: int = 0) -> float:
    """Max |error| on random q/k/v for sequences of `lens` (ragged: q and kv share the indptr)."""
    runner, launch = runner_and_launch
    rng = np.random.default_rng(seed)
    n = sum(lens)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype("int32")
    arrays = {
        "q": rng.standard_normal((n, H_Q, D)).astype("float32"),
        "k": rng.standard_normal((n, H_KV, D)).astype("float32"),
        "v": rng.standard_normal((n, H_KV, D)).astype("float32"),
        "q_indptr": indptr,
        "kv_indptr": indptr.copy(),
        "q_rope_position": np.zeros(n, "int32"),
        "k_rope_pos_offset": np.zeros(len(lens), "int32"),
        "output": np.zeros((n, H_Q, D), "float32"),
        "lse": np.zeros((n, H_Q), "float32"),
    }
    sm_scale = 1 / np.sqrt(D)
    scalars = dict(
        batch_size=len(lens),
        qo_len=n,
        kv_len=n,
        causal=int(causal),
        rotary_mode=0,  # RoPE is applied before
        rope_scale=1.0,
        rope_theta=1e4,
        sm_scale=sm_scale,
        q_indptr_elem_offset=0,
        kv_indptr_elem_offset=0,
        q_rope_position_elem_offset=0,
        k_rope_pos_offset_elem_offset=0,
    )
    runner.launch(launch, arrays, scalars)
    ref = _reference(arrays["q"], arrays["k"], arrays["v"], indptr, causal, sm_scale)
    return float(np.abs(arrays["output"] - ref).max())


def test_only_opencl_loses_the_barrier_between_the_kv_loads(kernels):
    def syncs(f):
        return f.script().count("tvm_storage_sync")

    assert syncs(kernels["ours"]) == syncs(kernels["wheel"]) - 1
    # other targets get the wheel's kernel as it is (same schedule as OpenCL for these shapes)
    vulkan = load_preset("vulkan").target
    vulkan = kv_kernels.prefill_ragged_for_opencl(H_KV, H_Q, D, D, "float32", {}, vulkan)
    assert syncs(vulkan) == syncs(kernels["wheel"])
    # the model's KV cache builds it through the wheel's module attribute, which install() points at ours
    # (behind the kernel memo)
    from tvm.relax.frontend.nn.llm import kv_cache

    import toolkit.model.phi3  # noqa: F401  (installs)

    assert kv_cache._attention_prefill_ragged.__wrapped__ is kv_kernels.prefill_ragged_for_opencl


@pytest.mark.parametrize("lens,causal", [([11], True), ([3, 5], True), ([17], False)])
def test_ragged_prefill_head_dim_16_on_pocl(on_pocl, lens, causal):
    """Sequences that leave the last 16-row KV tile partly empty: where PoCL got the wheel's kernel wrong."""
    # fp32, softmax over <= 17 keys of 16-term dot products: rounding only, measured <= 1e-6
    assert _max_error(on_pocl["ours"], lens, causal) < 1e-5
    assert _max_error(on_pocl["wheel"], lens, causal) > 0.1  # the miscompile, reproduced (zeroed V rows)
