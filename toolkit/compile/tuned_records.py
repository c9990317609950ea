"""Tuned MetaSchedule records and applying them at compile time (`phi3 tune` writes them: tune/records.py).

One record set per device fingerprint, `schedules/<preset>/metaschedule/<fingerprint key>/`: MetaSchedule's
JSON database plus `index.json` (the fingerprint, TVM version and per-kernel default vs tuned times, kept or
not). Sets of several machines sit side by side, like the knob records (`knobs/<fingerprint key>.json`); a
compile reads only this machine's, and only under the TVM version that tuned it: a schedule measured on one
CPU says nothing about another, and traces may not replay across TVM versions.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import warnings
from pathlib import Path

import tvm
from tvm import IRModule, s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from ..targets import Preset
from .workloads import DEFAULT_PREFILL_LEN, as_workload, call_counts, func_hash, specialize, step_binding

DB_WORKLOAD = "database_workload.json"
DB_RECORDS = "database_tuning_record.json"
INDEX = "index.json"
METASCHEDULE = "metaschedule"  # the record sets' folder in schedules/<preset>/


def device_fingerprint(preset: Preset, rpc_key: str | None = None) -> dict:
    """What a record's speed depends on. `match` is the part that must be equal for records to apply: for
    the host preset this CPU's model and ISA flags plus the target; for other presets (compiled here, run on
    a device) the target, since the device is not visible at compile time."""
    target = json.dumps(preset.target_dict, sort_keys=True)
    info: dict = {"preset": preset.name, "target": preset.target_dict, "rpc_key": rpc_key}
    if preset.runs_here and rpc_key is None:
        model, flags = _cpu_info()
        info.update(cpu_model=model, isa_flags=flags, machine=platform.machine())
        info["match"] = f"{target}|{model}|{' '.join(flags)}"
    else:
        info["match"] = target
    return info


def _cpu_info() -> tuple[str, list[str]]:
    from ..hostinfo import cpu_model, isa_flags

    return platform.processor() or cpu_model(), isa_flags()


def fingerprint_key(fingerprint: dict) -> str:
    """The file or folder name of one device's records (knobs and MetaSchedule alike)."""
    return hashlib.sha256(fingerprint["match"].encode()).hexdigest()[:16]


def preset_records_root(preset: Preset, schedules_root: Path | str | None = None) -> Path:
    """schedules/<preset>/ under `schedules_root` (the package's by default)."""
    return preset.schedule_dir if schedules_root is None else Path(schedules_root) / preset.name


def records_dir(
    preset: Preset, schedules_root: Path | str | None = None, fingerprint: dict | None = None
) -> Path:
    """The MetaSchedule record set of one device fingerprint (this machine's by default)."""
    fp = device_fingerprint(preset) if fingerprint is None else fingerprint
    return preset_records_root(preset, schedules_root) / METASCHEDULE / fingerprint_key(fp)


def load_index(folder: Path) -> dict | None:
    try:
        return json.loads((folder / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def active_records(
    preset: Preset, schedules_root: Path | str | None = None, *, quiet: bool = True
) -> tuple[Path, dict] | None:
    """This machine's record set and its index, when there is one that this TVM version can apply.

    A set made under another TVM version is not applied; unless `quiet`, one line says so (it is this
    machine's own, so re-tuning is what to do). Other machines' sets are not looked at, so nothing is said
    of them: they are never this machine's to apply."""
    here = device_fingerprint(preset)
    # the layout before record sets were keyed (one set in schedules/<preset>/) is still read
    for folder in (records_dir(preset, schedules_root, here), preset_records_root(preset, schedules_root)):
        index = load_index(folder)
        if index is not None and (folder / DB_RECORDS).is_file():
            if index.get("fingerprint", {}).get("match") == here["match"]:
                break
    else:
        return None
    if index.get("tvm_version") != tvm.__version__:
        if not quiet:
            # one line, not a Python warning (whose echo of our source line reads like a fault to a user)
            print(
                f"notice: {folder}: this machine's tuned records were made with TVM "
                f"{index.get('tvm_version') or '?'}, not {tvm.__version__}; not applied, the built-in "
                "schedules are used (`phi3 tune` tunes again)",
                file=sys.stderr,
            )
        return None
    return folder, index


def apply_tuned_records(
    mod: IRModule,
    preset: Preset,
    schedules_root: Path | str | None = None,
    prefill_len: int = DEFAULT_PREFILL_LEN,
) -> IRModule:
    """Replace the PrimFuncs that have a kept record by the tuned schedule (marked `tirx.is_scheduled`, so
    the default rules skip them). No-op without this machine's records for this TVM version."""
    found = active_records(preset, schedules_root, quiet=False)
    if found is None:
        return mod
    folder, index = found
    wanted = {k["func_hash"] for k in index.get("kernels", []) if k.get("kept")}
    if not wanted:
        return mod
    db = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    target = preset.target
    decode = call_counts(mod, "decode")
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func_hash(func) not in wanted:
            continue
        attrs = func.attrs or {}
        if "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]):
            continue
        binding = step_binding(func, gv.name_hint in decode, prefill_len)
        workload = as_workload(specialize(func, binding))
        record = db.query_tuning_record(workload, target, "main")
        if record is None:
            continue
        scheduled = replay_on_kernel(func, record.trace)
        if scheduled is not None:
            updates[gv] = scheduled
    if not updates:
        return mod
    out = mod.clone()
    for gv, func in updates.items():
        out[gv] = func
    return out


def replay_on_kernel(func: tirx.PrimFunc, trace: s_tir.Trace) -> tirx.PrimFunc | None:
    """The tuned trace (found on the static-shape workload) replayed on the model's dynamic PrimFunc."""
    try:
        sch = s_tir.Schedule(as_workload(func))
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as e:  # noqa: BLE001 - e.g. a tile decision that needs a static extent
        warnings.warn(
            f"tuned record does not replay on the dynamic kernel ({type(e).__name__}); "
            "using the default schedule",
            stacklevel=3,
        )
        return None
    new = sch.mod["main"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        new = new.with_attr("global_symbol", func.attrs["global_symbol"])
    elif new.attrs is not None and "global_symbol" in new.attrs:
        new = new.without_attr("global_symbol")  # the workload's "main", not the kernel's name
    return new.with_attr("tirx.is_scheduled", True)
