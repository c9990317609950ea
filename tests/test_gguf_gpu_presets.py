"""GGUF block schemes on the OpenCL and Vulkan presets (issue 18): the fp32 twins (`gguf_*_f32`, for OpenCL
devices without fp16 such as PoCL) and every dequantizing kernel of a gguf-scheme tiny Phi-3 run on PoCL
(OpenCL C) and on our Vulkan backend (SPIR-V on lavapipe), against the llvm build of the same unscheduled
function (toolkit.verify's reference and tolerances)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gpu_apis
import numpy as np
import pytest
from test_tvm_runtime_plugins import devices, runtimes  # noqa: F401, F811  (runtime plugin fixtures)
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.errors import UserError
from toolkit.quantization import fp32_twin, get_scheme, gguf_scheme_name
from toolkit.quantization import gguf_blocks as gb

tvm = pytest.importorskip("tvm")

ROOT = Path(__file__).resolve().parent.parent
K_MIX = "gguf_q4_k-q4_k-q6_k-qkv_q5_k-down_q6_k_l5"
# Q4_0, Q4_1 (with the Q8_0 embedding of SmolLM2), Q8_0, and the K-quant mix
SCHEMES = ["gguf_q4_0", "gguf_q4_1-q8_0", "gguf_q8_0", K_MIX]


def test_fp32_twin_names_fix_the_model_dtype():
    s = get_scheme("gguf_q4_1-q8_0_f32")
    assert (s.model_dtype, s.scale_dtype, s.gguf_blocks) == ("float32", "uint16", ("q4_1", "q8_0", "q8_0"))
    assert s.bits_per_weight() == get_scheme("gguf_q4_1-q8_0").bits_per_weight() == 5.0  # same storage
    assert get_scheme("gguf_q4_1-q8_0").model_dtype == "float16"  # the existing names keep their meaning
    # every fp16 gguf name has exactly one twin, which parses back to the same blocks and exceptions
    for name in [*SCHEMES, "gguf_q4_k-q4_k-q6_k-qkv_q6_k_lc9-down_q6_k_lc9", "gguf_q4_0-f16"]:
        twin = fp32_twin(name)
        assert twin == name.replace("f16", "f32") + "_f32"
        t, s = get_scheme(twin), get_scheme(name)
        assert (t.gguf_blocks, t.gguf_overrides, t.model_dtype) == (
            s.gguf_blocks,
            s.gguf_overrides,
            "float32",
        )
        assert fp32_twin(twin) is None
    assert gguf_scheme_name("q4_0", "f16", model_dtype="float32") == "gguf_q4_0-f32_f32"
    assert (fp32_twin("q4f16_1"), fp32_twin("q0f16"), fp32_twin("q4f32_1")) == ("q4f32_1", "q0f32", None)
    # the plain role is spelled by the model dtype; a trailing _f32 is never read as a mask or a type
    for bad in ("gguf_q4_1-f16_f32", "gguf_q4_1-f32", "gguf_q4_1_f32_f32", "gguf_q4_1-down_f32"):
        with pytest.raises(UserError, match="unknown quantization"):
            get_scheme(bad)
    k = get_scheme(K_MIX + "_f32").layout_for_weight("model.layers.0.mlp.down_proj.weight")
    assert k.param_dtypes(get_scheme(K_MIX + "_f32").scale_dtype)[-1] == "uint16"


def test_stored_uint16_scales_keep_the_blocks_bit_for_bit():
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    raw = quantize(w, gb.ggml_type("q4_1"))
    arrays = gb.stored(gb.from_blocks(raw, "q4_1"), "uint16")
    assert [a.dtype for a in arrays] == [np.uint32, np.uint16, np.uint16]
    assert np.array_equal(gb.to_blocks(arrays, "q4_1"), raw)
    assert np.array_equal(gb.dequantize(arrays, "q4_1"), gb.dequantize(gb.from_blocks(raw, "q4_1"), "q4_1"))


def _widen_func():
    from tvm import te

    from toolkit.quantization.tvm_layers import f16_bits_to_float32

    h = te.placeholder((65536,), "uint16", name="h")
    out = te.compute((65536,), lambda i: f16_bits_to_float32(h[i]), name="widen")
    return te.create_prim_func([h, out]).with_attr("global_symbol", "widen")


def _assert_exact(got: np.ndarray) -> None:
    """float32 `got` holds every fp16 value exactly (bit for bit; NaN payloads may be quieted)."""
    ref = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # -0.0, subnormals, inf


def test_fp16_bits_widen_exactly_on_llvm_and_pocl():
    """The in-kernel widening of an fp32 gguf scheme's uint16 scale bits, over all 65536 patterns: llvm and
    PoCL's OpenCL C (which must not see a `half` anywhere) give the fp16 value exactly."""
    from tvm.s_tir import dlight as dl

    from toolkit.compile.kernel_info import NO_CSE, describe
    from toolkit.targets import load_preset
    from toolkit.verify.opencl_runner import OpenCLRunner

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    lib = tvm.compile(tvm.IRModule({"widen": _widen_func()}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(65536, np.float32))
    lib["widen"](tvm.runtime.tensor(bits), out)
    _assert_exact(out.numpy())

    gpu_apis.require("opencl")
    target = load_preset("opencl").target
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule({"widen": _widen_func()}))
    with tvm.transform.PassContext(config=NO_CSE):
        built = tvm.compile(mod, target=target)
    source = next(m for m in built.mod.imports if m.kind != "llvm").inspect_source()
    assert "half" not in source and "cl_khr_fp16" not in source
    (launch,) = describe(mod, target)["widen"].kernels
    arrays = {"h": bits, "widen": np.zeros(65536, np.float32)}
    OpenCLRunner(source).launch(launch, arrays, {})
    _assert_exact(arrays["widen"])


