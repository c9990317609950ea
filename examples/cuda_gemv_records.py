"""cuda-sm90 tuned records for Phi-3-mini's decode GEMVs, from kernel times measured on an H200.

    python examples/cuda_gemv_records.py SPEED_JSON [SPEED_JSON ...]

Each SPEED_JSON is what `examples/cuda_speed.py run` wrote on the GPU machine: per library, the kernels of a
decode step with their GPU time per token (torch.profiler). The libraries `d-gemv-graph` (dlight's CUDA GEMV
table, the default) and `g-<table>` (the same model with dlight's GEMV scheduled under another parameter
table, examples/cuda_speed.py GEMV_TABLES) ran the same weights through the same step. For each decode GEMV,
a table whose kernel was faster than the default by more than MARGIN in every run becomes a record: its
schedule, taken here on the kernel's tuning workload, as a MetaSchedule trace in the preset's record set,
schedules/cuda-sm90/metaschedule/<key>/ (what `phi3 compile --device cuda-sm90` applies,
compile/tuned_records.py), with both times in index.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MARGIN = 0.025  # the default's own spread between runs was ~1% (354.2 / 354.4 / 357.7 us per token)
DEFAULT_LIB = "d-gemv-graph"


def kernel_times(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """{library: {kernel name: [us per call, one per run]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for p in paths:
        for lib in json.loads(p.read_text()):
            for row in lib.get("profile", {}).get("top", []):
                name = row["kernel"].removesuffix("_kernel")
                per_call = row["us_per_token"] / row["per_token"]
                out.setdefault(lib["library"], {}).setdefault(name, []).append(per_call)
    return out


def main(paths: list[Path]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from cuda_speed import gemv_under
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from toolkit.compile.tuned_records import device_fingerprint
    from toolkit.compile.workloads import func_hash
    from toolkit.config import phi3_mini_4k
    from toolkit.targets import load_preset
    from toolkit.tune.extract import default_schedule, extract_kernels, lower_model
    from toolkit.tune.records import write_records
    from toolkit.tune.tuner import KernelResult, replays_on_model_kernel

    times = kernel_times(paths)
    default = times[DEFAULT_LIB]
    preset = load_preset("cuda-sm90")
    mod = lower_model(phi3_mini_4k(sliding_window=None), "q4f16_1", preset)
    kernels = {k.name: k for k in extract_kernels(mod, preset) if k.decode_calls and k.rule == "GEMV"}
    results = []
    for name, k in sorted(kernels.items()):
        base = default.get(name)
        if not base:
            print(f"{name}: not in the default library's profile; skipped")
            continue
        best = None
        for lib, kt in times.items():
            if not lib.startswith("g-") or name not in kt:
                continue
            if max(kt[name]) < min(base) * (1 - MARGIN) and (best is None or min(kt[name]) < best[1]):
                best = (lib.removeprefix("g-"), min(kt[name]), kt[name])
        default_ms = statistics.median(base) / 1e3
        if best is None:
            print(f"{name}: default {statistics.median(base):.2f} us; no table faster by {MARGIN:.1%}")
            continue
        table, _, runs = best
        rule, _, sch = default_schedule(k.func, preset.target, [gemv_under(table)()])
        workload_sch = None
        if sch is not None:
            workload_sch = s_tir.Schedule(k.workload)
            sch.trace.apply_to_schedule(workload_sch, remove_postproc=False)
        if workload_sch is None or not replays_on_model_kernel(k, sch.trace):
            print(f"{name}: the {table} schedule does not replay on the model kernel; skipped")
            continue
        record = ms.database.TuningRecord(
            workload_sch.trace,
            ms.database.Workload(k.workload),
            None,
            preset.target,
            ms.arg_info.ArgInfo.from_prim_func(k.workload["main"]),
        )
        tuned_ms = statistics.median(runs) / 1e3
        results.append(
            KernelResult(
                name,
                k.decode_calls,
                k.prefill_calls,
                len(times) - 1,
                default_ms,
                tuned_ms,
                True,
                note=f"dlight GEMV under the {table} parameter table; GPU time per call in the Phi-3-mini "
                f"decode step on an H200 (examples/cuda_speed.py), {len(runs)} run(s) vs {len(base)}",
                workload=k.workload,
                record=record,
                func_hash=func_hash(k.func),
            )
        )
        print(f"{name}: default {default_ms * 1e3:.2f} us -> {table} {tuned_ms * 1e3:.2f} us (kept)")
    if results:
        folder = write_records(preset, results, device_fingerprint(preset))
        print("records:", folder)


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
