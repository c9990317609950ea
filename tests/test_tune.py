"""phi3 tune: kernel extraction, MetaSchedule tuning (local and over a loopback RPC tracker), records applied
by the compile step."""

from __future__ import annotations

import json
import math

import pytest
from tiny import make_tiny_checkpoint

from toolkit.checkpoint import open_model
from toolkit.compile.cpu_schedule import has_avx2
from toolkit.targets import Preset, load_preset
from toolkit.tune.extract import extract_kernels, lower_model

QUANT = "q4f32_1"


def small_kernel_name(kernels, step: str = "decode") -> str:
    """A step's silu(gate) * up kernel: elementwise, so MetaSchedule's search space for it is small and a
    few trials finish quickly (its numbered name depends on the graph's other functions)."""
    (name,) = [k.name for k in kernels if getattr(k, f"{step}_calls") and "silu" in k.name]
    return name


@pytest.fixture(scope="module")
def tiny_lowered(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "mini-4k")
    cfg = open_model(str(folder)).config
    preset = load_preset("host")
    return cfg, preset, lower_model(cfg, QUANT, preset)


def test_extract_counts_every_linear_of_a_decode_step(tiny_lowered):
    cfg, preset, lowered = tiny_lowered
    kernels = extract_kernels(lowered, preset)
    by_name = {k.name: k for k in kernels}
    # per layer: qkv, o, gate_up, down; plus lm_head -> 4 L + 1 dequant-matmul calls per decode step
    gemv_calls = sum(k.decode_calls for k in kernels if "dequantize" in k.name and "matmul" in k.name.lower())
    assert gemv_calls == 4 * cfg.num_hidden_layers + 1
    small = by_name[small_kernel_name(kernels)]
    assert small.decode_calls == cfg.num_hidden_layers
    assert small.binding == {"batch_size": 1}
    assert not any(k.name.startswith("reshape") for k in kernels)  # views, not kernels
    # the decode GEMVs dominate a decode step's traffic
    assert "dequantize" in kernels[0].name and kernels[0].decode_share > 0.2
    assert math.isclose(sum(k.decode_share for k in kernels), 1.0, rel_tol=1e-9)
    # the baseline is what `compile` runs for this preset: host's int8-activation GEMV where AVX2 exists
    expected = "CPUQ8DotGEMV" if has_avx2(preset.target) else "CPUDequantGEMV"
    assert kernels[0].rule == expected, kernels[0].rule


def _small_kernel(tiny_lowered):
    _, preset, lowered = tiny_lowered
    kernels = extract_kernels(lowered, preset)
    # the prefill one (seq_len bound to 128): MetaSchedule's layout rewrite fails on the decode one's static
    # (1, 1, n) shapes in TVM 0.27
    (kernel,) = [k for k in kernels if k.name == small_kernel_name(kernels, "prefill")]
    assert kernel.tunable and kernel.default_mod is not None
    return kernel


@pytest.mark.slow  # a MetaSchedule search; applying records stays by default (test_gpu_schedule)
def test_tuned_record_is_written_and_applied_by_compile(tiny_lowered, tmp_path, monkeypatch, capsys):
    from toolkit.compile.compile_model import schedule_fn
    from toolkit.compile.tuned_records import (
        INDEX,
        apply_tuned_records,
        device_fingerprint,
        records_dir,
        replay_on_kernel,
    )
    from toolkit.tune.records import write_records
    from toolkit.tune.tuner import tune_kernel

    cfg, preset, lowered = tiny_lowered
    # tune on a separate lowering: tuning currently rewrites the module its kernel came from in place
    # (seen in this test), which `phi3 tune` never meets because compile runs in another process
    kernel = _small_kernel((cfg, preset, lower_model(cfg, QUANT, preset)))
    # min_gain=-inf keeps the record whatever the timing, so the test checks the write/apply path, not speed
    result = tune_kernel(kernel, preset, 4, cost_model="random", min_gain=-math.inf, rounds=1)
    assert result.record is not None and result.kept, result.note
    assert result.default_ms and result.tuned_ms
    folder = write_records(preset, [result], device_fingerprint(preset), tmp_path)
    assert folder == records_dir(preset, tmp_path)  # this machine's set
    index = json.loads((folder / INDEX).read_text())
    assert index["kernels"][0]["name"] == kernel.name and index["kernels"][0]["kept"]
    assert (folder / "database_tuning_record.json").stat().st_size > 0

    def scheduled_script() -> str:
        with preset.target:  # the compile pipeline schedules inside the target context
            return schedule_fn(preset)(lowered.clone())[kernel.name].script()

    from toolkit.compile.compile_model import cache_key

    default, key_before = scheduled_script(), cache_key(cfg, QUANT, preset)
    monkeypatch.setattr(Preset, "schedule_dir", property(lambda self: tmp_path / self.name))
    tuned = scheduled_script()
    # the compile runs the record's trace on the kernel (for this elementwise kernel a few random trials
    # can land on the default's very loops, so the scripts alone need not differ) ...
    assert tuned == replay_on_kernel(lowered[kernel.name], result.record.trace).script()
    # ... because the record replaced the kernel before the default rules saw it
    applied = apply_tuned_records(lowered, preset)
    assert not applied[kernel.name].same_as(lowered[kernel.name])
    assert bool(applied[kernel.name].attrs["tirx.is_scheduled"])
    assert cache_key(cfg, QUANT, preset) != key_before  # new records: a new library, not the cached one

    # records that say they are another device's are not applied, and not talked about
    index["fingerprint"]["match"] = "some other cpu"
    (folder / INDEX).write_text(json.dumps(index))
    capsys.readouterr()
    again = scheduled_script()
    assert "tuned records" not in capsys.readouterr().err
    assert again == default