def _dequantizing(mod):
    return tvm.IRModule({gv: f for gv, f in mod.functions_items() if "dequantize" in gv.name_hint})


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    # hidden 256: a whole K-quant super-block per row; 3 layers: the mix's layer mask 0b101 selects some
    d = tmp_path_factory.mktemp("gguf-gpu")
    return open_model(
        make_tiny_checkpoint(d / "ckpt", "mini-4k", hidden_size=256, num_hidden_layers=3, tokenizer=False)
    ).config


@pytest.mark.slow  # about 10 kernels per scheme, each built twice (OpenCL C and the llvm reference)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gguf_f32_kernels_on_opencl_pocl(tiny_cfg, scheme):
    """Every dequantizing kernel (fused dequant-matmuls, take_dequantize) of the fp32 twin, scheduled for the
    opencl preset as `phi3 compile` schedules it, runs on PoCL and equals its llvm build within fp32's
    tolerance; the generated OpenCL C has no `half`."""
    from toolkit.targets import load_preset
    from toolkit.verify.verify import TOLERANCE, lowered_and_scheduled, verify_kernels

    gpu_apis.require("opencl")
    twin = fp32_twin(scheme)
    unscheduled, scheduled = lowered_and_scheduled(tiny_cfg, twin, load_preset("opencl"))
    checks = verify_kernels(_dequantizing(unscheduled), _dequantizing(scheduled), "opencl")
    assert [c.to_dict() for c in checks if c.status != "ok"] == []
    assert all(c.error <= TOLERANCE["float32"] for c in checks)
    fused = [c.func for c in checks if "NT_matmul" in c.func]
    # qkv, o, gate_up, down (decode and prefill shapes) and the lm_head at least; the embedding gather
    assert len(fused) >= 6 and "take_dequantize" in {c.func for c in checks}, [c.func for c in checks]


