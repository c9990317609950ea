"""GPU scheduling: dlight rules per preset, tuned records first, and no kernel left without thread
bindings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import tvm

from toolkit.compile.gpu_schedule import (
    check_thread_bindings,
    dlight_rules,
    gpu_schedule_pass,
    unbound_kernels,
)
from toolkit.compile.tuned_records import (
    INDEX,
    apply_tuned_records,
    device_fingerprint,
    fingerprint_key,
    records_dir,
)
from toolkit.compile.workloads import as_workload, func_hash
from toolkit.errors import UserError
from toolkit.targets import load_preset
from toolkit.verify.sample_kernels import dequant_matmul, standalone_module

KERNELS = ["dequant_gemv", "dequant_matmul", "rms_norm", "softmax"]


def test_unscheduled_gpu_kernels_are_refused_by_name():
    mod = standalone_module("float32")
    assert unbound_kernels(mod) == sorted(KERNELS)
    with pytest.raises(UserError) as e:
        check_thread_bindings(mod)
    assert all(k in str(e.value) for k in KERNELS)


def test_schedule_binds_every_kernel_and_leaves_the_input_alone():
    mod = standalone_module("float32")
    scheduled = gpu_schedule_pass(load_preset("webgpu"))(mod)
    check_thread_bindings(scheduled)  # raises if any kernel would run as host code
    assert unbound_kernels(mod) == sorted(KERNELS)  # the unscheduled reference is untouched
    assert "_rf" in scheduled["dequant_gemv"].script()  # GEMV rule: split reduction across threads


def test_preset_parameters_reach_dlight():
    preset = load_preset("webgpu")
    rules = dlight_rules(preset)
    assert [type(r).__name__ for r in rules] == list(preset.dlight_rules)
    assert rules[preset.dlight_rules.index("LowBatchGEMV")].bucket == preset.low_batch_gemv_bucket
    custom = load_preset("webgpu").__class__(**{**preset.__dict__, "matmul_config": {"block_size_x": 4}})
    matmul = dlight_rules(custom)[0]
    assert matmul.get_configs(preset.target).block_size_x == 4


def test_low_batch_ranges_come_from_the_preset_and_are_validated(tmp_path):
    assert load_preset("cuda-sm90").low_batch_gemv == ((2, 2), (8, 4))  # MLC's ranges by default
    from toolkit.targets import _load

    data = json.loads(open(load_preset("webgpu").path).read())

    for bad in ([[8, 4], [2, 2]], [[2, 0]], [[2]], "2,2", [[2.5, 2]], [[True, 2]]):
        data["dlight"]["low_batch_gemv"] = bad
        (tmp_path / "webgpu.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match="low_batch_gemv"):
            _load(tmp_path / "webgpu.json")
    data["dlight"]["rules"] = [r for r in data["dlight"]["rules"] if r != "LowBatchGEMV"]
    data["dlight"]["low_batch_gemv"] = [[4, 4]]
    (tmp_path / "webgpu.json").write_text(json.dumps(data))
    assert _load(tmp_path / "webgpu.json").low_batch_gemv == ()  # no LowBatchGEMV rule: no dispatch


def test_low_batch_dispatch_gives_symbolic_batch_matmuls_a_gemv_branch():
    """dlight's Matmul alone tiles a symbolic-row q4 matmul by 128 rows, a GEMM for a batch of one; the
    scheduled kernel now branches on the row count, thread-invariantly, LowBatchGEMV first."""
    mod = tvm.IRModule({"mm": dequant_matmul(256, 512, "float16", "n")})
    out = gpu_schedule_pass(load_preset("cuda-sm90"))(mod)["mm"]
    script = out.script()
    assert script.count("tvm_thread_invariant") == 2 and "n <= T.int64(2)" in script
    check_thread_bindings(tvm.IRModule({"mm": out}))
    static = tvm.IRModule({"mm": dequant_matmul(256, 512, "float16", 1)})  # static rows: plain rules
    assert "tvm_thread_invariant" not in gpu_schedule_pass(load_preset("cuda-sm90"))(static)["mm"].script()


def test_host_preset_is_not_a_gpu_preset():
    with pytest.raises(ValueError):
        gpu_schedule_pass(load_preset("host"))


def _fallback_record_set(folder, preset, func, fingerprint) -> dict:
    """A record set in `folder` holding the Fallback schedule (no split reduction) of `func`, which dlight's
    GEMV rule would not pick; returns its index."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms

    with preset.target:
        fallback = dl.gpu.Fallback().apply(func, preset.target, False)
    folder.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(folder))
    workload = db.commit_workload(as_workload(func))
    db.commit_tuning_record(
        ms.database.TuningRecord(
            trace=fallback.trace, workload=workload, run_secs=[1e-3], target=preset.target
        )
    )
    # index.json: the one place that says for which device and TVM version the records hold
    index = {
        "fingerprint": fingerprint,
        "tvm_version": tvm.__version__,
        "kernels": [{"name": "dequant_gemv", "func_hash": func_hash(func), "kept": True}],
    }
    (folder / INDEX).write_text(json.dumps(index))
    return index


