"""GPU kernels verified on real GPU APIs of this machine: WGSL on wgpu/lavapipe, OpenCL C on PoCL, CUDA
through
nvcc (compile only), MSL through clang's C++ front end with a Metal stub header.

Each check compares the scheduled kernel with the llvm build of the same PrimFunc before scheduling
(tolerances justified in toolkit/verify/verify.py).
"""

from __future__ import annotations

import shutil
import tempfile

import gpu_apis
import numpy as np
import pytest
import tvm
from test_targets import REQUIRED as REQUIRED_PRESETS

from toolkit.compile import kernel_info
from toolkit.compile.gpu_schedule import gpu_schedule_pass
from toolkit.targets import load_preset
from toolkit.verify.sample_kernels import standalone_module
from toolkit.verify.verify import backend_for, lowered_and_scheduled, verify_kernels

KERNELS = ["dequant_gemv", "dequant_matmul", "rms_norm", "softmax"]
HAS_NVCC = shutil.which("nvcc") is not None
SLOW_CUDA = ("cuda-sm86", "cuda-sm89", "cuda-sm90")  # same code path as sm80; each costs ~10 s of nvcc


def _statuses(checks):
    return {c.func: c.status for c in checks}


def _scheduled(preset_name: str, dtype: str):
    mod = standalone_module(dtype)
    return mod, gpu_schedule_pass(load_preset(preset_name))(mod)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_standalone_kernels_on_wgsl_lavapipe(dtype):
    gpu_apis.require("webgpu")
    mod, scheduled = _scheduled("webgpu", dtype)
    checks = verify_kernels(mod, scheduled, "webgpu")
    assert _statuses(checks) == dict.fromkeys(KERNELS, "ok"), [c.to_dict() for c in checks]
    gemm = next(c for c in checks if c.func == "dequant_matmul")
    assert gemm.shape_values == {"seq_len": 7}  # dynamic seq_len bound at run time


def test_standalone_kernels_on_opencl_pocl():
    gpu_apis.require("opencl")
    mod, scheduled = _scheduled("android-adreno", "float32")
    checks = verify_kernels(mod, scheduled, "opencl")
    assert _statuses(checks) == dict.fromkeys(KERNELS, "ok"), [c.to_dict() for c in checks]


def test_fp16_opencl_is_reported_not_run_on_pocl():
    from toolkit.verify.opencl_runner import fp16_supported

    gpu_apis.require("opencl")
    mod, scheduled = _scheduled("android-mali", "float16")
    checks = verify_kernels(mod, scheduled, "opencl")
    if fp16_supported():
        assert set(_statuses(checks).values()) == {"ok"}
    else:
        assert all(c.status == "not-run" and "cl_khr_fp16" in c.note for c in checks)