@pytest.mark.slow  # about 10 kernels per scheme through glslang and lavapipe
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gguf_kernels_on_our_vulkan_backend(tiny_cfg, scheme):
    """Every dequantizing kernel of the fp16 gguf scheme, scheduled for the vulkan preset, compiled by our
    SPIR-V backend (GLSL -> glslang -> spirv-val) and run on lavapipe, equals its llvm build (fp16 outputs
    2e-2 relative, fp32 1e-4 scaled by K; toolkit.verify.vulkan_check)."""
    if shutil.which("glslangValidator") is None or shutil.which("spirv-val") is None:
        pytest.skip("needs Debian glslang-tools and spirv-tools")
    import toolkit.backends.vulkan  # noqa: F401  (our target.build.vulkan)
    from toolkit.backends.vulkan.lavapipe import LavapipeDevice, VulkanUnavailable
    from toolkit.compile import pipeline
    from toolkit.compile.compile_model import graph_options, schedule_fn
    from toolkit.targets import load_preset
    from toolkit.verify import vulkan_check as kc

    try:
        device = LavapipeDevice()
    except VulkanUnavailable as err:
        pytest.skip(f"no Vulkan driver: {err}")
    import dataclasses

    preset = load_preset("vulkan")
    target = preset.target
    mod, _ = pipeline.export_model(tiny_cfg, graph_options(scheme, preset), target)
    lowered = _dequantizing(pipeline.lower_to_tir(mod, target))
    # the checker launches one kernel per function: the low-batch dispatch (one kernel per batch range) is
    # checked branch by branch (check_low_batch_branches)
    schedule = schedule_fn(dataclasses.replace(preset, low_batch_gemv=()))

    def schedule_one(m):
        with target:
            return schedule(m)

    k = max(tiny_cfg.hidden_size, tiny_cfg.intermediate_size)  # the longest reduction (down_proj)
    results = []
    try:
        for gv, func in lowered.functions_items():
            sizes = {v: 0 if v.endswith("_elem_offset") else 5 for v in kc._shape_vars(func)}
            check = kc.check_primfunc
            results.append(
                check(func, gv.name_hint, target, device, sizes, reduce_len=k, schedule=schedule_one)
            )
            results += kc.check_low_batch_branches(func, gv.name_hint, target, device, preset, reduce_len=k)
    finally:
        device.close()
    assert [(r.name, r.max_abs_err, r.tolerance) for r in results if not r.ok] == []
    assert all(r.max_abs_ref > 0 and r.kernels == 1 for r in results)  # each produced data
    assert any("[n<=" in r.name for r in results)  # the dispatch's LowBatchGEMV branches ran
    names = {r.name for r in results}
    assert sum("NT_matmul" in n for n in names) >= 6 and "take_dequantize" in names, sorted(names)


def test_opencl_device_without_fp16_is_found_and_named_in_one_line():
    """PoCL has no cl_khr_fp16 (read from the ICD loader, as the engine reads it before compiling): an fp16
    scheme there is one line naming its fp32 twin."""
    from toolkit.runtime.opencl_caps import check_fp16, device_extensions, has_fp16
    from toolkit.verify.opencl_runner import _context, fp16_supported

    gpu_apis.require("opencl")
    cl_device = _context()[2]
    name = cl_device.name
    # ctypes and pyopencl read the same extensions
    assert device_extensions()[name] == set(cl_device.extensions.split()) != set()
    assert has_fp16(name) is fp16_supported()
    if fp16_supported():
        pytest.skip(f"OpenCL device {name} has cl_khr_fp16")
    check_fp16(name, "gguf_q4_1-q8_0_f32", "float32", None)  # fp32 runs
    with pytest.raises(UserError) as e:
        check_fp16(name, "gguf_q4_1-q8_0", "float16", fp32_twin("gguf_q4_1-q8_0"))
    msg = str(e.value)
    assert "\n" not in msg and "no cl_khr_fp16" in msg and "-q gguf_q4_1-q8_0_f32" in msg, msg


@pytest.mark.slow  # needs TVM's OpenCL runtime plugin (PHI3_TVM_SOURCE), built once per cache
def test_fp16_scheme_on_pocl_is_refused_before_compiling(devices, tmp_path):  # noqa: F811
    """`phi3 generate --device opencl -q gguf_q4_0` on PoCL: exit 1 and one line, no traceback (it was a
    driver build log and a traceback at the first kernel)."""
    import os

    from toolkit.runtime.opencl_caps import has_fp16

    if has_fp16(devices["opencl"].device_name) is not False:
        pytest.skip(f"OpenCL device {devices['opencl'].device_name} has cl_khr_fp16")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "mini-4k", hidden_size=64, num_hidden_layers=1)
    args = ["generate", str(ckpt), "--device", "opencl", "-q", "gguf_q4_0", "--prompt", "hi", "--raw"]
    r = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "no cl_khr_fp16" in lines[0] and "gguf_q4_0_f32" in lines[0], r.stderr
