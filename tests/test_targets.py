"""Device presets: every file loads into a valid TVM target and says why its numbers are what they are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit import targets
from toolkit.cli import main
from toolkit.errors import UserError

REQUIRED = {
    "iphone-a16",
    "macos-metal",
    "android-adreno",
    "android-mali",
    "cuda-sm80",
    "cuda-sm86",
    "cuda-sm89",
    "cuda-sm90",
    "webgpu",
    "host",
}


def test_required_presets_exist():
    assert REQUIRED <= set(targets.list_presets())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_loads_into_a_tvm_target(name):
    p = targets.load_preset(name)
    t = p.target
    assert t.kind.name == p.kind
    assert p.output in (".so", ".tar", ".dylib")
    assert p.why and all(isinstance(v, str) and v for v in p.why.values())
    if p.is_gpu:
        assert p.dlight_rules[-1] == "Fallback"
        assert t.host is not None and p.host_triple
    if p.system_lib:  # static libraries for apps: iOS / Android / web
        assert p.output == ".tar"


def test_device_facts():
    a16 = targets.load_preset("iphone-a16")
    assert a16.target_dict["thread_warp_size"] == 32  # A16 SIMD-group width
    assert a16.target_dict["max_shared_memory_per_block"] == 32768
    assert a16.host_triple == "arm64-apple-ios" and a16.output == ".tar" and a16.system_lib
    assert targets.load_preset("macos-metal").output == ".dylib"
    for name in ("android-adreno", "android-mali"):
        p = targets.load_preset(name)
        assert p.kind == "opencl" and p.host_triple == "aarch64-linux-android" and p.output == ".tar"
    for sm in ("80", "86", "89", "90"):
        p = targets.load_preset(f"cuda-sm{sm}")
        assert p.cuda_arch == f"sm_{sm}" and p.output == ".so"
        assert f"arch=compute_{sm},code=sm_{sm}" in p.cuda_gencode  # SASS for the arch
        assert f"arch=compute_{sm},code=compute_{sm}" in p.cuda_gencode  # PTX for newer GPUs


def test_host_preset_detects_this_cpu():
    p = targets.load_preset("host")
    assert p.kind == "llvm" and not p.is_gpu
    assert p.target_dict["mcpu"] and int(p.target_dict["num-cores"]) >= 1
    assert p.target.attrs["mcpu"] == p.target_dict["mcpu"]


@pytest.mark.parametrize(
    "cpu,host_features,mattr",
    [
        ("generic", {"neon": True, "dotprod": True, "i8mm": True}, ["+dotprod", "+i8mm"]),  # unnamed part
        ("generic", {"neon": True, "dotprod": True, "i8mm": False}, ["+dotprod"]),
        ("generic", {"neon": True}, None),  # an Armv8.0 CPU: nothing to add
        ("neoverse-v1", {"neon": True, "dotprod": True, "i8mm": True}, None),  # its name says it all
    ],
)
def test_arm64_host_gets_the_dot_product_extensions_it_has(monkeypatch, cpu, host_features, mattr):
    # an arm64 machine simulated here: LLVM's host detection answers as it would there
    from tvm.target import codegen

    from toolkit.compile.cpu_isa import host_kernel_isas

    monkeypatch.setattr(codegen, "llvm_get_system_triple", lambda: "aarch64-unknown-linux-gnu")
    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: cpu)
    monkeypatch.setattr(targets, "_host_cpu_features", lambda: host_features)
    targets._load.cache_clear()
    targets._filled_target.cache_clear()  # host detection is cached too (on first use of target_dict)
    try:
        p = targets.load_preset("host")
        target_dict, target = p.target_dict, p.target
    finally:
        targets._load.cache_clear()  # later tests see this machine again
        targets._filled_target.cache_clear()
    assert target_dict["mcpu"] == cpu and target_dict.get("mattr") == mattr
    isas = host_kernel_isas(target, "int8")
    dot, mm = host_features.get("dotprod"), host_features.get("i8mm")
    assert isas["q4_gemv"] == ("int8-neon-dotprod" if dot else "int8-neon")
    assert isas["q4_gemm"] == ("int8-neon-i8mm" if mm else "int8-neon-dotprod" if dot else "fp32-neon")


@pytest.mark.parametrize(
    "cpu,host_features,mattr,gemm",
    [
        # a Sapphire Rapids guest reporting Rocket Lake's model number: AMX added, the tile GEMM chosen
        ("rocketlake", {"amx-tile": True, "amx-int8": True}, ["+amx-tile", "+amx-int8"], "int8-amx"),
        ("rocketlake", {"amx-tile": False, "amx-int8": False}, None, "int8-avx512vnni"),  # OS without tiles
        ("sapphirerapids", {"amx-tile": True, "amx-int8": True}, None, "int8-amx"),  # its name says it all
        ("znver4", {}, None, "int8-avx512vnni"),
        # a guest named by its model number whose hypervisor hides units that model has: taken away, so that
        # no kernel faults on them (an Emerald Rapids VM seen without AMX, AVX-512 FP16/BF16 or AVX-VNNI)
        (
            "emeraldrapids",
            {"avx512vnni": True, "amx-tile": False, "amx-int8": False, "amx-bf16": False, "avx512fp16": False}
            | {"avx512bf16": False, "avxvnni": False, "waitpkg": False},  # waitpkg: a system instruction
            ["-amx-bf16", "-amx-int8", "-amx-tile", "-avx512bf16", "-avx512fp16", "-avxvnni"],
            "int8-avx512vnni",
        ),
        (
            "sapphirerapids",
            {"amx-tile": False, "amx-int8": False},
            ["-amx-int8", "-amx-tile"],
            "int8-avx512vnni",
        ),
    ],
)
def test_x86_host_gets_the_amx_extensions_it_has_and_not_the_ones_it_lacks(
    monkeypatch, cpu, host_features, mattr, gemm
):
    from tvm.target import codegen

    from toolkit.compile.cpu_isa import host_kernel_isas

    monkeypatch.setattr(codegen, "llvm_get_system_triple", lambda: "x86_64-pc-linux-gnu")
    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: cpu)
    monkeypatch.setattr(targets, "_host_cpu_features", lambda: host_features)
    targets._load.cache_clear()
    targets._filled_target.cache_clear()
    try:
        p = targets.load_preset("host")
        target_dict, target = p.target_dict, p.target
    finally:
        targets._load.cache_clear()
        targets._filled_target.cache_clear()
    assert target_dict["mcpu"] == cpu and target_dict.get("mattr") == mattr
    assert host_kernel_isas(target, "int8")["q4_gemm"] == gemm


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UserError) as e:
        targets.load_preset("iphone-a99")
    msg = str(e.value)
    assert "iphone-a99" in msg and all(n in msg for n in REQUIRED)


def test_invalid_preset_files_are_user_errors(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        targets._load(bad)
    data = json.loads((targets.TARGETS_DIR / "webgpu.json").read_text())
    data["name"] = "nofallback"
    data["dlight"]["rules"] = ["GEMV"]
    (tmp_path / "nofallback.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="Fallback"):
        targets._load(tmp_path / "nofallback.json")
    data["name"], data["output"] = "badout", ".exe"
    (tmp_path / "badout.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="output"):
        targets._load(tmp_path / "badout.json")


def test_cli_lists_presets_and_rejects_unknown():
    runner = CliRunner()
    res = runner.invoke(main, ["targets"])
    assert res.exit_code == 0
    assert all(name in res.output for name in REQUIRED)
    res = runner.invoke(main, ["targets", "cuda-sm90"])
    assert res.exit_code == 0 and "why" in res.output and "sm_90" in res.output
    res = runner.invoke(main, ["targets", "nope"])
    assert res.exit_code == 1 and "unknown device preset" in res.output


# -- artifacts: the files a preset produces are object code for its host triple ------------------------------
def _small_build(preset):
    import tvm
    from tvm.s_tir import dlight as dl

    from toolkit.verify.sample_kernels import standalone_module

    mod = tvm.IRModule({"rms_norm": standalone_module("float32")["rms_norm"]})
    with preset.target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return tvm.compile(mod, target=preset.target)


@pytest.mark.parametrize(
    ("name", "fmt", "arch"),
    [
        ("iphone-a16", "macho", "arm64"),
        ("android-adreno", "elf", "aarch64"),
        ("android-mali", "elf", "aarch64"),
        ("webgpu", "wasm", "wasm32"),
        ("macos-metal", "macho", "arm64"),
    ],
)
def test_libraries_are_object_code_for_the_device(tmp_path, name, fmt, arch):
    from toolkit.compile.artifacts import check_object_format, export_library

    preset = targets.load_preset(name)
    path = tmp_path / f"lib{preset.output}"
    export_library(_small_build(preset), path, preset)
    objects = check_object_format(path, preset)
    assert {(h.format, h.arch) for _n, h in objects} == {(fmt, arch)}
    if preset.output == ".tar":
        assert {h.kind for _n, h in objects} <= {"relocatable", "module"} and len(objects) >= 2
    else:
        assert objects[0][1].kind == "shared"
    # the same file is rejected for a preset of another architecture
    other = targets.load_preset("cuda-sm80")
    with pytest.raises(UserError):
        check_object_format(path, other)


def test_manifest_checksums(tmp_path):
    from toolkit.compile.artifacts import verify_manifest, write_manifest
    from toolkit.config import Phi3Config

    (tmp_path / "model.tar").write_bytes(b"library bytes")
    cfg = Phi3Config.from_dict(json.loads(json.dumps(_tiny_config_dict())))
    manifest = write_manifest(
        tmp_path,
        targets.load_preset("webgpu"),
        "q4f16_1",
        cfg,
        kernels=[{"name": "k", "launch": {"blockIdx.x": "4"}}],
    )
    assert set(manifest) >= {"preset", "quantization", "model_config", "tvm_version", "kernels", "files"}
    assert verify_manifest(tmp_path)["files"]["model.tar"] == manifest["files"]["model.tar"]
    (tmp_path / "model.tar").write_bytes(b"library bytes, changed")
    with pytest.raises(UserError, match="sha256"):
        verify_manifest(tmp_path)
    (tmp_path / "model.tar").unlink()
    with pytest.raises(UserError, match="missing"):
        verify_manifest(tmp_path)


def _tiny_config_dict():
    from tiny import BASE

    from toolkit.config import parse_hf_config

    return parse_hf_config(
        {**BASE, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, "tiny"
    ).to_dict()


def test_kv_cache_dtype_is_a_cpu_preset_setting():
    assert targets.load_preset("host").kv_cache_dtype == "float16"  # half the bytes decode reads
    assert targets.load_preset("host-exact").kv_cache_dtype is None  # the activation dtype: fp32
    assert targets.load_preset("host-exact").with_kv_cache("float16").kv_cache_dtype == "float16"
    with pytest.raises(UserError, match="--kv-cache"):
        targets.load_preset("vulkan").with_kv_cache("float16")
    with pytest.raises(UserError, match="--kv-cache"):
        targets.load_preset("host").with_kv_cache("int8")


def test_presets_and_records_ship_inside_the_package():
    """A non-editable install must find the presets and tuned records: they live in the package and
    pyproject's package-data lists every one of them (checked by hand with `pip install .` into a venv)."""
    tomllib = pytest.importorskip("tomllib")
    import toolkit

    pkg = Path(toolkit.__file__).resolve().parent
    if "TOOLKIT_TARGETS_DIR" not in os.environ:
        assert targets.TARGETS_DIR.resolve() == pkg / "targets"
    pyproject = tomllib.loads((pkg.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["toolkit"]
    shipped = {p for g in globs for p in pkg.glob(g)}
    on_disk = set((pkg / "targets").glob("*.json")) | set((pkg / "schedules").rglob("*.json"))
    assert len(on_disk) >= len(targets.list_presets()) + 1
    assert on_disk <= shipped, sorted(str(p) for p in on_disk - shipped)


# -- host:CPU: the host preset built for another CPU class --------------------------------------------------
@pytest.fixture
def zen4_guest(monkeypatch):
    """This machine as a Zen 4 VM: AVX-512 with VNNI, no AMX, no AVX-VNNI, and Zen 3's mwaitx hidden."""
    from tvm.target import codegen

    monkeypatch.setattr(codegen, "llvm_get_system_triple", lambda: "x86_64-pc-linux-gnu")
    monkeypatch.setattr(codegen, "llvm_get_system_cpu", lambda: "znver4")
    features = {"avx2": True, "avx512f": True, "avx512vnni": True, "avxvnni": False, "mwaitx": False}
    features |= {"amx-tile": False, "amx-int8": False, "amx-bf16": False, "avx512fp16": False}
    monkeypatch.setattr(targets, "_host_cpu_features", lambda: features)
    targets._load.cache_clear()
    targets._filled_target.cache_clear()
    yield
    targets._load.cache_clear()
    targets._filled_target.cache_clear()


def test_a_pinned_cpu_takes_that_cpus_paths_and_none_of_this_machines(zen4_guest):
    from toolkit.compile.cpu_isa import host_kernel_isas

    host, avx2 = targets.load_preset("host"), targets.load_preset("host:x86-64-v3")
    assert avx2.spec == "host:x86-64-v3" and host.spec == "host" and avx2 != host
    assert avx2.target_dict["mcpu"] == "x86-64-v3" and "mattr" not in avx2.target_dict
    assert avx2.runs_here and not avx2.missing_features
    assert host_kernel_isas(host.target, "int8") == {
        "q4_gemv": "int8-avx512vnni",
        "q4_gemm": "int8-avx512vnni",
    }
    assert host_kernel_isas(avx2.target, "int8") == {"q4_gemv": "int8-avx2", "q4_gemm": "int8-avx2"}
    # Zen 3 runs here although the VM hides its mwaitx (no kernel emits it); Sapphire Rapids' AMX does not
    assert targets.load_preset("host:znver3").runs_here
    spr = targets.load_preset("host:sapphirerapids")
    assert not spr.runs_here and {"amx-tile", "amx-int8", "avx512fp16"} <= set(spr.missing_features)
    assert "mwaitx" not in spr.missing_features


def test_a_pinned_cpu_keys_its_own_library(zen4_guest):
    from toolkit.compile.compile_model import cache_key
    from toolkit.config import phi3_mini_4k

    cfg = phi3_mini_4k()
    key = {
        d: cache_key(cfg, "q4f16_1", targets.load_preset(d)) for d in ("host", "host:znver3", "host:znver4")
    }
    assert key["host:znver3"] != key["host"]
    assert key["host:znver4"] == key["host"]  # this machine named as what it is: the same target, one library


def test_a_pinned_cpu_this_machine_lacks_is_compiled_not_run(zen4_guest):
    from toolkit.runtime.engine import open_device

    with pytest.raises(UserError, match=r"cannot run 'host:sapphirerapids' here: this CPU lacks .*amx-int8"):
        open_device(targets.load_preset("host:sapphirerapids"))
    assert open_device(targets.load_preset("host:znver3")).dlpack_device_type() == 1  # the CPU


@pytest.mark.parametrize(
    "device,needle",
    [
        ("host:zen9", "LLVM knows no CPU 'zen9'"),
        ("cuda-sm90:znver3", "only 'host' takes a CPU"),
        ("nope:znver3", "'nope' is not one of"),
    ],
)
def test_cli_rejects_a_bad_pinned_cpu_before_loading_anything(tmp_path, device, needle):
    res = CliRunner().invoke(
        main, ["compile", str(tmp_path / "absent"), "--device", device, "-o", str(tmp_path)]
    )
    assert res.exit_code == 2 and needle in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_cli_shows_a_pinned_cpu(zen4_guest):
    res = CliRunner().invoke(main, ["targets", "host:sapphirerapids"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("host:sapphirerapids: ") and '"mcpu": "sapphirerapids"' in res.output
    assert lines[1].startswith(
        "  built for CPU sapphirerapids, not this machine's; runs here: no: this CPU lacks"
    )
    res = CliRunner().invoke(main, ["targets", "host:znver3", "--json"])
    assert json.loads(res.output)[0]["name"] == "host:znver3"


def test_a_library_is_keyed_by_the_code_generators_we_own():
    """A fix in our Vulkan code generator (or any compile source) must not reuse a library built before it."""
    from toolkit.compile.compile_model import hashed_sources

    names = {f.as_posix().split("toolkit/", 1)[1] for f in hashed_sources()}
    assert {"backends/vulkan/codegen_glsl.py", "compile/sampling_cut.py", "model/phi3.py"} <= names
    assert {"quantization/__init__.py", "compile/pipeline.py"} <= names
