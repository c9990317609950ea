"""The tunable sizes of the host's hand-written kernels, chosen per CPU.

Each hand kernel family names its knobs and the values a search may try (`SPACE`). What a compile uses:
this machine's own tuned record (`phi3 tune`, `schedules/<preset>/knobs/<fingerprint>.json`) when its CPU
fingerprint and TVM version match, else heuristics from the target's features. Another machine's record is
never used: a size that won on one CPU says nothing about another.

Families (the kernels that read them):
- `attention_decode`, `attention_prefill` (cpu_attention): `lanes` (fp32 lanes per vector op), `chunk`
  (keys per softmax rescale); decode also `prefetch` (chunks ahead whose K / V rows are prefetched; 0: none)
  and `splits` (a long sequence's key ranges run as tasks over all heads, then merged; 0: head tasks).
- `q4_gemv` (cpu_q8_gemv, decode): `tile` (weight rows per parallel task), `rows` (rows per x load),
  `prefetch` (bytes a software prefetch runs ahead in the weight stream; 0: none), `prefetch_level` (the
  cache level it fills: 1 or 2).
- `q8_gemm` (cpu_q8_gemm, prefill): `mr` (rows of x per register block); the AMX GEMM (cpu_amx_gemm) has no
  knobs (its tiles are 16 x 16 by the instruction set).
Records may hold a value per kernel shape over the family's: `"<n>x<k>"` for the matmuls, the model's
attention shape `"<H_qo>x<H_kv>x<d>"` for the attention kernels (sizes that win at one head shape can lose
at another: `phi3 tune` on one model must not slow another's attention).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm.target import Target

from ..targets import Preset
from .cpu_attention import AttentionKnobs
from .cpu_isa import MADDUBS_ISAS, Q8_GEMM_LANES, q8_dot_isa, q8_gemm_isa

SCHEMA = "phi3-knobs/1"
SPACE: dict[str, dict[str, tuple[int, ...]]] = {
    "attention_decode": {
        "lanes": (8, 16),
        "chunk": (8, 16, 32),
        "prefetch": (0, 1, 2),
        "splits": (0, 2, 4, 8),
    },
    "attention_prefill": {"lanes": (8, 16), "chunk": (8, 16, 32)},
    "q4_gemv": {
        "tile": (8, 16, 32, 64),
        "rows": (1, 2, 4),
        "prefetch": (0, 2048, 4096, 8192, 16384),
        "prefetch_level": (1, 2),
    },
    "q8_gemm": {"mr": (3, 4, 6, 8, 12)},
}
# what the kernels were written with (and what a Knobs without values gives)
DEFAULTS: dict[str, dict[str, int]] = {
    "attention_decode": {"lanes": 8, "chunk": 16, "prefetch": 0, "splits": 0},
    "attention_prefill": {"lanes": 8, "chunk": 16},
    "q4_gemv": {"tile": 16, "rows": 1, "prefetch": 0, "prefetch_level": 1},
    "q8_gemm": {"mr": 12},
}
TASKS_PER_THREAD = 4  # a GEMV split into fewer tasks leaves threads idle at its end
# x86 decode GEMVs: the weight stream prefetched this far ahead into L2. Into L1 (prefetcht0) the lines
# in flight evict the quantized activations of a 32 KiB L1 (Zen 4: down_proj slower than with no prefetch)
X86_GEMV_PREFETCH = 8192
X86_GEMV_PREFETCH_LEVEL = 2
# x86 decode attention: K / V rows prefetched one chunk of keys ahead (the cache is read in runs of a few KB)
X86_ATTENTION_PREFETCH = 1


def gemm_rows(isa: str | None) -> int:
    """The int8 GEMM's rows of x per register block for a `q8_gemm_isa` path: 12 with 32 vector registers,
    6 with 16; the `vpmaddubsw` forms (AVX2, AVX-512BW) keep a run of int16 sums per row beside the int32 and
    fp32 ones: 3 rows measured fastest on Phi-3-mini's prefill shapes, at both widths. arm64's GEMMs
    (neon-i8mm) fix their own."""
    if isa in MADDUBS_ISAS:
        return 3
    return 12 if Q8_GEMM_LANES.get(isa or "") == 16 else 6


def shape_key(n: int, k: int) -> str:
    return f"{n}x{k}"


def attention_key(h_qo: int, h_kv: int, d: int) -> str:
    """The attention families' shape key: query heads, KV heads, head size."""
    return f"{h_qo}x{h_kv}x{d}"