def test_tuned_records_take_precedence_over_dlight(tmp_path, capsys):
    preset = load_preset("webgpu")
    func = dequant_matmul(256, 512, "float32", 1).with_attr("global_symbol", "dequant_gemv")
    mine = records_dir(preset, tmp_path)
    assert mine.parent.name == "metaschedule" and mine.name == fingerprint_key(device_fingerprint(preset))
    index = _fallback_record_set(mine, preset, func, device_fingerprint(preset))
    # another device's set beside it, whose record (the same Fallback) must not be the reason for anything
    other_fp = {**device_fingerprint(preset), "match": "another device"}
    _fallback_record_set(records_dir(preset, tmp_path, other_fp), preset, func, other_fp)
    mod = tvm.IRModule({"dequant_gemv": func})
    gpu = gpu_schedule_pass(preset)
    tuned = gpu(apply_tuned_records(mod, preset, tmp_path))["dequant_gemv"]
    untuned = gpu(apply_tuned_records(mod, preset, tmp_path / "absent"))["dequant_gemv"]
    assert "_rf" not in tuned.script()  # the record's Fallback, not dlight's split-reduction GEMV
    assert "_rf" in untuned.script()
    assert "thread_binding" in tuned.script()
    assert capsys.readouterr().err == ""  # another device's records sit there without a word

    # only another device's set: not applied, and nothing said (it is not this machine's to apply)
    shutil.rmtree(mine)
    assert "_rf" in gpu(apply_tuned_records(mod, preset, tmp_path))["dequant_gemv"].script()
    assert capsys.readouterr().err == ""

    # a set copied under this device's name whose index names another device: not applied
    shutil.copytree(records_dir(preset, tmp_path, other_fp), mine)
    assert "_rf" in gpu(apply_tuned_records(mod, preset, tmp_path))["dequant_gemv"].script()

    # this device's own set from another TVM version: not applied, and one line says to tune again
    (mine / INDEX).write_text(json.dumps({**index, "tvm_version": "0.0.1"}))
    assert "_rf" in gpu(apply_tuned_records(mod, preset, tmp_path))["dequant_gemv"].script()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with TVM 0.0.1" in err and str(mine) in err

    # the layout before sets were keyed (one set in schedules/<preset>/) still applies when it is this one's
    shutil.rmtree(tmp_path / preset.name)
    _fallback_record_set(tmp_path / preset.name, preset, func, device_fingerprint(preset))
    assert "_rf" not in gpu(apply_tuned_records(mod, preset, tmp_path))["dequant_gemv"].script()


def test_shipped_record_sets_sit_under_their_fingerprints_key():
    """Each shipped MetaSchedule set is in the folder its own index's fingerprint names, and the GPU
    presets' sets (keyed by the target alone) are found for the preset as it loads today."""
    from toolkit.compile.tuned_records import METASCHEDULE, active_records, load_index
    from toolkit.targets import TARGETS_DIR

    sets = sorted((TARGETS_DIR.parent / "schedules").glob(f"*/{METASCHEDULE}/*/{INDEX}"))
    assert sets
    for path in sets:
        assert path.parent.name == fingerprint_key(load_index(path.parent)["fingerprint"]), path
    found = active_records(load_preset("cuda-sm90"))
    assert found is not None and found[0].parent.parent.name == "cuda-sm90"
    assert any(k["kept"] for k in found[1]["kernels"])


@pytest.mark.slow  # 37 s: TVM's tensor-intrinsic registry for every GPU
def test_dlight_matmul_tensorizes_on_metal_and_cuda():
    """The simdgroup (Metal) and tensor-core (CUDA) Matmul paths segfault with apache-tvm-ffi 0.1.15; with the
    pinned 0.1.14.post1 they schedule. Run in a subprocess so a segfault fails this test, not the session."""
    code = textwrap.dedent("""
        import tvm
        from toolkit.compile.gpu_schedule import gpu_schedule_pass
        from toolkit.targets import load_preset
        from toolkit.verify.sample_kernels import dequant_matmul
        mod = tvm.IRModule({"mm": dequant_matmul(256, 512, "float16", "seq_len")})
        metal = gpu_schedule_pass(load_preset("iphone-a16"))(mod)["mm"].script()
        cuda = gpu_schedule_pass(load_preset("cuda-sm80"))(mod)["mm"].script()
        print("simdgroup" in metal, "wmma" in cuda or "mma" in cuda)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"scheduling crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.split()[-2:] == ["True", "True"]


def test_thread_bindings_are_found_in_either_form():
    """A thread-bound loop and a `launch_thread` attribute both count; a plain loop does not."""
    from tvm.script import tirx as T

    from toolkit.compile.gpu_schedule import has_thread_binding

    @T.prim_func
    def launched(a: T.Buffer((64,), "float32")):
        tx = T.launch_thread("threadIdx.x", 64)
        a[tx] = T.float32(1)

    @T.prim_func
    def plain(a: T.Buffer((64,), "float32")):
        for i in range(64):
            a[i] = T.float32(1)

    assert has_thread_binding(launched) and not has_thread_binding(plain)
    mod = standalone_module("float32")
    scheduled = gpu_schedule_pass(load_preset("webgpu"))(mod)
    assert all(has_thread_binding(f) for f in scheduled.functions.values())  # T.thread_binding loops
