"""Writing tuned records (`phi3 tune`): MetaSchedule's JSON database plus `index.json` in the device's
record set, `schedules/<preset>/metaschedule/<fingerprint key>/`. Reading and applying them is compile's
(compile/tuned_records.py)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from ..compile.tuned_records import DB_RECORDS, DB_WORKLOAD, INDEX, load_index, records_dir
from ..locks import output_lock
from ..targets import Preset


def write_records(
    preset: Preset, results: list, fingerprint: dict, schedules_root: Path | str | None = None
) -> Path:
    """Add the kept records to the device's database and all results to its index.json (atomic per file).

    An existing database from another TVM version is replaced, not mixed in; other devices' sets are left
    as they are."""
    folder = records_dir(preset, schedules_root, fingerprint)
    # two tuners of one device wait for each other: each merges over the other's set, none is lost
    with output_lock(folder):
        old = load_index(folder)
        same_device = (
            bool(old)
            and old.get("fingerprint", {}).get("match") == fingerprint["match"]
            and old.get("tvm_version") == tvm.__version__
        )
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
        try:
            if same_device:
                for name in (DB_WORKLOAD, DB_RECORDS):
                    if (folder / name).is_file():
                        shutil.copy(folder / name, tmp / name)
            db = ms.database.JSONDatabase(work_dir=str(tmp), module_equality="structural")
            kernels = {k["func_hash"]: k for k in (old or {}).get("kernels", [])} if same_device else {}
            for r in results:
                entry = {
                    "name": r.name,
                    "func_hash": r.func_hash,
                    "decode_calls": r.decode_calls,
                    "prefill_calls": r.prefill_calls,
                    "trials": r.trials,
                    "default_ms": r.default_ms,
                    "tuned_ms": r.tuned_ms,
                    "kept": r.kept,
                    "note": r.note,
                }
                prev = kernels.get(r.func_hash)
                if r.kept and r.record is not None:
                    wl = db.commit_workload(r.workload)
                    rec = r.record
                    db.commit_tuning_record(
                        ms.database.TuningRecord(
                            rec.trace, wl, [r.tuned_ms / 1e3], preset.target, rec.args_info
                        )
                    )
                elif prev and prev.get("kept"):
                    entry = {
                        **prev,
                        "last_retune": {"default_ms": r.default_ms, "tuned_ms": r.tuned_ms, "note": r.note},
                    }
                kernels[r.func_hash] = entry
            index = {
                "fingerprint": fingerprint,
                "tvm_version": tvm.__version__,
                "kernels": sorted(kernels.values(), key=lambda k: k["name"]),
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=1))
            for name in (DB_WORKLOAD, DB_RECORDS, INDEX):
                if (tmp / name).is_file():
                    os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