@dataclass(frozen=True)
class Knobs:
    """Knob values per family (`"*"`: the family's value, or a shape key); `source` says where from."""

    values: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict, hash=False)
    source: str = "defaults"
    cores: int = 1

    def get(self, family: str, shape: str | None = None) -> dict[str, int]:
        by_key = self.values.get(family, {})
        out = dict(DEFAULTS[family])
        out.update(by_key.get("*", {}))
        if shape is not None:
            out.update(by_key.get(shape, {}))
        return out

    def attention(self, step: str, key: str | None = None) -> AttentionKnobs:
        """The sizes of the `step` kernel ("decode" / "prefill") for the attention shape `key`
        (`attention_key`; None: the family's)."""
        return AttentionKnobs(**self.get(f"attention_{step}", key))

    def gemv(self, n: int, k: int) -> dict[str, int]:
        """`tile`, `rows` and `prefetch` for an n x k GEMV: a shape's record, else the family value (`tile`
        halved while the GEMV would have fewer than TASKS_PER_THREAD tasks per thread; heuristic, not for
        recorded shapes)."""
        key = shape_key(n, k)
        out = self.get("q4_gemv", key)
        if key not in self.values.get("q4_gemv", {}):
            while out["tile"] > 8 and n // out["tile"] < TASKS_PER_THREAD * self.cores:
                out["tile"] //= 2
            out["rows"] = min(out["rows"], out["tile"])
        return out

    def with_values(self, family: str, key: str, values: dict[str, int]) -> Knobs:
        new = {f: {k: dict(v) for k, v in keys.items()} for f, keys in self.values.items()}
        new.setdefault(family, {})[key] = dict(values)
        return Knobs(new, self.source, self.cores)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.values, self.cores], sort_keys=True).encode()).hexdigest()[:12]


def heuristic_knobs(target: Target) -> Knobs:
    """Sizes from the target's features alone: vector width (AVX-512: 16 fp32 lanes), the int8 GEMM's
    register budget (12 rows of x with 32 vector registers, 6 with 16), the thread count, and software
    prefetch into L2 on x86: the GEMVs' weights (measured on Zen 4 and, into L1, on Zen 5) and decode
    attention's K / V rows (Zen 4); arm64 keeps none until an arm64 CPU is at hand. Decode attention of one
    sequence splits its keys into one range per core (each thread streams whole pages; Zen 4)."""
    from .cpu_schedule import simd_lanes_f32

    lanes = max(8, simd_lanes_f32(target))
    gemm = q8_gemm_isa(target)
    mr = gemm_rows(gemm)
    gemv_isa = q8_dot_isa(target)
    x86 = gemv_isa is not None and not gemv_isa.startswith("neon")
    values = {
        "attention_decode": {
            "*": {
                "lanes": lanes,
                "chunk": 16,
                "prefetch": X86_ATTENTION_PREFETCH if x86 else 0,
                # one key range per core; a target that names no core count (a cross build) or one
                # core keeps head tasks: a single range would put the whole attention on one thread
                "splits": _cores(target) if _cores(target) > 1 else 0,
            }
        },
        "attention_prefill": {"*": {"lanes": lanes, "chunk": 16}},
        "q4_gemv": {
            "*": {
                "tile": 16,
                "rows": 1,
                "prefetch": X86_GEMV_PREFETCH if x86 else 0,
                "prefetch_level": X86_GEMV_PREFETCH_LEVEL if x86 else 1,
            }
        },
        "q8_gemm": {"*": {"mr": mr}},
    }
    src = f"heuristics ({lanes}-lane fp32, gemv {gemv_isa or 'fp32'}, gemm {gemm or 'fp32'})"
    return Knobs(values, src, _cores(target))


def _cores(target: Target) -> int:
    attrs = target.attrs
    return int(attrs["num-cores"]) if "num-cores" in attrs else 1


def records_folder(preset: Preset, schedules_root: Path | str | None = None) -> Path:
    from .tuned_records import preset_records_root

    return preset_records_root(preset, schedules_root) / "knobs"


def record_path(preset: Preset, fingerprint: dict[str, Any], schedules_root: Path | str | None = None):
    """One file per CPU fingerprint, so records of several machines can sit side by side."""
    from .tuned_records import fingerprint_key

    return records_folder(preset, schedules_root) / f"{fingerprint_key(fingerprint)}.json"


def knobs_for(preset: Preset, schedules_root: Path | str | None = None) -> Knobs:
    """This machine's tuned knobs for a host preset (over the heuristics), or the heuristics alone."""
    import tvm

    from .tuned_records import device_fingerprint

    base = heuristic_knobs(preset.target)
    if preset.kind != "llvm" or not preset.runs_here:
        return base
    fp = device_fingerprint(preset)
    path = record_path(preset, fp, schedules_root)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return base
    if (
        rec.get("schema") != SCHEMA
        or rec.get("fingerprint", {}).get("match") != fp["match"]
        or rec.get("tvm_version") != tvm.__version__
    ):
        return base
    values = {f: {k: dict(v) for k, v in keys.items()} for f, keys in base.values.items()}
    for family, keys in (rec.get("kernels") or {}).items():
        if family not in SPACE:
            continue
        for key, knob_values in keys.items():
            ok = {n: v for n, v in knob_values.items() if v in SPACE[family].get(n, ())}
            values.setdefault(family, {}).setdefault(key, {}).update(ok)
    return Knobs(values, f"tuned record {path}", base.cores)
