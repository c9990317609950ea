"""Vulkan backend on a real driver: Mesa lavapipe (CPU) runs our SPIR-V, dispatched as TVM's runtime does,
and must match the llvm build of the same unscheduled function."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(
    shutil.which("glslangValidator") is None or shutil.which("spirv-val") is None,
    reason="needs Debian glslang-tools and spirv-tools",
)

import toolkit.backends.vulkan as vkb  # noqa: E402
from toolkit.backends.vulkan.lavapipe import LavapipeDevice, VulkanUnavailable, pack_scalars  # noqa: E402
from toolkit.targets import load_preset  # noqa: E402
from toolkit.verify import vulkan_check as kc  # noqa: E402


@pytest.fixture(scope="module")
def device():
    try:
        dev = LavapipeDevice()
    except VulkanUnavailable as err:
        pytest.skip(f"no Vulkan driver: {err}")
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def target():
    return load_preset("vulkan").target


def test_scalar_slots_are_64_bit():
    packed = pack_scalars([7, -1, 1.5], ["int32", "int64", "float32"])
    assert len(packed) == 24
    assert packed[:8] == (7).to_bytes(4, "little") + bytes(4)
    assert packed[8:16] == b"\xff" * 8
    assert np.frombuffer(packed[16:20], "<f4")[0] == 1.5


@pytest.mark.parametrize("name", sorted(kc.standalone_kernels()))
def test_standalone_kernel_matches_llvm(name, device, target):
    func, sizes, reduce_len = kc.standalone_kernels()[name]
    result = kc.check_primfunc(func, name, target, device, sizes, reduce_len=reduce_len)
    assert result.kernels == 1
    assert result.max_abs_ref > 0  # the kernel really produced data
    assert result.ok, f"{name}: max abs err {result.max_abs_err} > tolerance {result.tolerance}"


def test_uniform_buffer_scalars_on_driver(device, target):
    from test_vulkan_codegen import many_scalar_func

    sizes = {"n": 300, **{f"c{i}": i - 5 for i in range(17)}}
    result = kc.check_primfunc(many_scalar_func(), "scalars", target, device, sizes, reduce_len=1)
    assert result.ok and result.max_abs_ref > 0


def test_wrong_push_constants_are_detected(device, target):
    """The comparison is not vacuous: feeding seq_len in the wrong slot format breaks the result."""
    func, sizes, _ = kc.standalone_kernels()["add_tanh_f32"]
    mod = kc.dlight_schedule(tvm.IRModule({"a": func.with_attr("global_symbol", "a")}), target)
    lib = tvm.compile(mod, target=target)
    (k,) = vkb.build_of(vkb.vulkan_imports(lib.mod)[0]).kernels.values()
    a = np.ones(64, "float32")
    b = np.zeros(64, "float32")
    y = np.zeros(64, "float32")
    by_name = {"a_ptr": a, "b_ptr": b, "y_ptr": y, "n": 64}
    out = device.run(
        k.name, k.spirv, k.info, k.flag, [by_name[p.name] for p in k.glsl.params], k.grid({"n": 64})
    )
    got = out[[p.name for p in k.glsl.params].index("y_ptr")]
    np.testing.assert_allclose(got, np.tanh(1.0) + 1.0, rtol=1e-6)
    by_name["n"] = 10  # only the first 10 elements are written
    out = device.run(
        k.name, k.spirv, k.info, k.flag, [by_name[p.name] for p in k.glsl.params], k.grid({"n": 10})
    )
    got = out[[p.name for p in k.glsl.params].index("y_ptr")]
    assert np.all(got[10:] == 0) and np.allclose(got[:10], np.tanh(1.0) + 1.0)


def _sign_extend_compare_func():
    """out[i] packs the comparisons of int64(a[i]) (a sign-extended int32 load) with constants: the pattern
    Mesa 22.3.6's lavapipe answered wrongly (int64(29) < 776 false, int64(-1) < 0 false)."""
    from tvm.script import tirx as T

    @T.prim_func
    def func(a: T.Buffer((64,), "int32"), out: T.Buffer((64,), "int32")):
        T.func_attr({"global_symbol": "sext_compare", "tirx.noalias": True})
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            x = T.Cast("int64", a[tx])
            out[tx] = (
                T.Cast("int32", x < T.int64(776))
                + T.Cast("int32", x <= T.int64(-1)) * 2
                + T.Cast("int32", x > T.int64(28)) * 4
                + T.Cast("int32", x >= T.int64(-3)) * 8
                + T.Cast("int32", T.min(x, T.int64(30)) * T.int64(16))
            )

    return func