@pytest.mark.slow  # a MetaSchedule search through an RPC tracker
def test_rpc_tuning_through_a_loopback_tracker(tiny_lowered, tmp_path):
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    import tvm.rpc.server
    import tvm.rpc.tracker

    from toolkit.compile.tuned_records import INDEX, device_fingerprint, records_dir
    from toolkit.tune.records import write_records
    from toolkit.tune.tuner import RPCTarget, tune_kernel

    _, preset, _ = tiny_lowered
    kernel = _small_kernel(tiny_lowered)
    tracker = tvm.rpc.tracker.Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    server = tvm.rpc.server.Server(
        host="127.0.0.1",
        port=9300,
        port_end=9400,
        key="phi3-test",
        tracker_addr=("127.0.0.1", tracker.port),
        silent=True,
    )
    try:
        target = RPCTarget("127.0.0.1", tracker.port, "phi3-test")
        result = tune_kernel(kernel, preset, 2, rpc=target, cost_model="random", min_gain=-math.inf, rounds=1)
    finally:
        server.terminate()
        tracker.terminate()
    assert result.record is not None and result.tuned_ms is not None and result.default_ms is not None
    fingerprint = device_fingerprint(preset, "phi3-test")
    write_records(preset, [result], fingerprint, tmp_path)
    index = json.loads((records_dir(preset, tmp_path, fingerprint) / INDEX).read_text())
    assert index["fingerprint"]["rpc_key"] == "phi3-test"


def test_a_static_kernels_workload_is_a_copy_and_its_replay_keeps_the_kernels_name():
    """GPU decode kernels are static, so nothing is specialised: the tuning workload must still be a copy (a
    Schedule edits its statements in place; the model's kernel changed hash and its records never applied),
    and the replayed kernel must not take the workload's symbol "main" (duplicate symbols fail the build)."""
    from tvm import s_tir

    from toolkit.compile.gpu_schedule import dlight_rules
    from toolkit.compile.tuned_records import replay_on_kernel
    from toolkit.compile.workloads import as_workload, func_hash
    from toolkit.tune.extract import default_schedule
    from toolkit.verify.sample_kernels import dequant_matmul

    preset = load_preset("cuda-sm90")
    func = dequant_matmul(256, 512, "float16", 1).without_attr("global_symbol")  # as the model lowers them
    before = func_hash(func)
    rule, _, sch = default_schedule(func, preset.target, dlight_rules(preset))
    assert rule == "GEMV"
    probe = s_tir.Schedule(as_workload(func))
    sch.trace.apply_to_schedule(probe, remove_postproc=False)
    assert func_hash(func) == before
    replayed = replay_on_kernel(func, sch.trace)
    assert replayed is not None and "global_symbol" not in (replayed.attrs or {})
    assert func_hash(func) == before


def test_record_sets_of_two_devices_sit_side_by_side(tmp_path):
    """`phi3 tune` on one machine leaves another machine's records as they are (a shipped set included),
    and a re-run on the same machine and TVM version keeps the kernels it did not tune again."""
    from toolkit.compile.tuned_records import INDEX, device_fingerprint, load_index, records_dir
    from toolkit.tune.records import write_records
    from toolkit.tune.tuner import KernelResult

    def result(name: str) -> KernelResult:
        return KernelResult(name, 1, 1, 4, 1.0, 1.1, kept=False, note="slower", func_hash=f"h-{name}")

    def names(folder) -> list[str]:
        return [k["name"] for k in load_index(folder)["kernels"]]

    preset = load_preset("host")
    here = device_fingerprint(preset)
    there = {**here, "match": "another cpu"}
    a = write_records(preset, [result("rms_norm")], here, tmp_path)
    b = write_records(preset, [result("softmax")], there, tmp_path)
    assert a == records_dir(preset, tmp_path) and b == records_dir(preset, tmp_path, there) and a != b
    write_records(preset, [result("apply_rope")], here, tmp_path)
    assert names(a) == ["apply_rope", "rms_norm"] and names(b) == ["softmax"]
    assert load_index(b)["fingerprint"]["match"] == "another cpu"
    # under another TVM version this machine's set starts over
    (a / INDEX).write_text(json.dumps({**load_index(a), "tvm_version": "0.0.1"}))
    write_records(preset, [result("softmax")], here, tmp_path)
    assert names(a) == ["softmax"] and names(b) == ["softmax"]
    assert sorted(p.name for p in (tmp_path / "host" / "metaschedule").iterdir()) == sorted([a.name, b.name])