def test_a_wrong_launch_is_caught(monkeypatch):
    """Half the workgroups leave half the output unwritten: the comparison must fail, not pass vacuously."""
    gpu_apis.require("webgpu")
    mod, scheduled = _scheduled("webgpu", "float32")
    original = kernel_info.KernelLaunch.grid

    def half_grid(self, values):
        (gx, gy, gz), block = original(self, values)
        return (max(1, gx // 2), gy, gz), block

    monkeypatch.setattr(kernel_info.KernelLaunch, "grid", half_grid)
    checks = verify_kernels(
        tvm.IRModule({"softmax": mod["softmax"]}),
        tvm.IRModule({"softmax": scheduled["softmax"]}),
        "webgpu",
        shape_values={"b": 8},
    )
    assert checks[0].status == "mismatch"


def test_kernel_params_and_launch_sizes_come_from_lowered_tir():
    _mod, scheduled = _scheduled("webgpu", "float32")
    info = kernel_info.describe(scheduled, load_preset("webgpu").target)["dequant_matmul"]
    *_low_batch, launch = info.kernels  # a kernel per batch range (compile/low_batch_gemv.py), Matmul last
    assert len(_low_batch) == 2
    names = [p.name for p in launch.params]
    # SplitHostDevice order: buffers sorted by name, then the shape scalar
    assert names == ["NT_matmul_ptr", "q_scale_ptr", "q_weight_ptr", "x_ptr", "seq_len"]
    grid7, _ = launch.grid({"seq_len": 7})
    grid70, _ = launch.grid({"seq_len": 70})
    assert grid70[0] * grid70[1] > grid7[0] * grid7[1]  # extents follow the dynamic length


@pytest.mark.slow  # 44 s; Metal schedules run as WGSL and parse by default in test_sampling_functions
def test_metal_schedule_runs_as_wgsl_and_its_msl_parses():
    from toolkit.verify.metal_check import check_msl

    gpu_apis.require("webgpu")
    preset = load_preset("iphone-a16")
    mod, scheduled = _scheduled("iphone-a16", "float32")
    checks = verify_kernels(mod, scheduled, "webgpu")
    assert _statuses(checks) == dict.fromkeys(KERNELS, "ok"), [c.to_dict() for c in checks]
    msl = tvm.compile(scheduled, target=preset.target).mod.imports[0].inspect_source()
    assert "simd_shuffle_down" in msl  # 32-wide SIMD-group reductions from the A16 preset
    result = check_msl(msl)
    assert result.ok, result.diagnostics
    assert sorted(result.kernels) == sorted(f"{k}_kernel" for k in KERNELS)
    broken = check_msl(msl.replace("threadgroup_barrier(", "threadgroup_barier(", 1))
    assert not broken.ok and "threadgroup_barier" in broken.diagnostics


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: CUDA kernels can only be compile-checked with nvcc")
@pytest.mark.parametrize(
    "name",
    # nvcc over every kernel is slow tier; the CUDA path stays by default in the fatbin test below
    [pytest.param(n, marks=pytest.mark.slow) for n in ["cuda-sm80", *SLOW_CUDA]],
)
def test_nvcc_compiles_every_kernel_for_the_cuda_preset(name):
    from toolkit.verify.cuda_check import compile_kernels

    preset = load_preset(name)
    _mod, scheduled = _scheduled(name, "float16")
    source = tvm.compile(scheduled, target=preset.target).mod.imports[0].inspect_source()
    report = compile_kernels(source, preset)
    # dequant_matmul (symbolic rows) is three kernels: two LowBatchGEMV branches and Matmul
    assert report.ok and len(report.compiled) == len(KERNELS) + 2, report


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: cannot build the CUDA fatbin")
def test_cuda_library_ships_a_fatbin_not_source(tmp_path):
    from toolkit.compile.artifacts import check_object_format
    from toolkit.compile.cuda_aot import cuda_module_formats, export_cuda_library
    from toolkit.compile.objfile import read_library_bin
    from toolkit.verify.cuda_check import fatbin_entries

    preset = load_preset("cuda-sm90")
    _mod, scheduled = _scheduled("cuda-sm90", "float32")
    info = export_cuda_library(tvm.compile(scheduled, target=preset.target), tmp_path / "k.so", preset)
    assert info["cuda_modules"] == 1
    check_object_format(tmp_path / "k.so", preset)
    ((fmt, data),) = cuda_module_formats(read_library_bin((tmp_path / "k.so").read_bytes()))
    assert fmt == "fatbin" and b"__global__" not in data
    assert sorted(fatbin_entries(data)) == [("elf", 90), ("ptx", 90)]


# -- the tiny Phi-3 model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg():
    from tiny import make_tiny_checkpoint

    from toolkit.config import load_hf_config

    with tempfile.TemporaryDirectory() as d:
        make_tiny_checkpoint(d, "mini-4k")
        yield load_hf_config(d)


# The paged-KV attention kernels arrive from TVM already scheduled (no unscheduled reference to compare with).
PRE_SCHEDULED = "scheduled before the GPU schedule step"


@pytest.mark.parametrize(
    ("preset_name", "quantization"),
    # OpenCL on PoCL (fp32 only) by default; WGSL on lavapipe (47 s on a loaded 2-core box) with --runslow,
    # the WGSL runner itself stays by default in test_standalone_kernels_on_wgsl_lavapipe
    [pytest.param("webgpu", "q4f16_1", marks=pytest.mark.slow), ("android-adreno", "q4f32_1")],
)
def test_every_kernel_of_the_tiny_model(tiny_cfg, preset_name, quantization):
    preset = load_preset(preset_name)
    gpu_apis.require(backend_for(preset))
    unscheduled, scheduled = lowered_and_scheduled(tiny_cfg, quantization, preset)
    checks = verify_kernels(unscheduled, scheduled, backend_for(preset))
    bad = [c.to_dict() for c in checks if c.status not in ("ok", "not-run")]
    assert not bad
    not_run = [c for c in checks if c.status == "not-run"]
    assert all(PRE_SCHEDULED in c.note for c in not_run), [c.to_dict() for c in not_run]
    ran = [c.func for c in checks if c.status == "ok"]
    assert any("NT_matmul" in f for f in ran) and any("rms_norm" in f for f in ran)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["q4f16_1", "q4f32_1"])
@pytest.mark.parametrize("preset_name", sorted(REQUIRED_PRESETS))
def test_tiny_model_compiles_for_every_preset(tiny_cfg, tmp_path, preset_name, quantization):
    from toolkit.compile.artifacts import check_object_format, verify_manifest
    from toolkit.compile.compile_model import compile_model

    preset = load_preset(preset_name)
    if preset.kind == "cuda" and not HAS_NVCC:
        pytest.skip("nvcc not found: CUDA presets ship compiled kernels")
    manifest = compile_model(tiny_cfg, quantization, preset, tmp_path / "out").manifest
    check_object_format(tmp_path / "out" / manifest["library"], preset)
    verify_manifest(tmp_path / "out")
    assert manifest["preset"] == preset_name and manifest["quantization"] == quantization
    if preset.is_gpu:
        assert manifest["kernels"] and all(k["launch"] for k in manifest["kernels"])


@pytest.mark.slow
def test_phi3_verify_cli_on_a_compiled_webgpu_model(tiny_cfg, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.compile.compile_model import compile_model

    gpu_apis.require("webgpu")
    compile_model(tiny_cfg, "q4f16_1", load_preset("webgpu"), tmp_path / "out")
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "OK:" in res.output
    (tmp_path / "out" / "model.tar").write_bytes(b"tampered")
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "out")])
    assert res.exit_code == 1 and "sha256" in res.output