def test_sign_extended_compare_on_driver(device, target):
    """int32 -> int64 casts compared with constants give numpy's answers on lavapipe (codegen_glsl emits the
    sign extension as bit operations, which the driver compiles right)."""
    a = np.array([29, -1, 0, 776, 775, 777, -3, -4, 28, 30, 31, 2**31 - 1, -(2**31)] * 5, np.int32)[:64]
    a = np.concatenate([a, np.arange(64 - len(a), dtype=np.int32) - 5])
    lib = tvm.compile(tvm.IRModule({"sext_compare": _sign_extend_compare_func()}), target=target)
    (k,) = vkb.build_of(vkb.vulkan_imports(lib.mod)[0]).kernels.values()
    by_name = {"a_ptr": a, "out_ptr": np.zeros(64, np.int32)}
    out = device.run(k.name, k.spirv, k.info, k.flag, [by_name[p.name] for p in k.glsl.params], k.grid({}))
    got = out[[p.name for p in k.glsl.params].index("out_ptr")]
    x = a.astype(np.int64)
    expected = (x < 776) + (x <= -1) * 2 + (x > 28) * 4 + (x >= -3) * 8 + np.minimum(x, 30) * 16
    np.testing.assert_array_equal(got, expected.astype(np.int32))


_MODEL_REPORTS: dict = {}

# (quantization, tiny variant, paged-KV kernels the run must reach): mini-4k has a sliding window, medium not.
# The engine keeps the cache's own sliding-window support off (runtime/engine.py: the wheel's strided-copy bug
# on these devices), so both reach the plain kernels; the window variants are compiled and validated only.
PAGED = {"batch_prefill_ragged_kv", "batch_prefill_paged_kv", "batch_decode_paged_kv"}
MODEL_CASES = [
    ("q4f32_1", "mini-4k", PAGED),
    ("q4f16_1", "medium", PAGED),
    # GGUF Q4_1 blocks (fp16 d and m) with a Q8_0 embedding, quantized from the checkpoint by gguf-py
    ("gguf_q4_1-q8_0", "medium", PAGED),
]


@pytest.mark.slow
@pytest.mark.parametrize("quantization,variant,attention", MODEL_CASES)
def test_tiny_phi3_kernels_on_lavapipe(quantization, variant, attention, device, tmp_path):
    """Every TIR function of the compiled tiny Phi-3 that the VM or the paged KV cache calls runs on lavapipe
    with the inputs the host build of the same graph received, and reproduces that build's outputs."""
    from tiny import make_tiny_checkpoint
    from tiny_tokenizer import write_tiny_tokenizer

    from toolkit.config import load_hf_config

    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, variant)
    write_tiny_tokenizer(ckpt, load_hf_config(ckpt).vocab_size)  # the q4 converter copies the tokenizer
    report = kc.check_model_on_cpu_inputs(ckpt, quantization, "vulkan", device, tmp_path / "work")
    assert report.device_kernels >= 30  # every kernel compiled and passed spirv-val
    failing = [(r.name, r.max_abs_err, r.tolerance) for r in report.results if not r.ok]
    assert not failing, failing
    ran = {r.name for r in report.results}
    assert {"take_dequantize", "rms_norm", "last_token", "tir_kv_cache_transpose_append"} <= ran
    assert "apply_rope" not in ran  # no LongRoPE here: on GPU presets the KV cache rotates q/k
    assert attention <= ran, sorted(ran)
    assert sum("NT_matmul" in n for n in ran) >= 8  # prefill matmuls and decode GEMVs, q4 dequant fused
    assert sum("[n<=" in n for n in ran) >= 8  # each low-batch dispatch branch of the prefill matmuls
    assert all("compiled" in why for why in report.not_run.values()), report.not_run
    windowed = {"batch_prefill_paged_kv_sliding_window", "batch_decode_paged_kv_sliding_window"}
    assert windowed <= set(report.not_run)