def _cuda_gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver or no device: all mean "no GPU here"
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: cannot build the CUDA fatbin")
@pytest.mark.skipif(
    not _cuda_gpu_available(), reason="no CUDA GPU (with CuPy) on this machine: nvcc compile only"
)
def test_fatbin_kernels_run_on_a_cuda_gpu(tmp_path):
    import cupy

    from toolkit.verify.cuda_runner import make_bundle, run_bundle

    major = cupy.cuda.runtime.getDeviceProperties(0)["major"]
    preset = load_preset("cuda-sm90" if major >= 9 else "cuda-sm80")
    mod, scheduled = _scheduled(preset.name, "float16")
    make_bundle(mod, scheduled, preset, tmp_path)
    results = run_bundle(tmp_path)
    assert len(results) == len(KERNELS) and all(r["ok"] for r in results), results


@pytest.mark.parametrize(
    "ref,got,passes",
    [
        ([1.0, 2.0], [1.0, 2.0], True),
        ([1.0, np.inf], [1.0, np.inf], True),  # the same overflow on both sides: the finite part is compared
        ([np.nan, 2.0], [1.0, 2.0], False),  # NaN in the reference only
        ([1.0, 2.0], [1.0, np.nan], False),
        ([np.nan, np.nan], [np.nan, np.nan], False),  # nothing finite: nothing was compared
        ([1.0, np.inf], [5.0, np.inf], False),  # the finite part still has to match
    ],
)
def test_a_non_finite_output_never_reads_as_a_pass(ref, got, passes):
    from toolkit.verify.verify import _compare

    ref, got = np.array(ref, "float32"), np.array(got, "float32")
    err, tol, _ = _compare(["out"], {"out": ref}, {"out": got})
    assert (err <= tol) == passes


@pytest.mark.parametrize("rows", [1, 2, 5, 9, 130])
def test_low_batch_dispatch_branches_compute_the_same_matmul(rows):
    """A q4 matmul over a symbolic row count is one kernel with a branch per batch range (LowBatchGEMV for
    n <= 2 and n <= 8, Matmul beyond): every branch, run on PoCL, equals the llvm build unscheduled."""
    gpu_apis.require("opencl")
    mod = standalone_module("float32")
    scheduled = gpu_schedule_pass(load_preset("android-adreno"))(mod)
    assert "tvm_thread_invariant" in scheduled["dequant_matmul"].script()
    checks = verify_kernels(mod, scheduled, "opencl", shape_values={"seq_len": rows})
    gemm = next(c for c in checks if c.func == "dequant_matmul")
    assert gemm.status == "ok" and gemm.shape_values == {"seq_len": rows}, gemm.to_dict()
