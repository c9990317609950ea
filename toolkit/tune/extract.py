"""The distinct kernels (PrimFuncs) of a lowered model, weighted by how often a decode / prefill step calls
them.

A kernel is tuned as a *workload*: the lowered PrimFunc with its dynamic shape variables bound to the size one
step uses (decode: batch 1; prefill: a nominal prompt length), since MetaSchedule's runner needs concrete
shapes. The tuned trace is replayed onto the dynamic PrimFunc when the model is compiled
(records.apply_tuned_records). The baseline is the default rule's schedule at the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import IRModule, relax, s_tir, tirx

from ..compile.compile_model import schedule_rules
from ..compile.workloads import (
    DEFAULT_PREFILL_LEN,
    _static_shape,
    as_workload,
    call_counts,
    specialize,
    step_binding,
)
from ..config import Phi3Config
from ..targets import Preset
from ..tvm_compat import capture_schedules

STEP_FUNCTIONS = ("decode", "prefill")


@dataclass
class Kernel:
    """One distinct PrimFunc of the lowered model and what a decode / prefill step spends on it."""

    name: str
    func: tirx.PrimFunc  # unscheduled, dynamic shapes as lowered
    decode_calls: int
    prefill_calls: int
    bytes_per_call: int  # bytes of all buffers it touches, at the step's shape (a memory-traffic proxy)
    binding: dict = field(default_factory=dict)  # dynamic shape var name -> value used for tuning
    rule: str | None = None  # default rule that schedules it (None: no rule accepts it)
    pre_scheduled: bool = False  # came scheduled (KV-cache kernels): not ours to tune
    workload: IRModule | None = None  # what is tuned (specialised default-rule input), None if untunable
    default_trace: s_tir.Trace | None = None  # the default rule's schedule as a trace on `workload`
    default_mod: IRModule | None = None  # the default schedule at the tuning shape (the baseline)
    decode_share: float = 0.0  # fraction of the decode step's estimated traffic
    prefill_share: float = 0.0

    @property
    def step(self) -> str:
        return "decode" if self.decode_calls else "prefill"

    @property
    def importance(self) -> float:
        """Ranking key: the larger of its shares of decode and of prefill traffic."""
        return max(self.decode_share, self.prefill_share)

    @property
    def tunable(self) -> bool:
        return self.workload is not None


def lower_model(cfg: Phi3Config, quantization: str, preset: Preset, dtype: str | None = None) -> IRModule:
    """The graph after fusion: every compute is a PrimFunc, none scheduled (what `compile` schedules)."""
    from ..compile import pipeline
    from ..compile.compile_model import graph_options
    from ..compile.knobs import knobs_for

    knobs = knobs_for(preset) if preset.kind == "llvm" else None
    mod, _ = pipeline.export_model(cfg, graph_options(quantization, preset, dtype), preset.target, knobs)
    return pipeline.lower_to_tir(mod, preset.target)


def default_schedule(func: tirx.PrimFunc, target: tvm.target.Target, rules: list):
    """(rule name, PrimFunc the rule's schedule starts from, Schedule) of the first rule accepting `func`;
    (None, None, None) when none does."""
    for rule in rules:
        created: list = []
        try:
            with target, capture_schedules(created):
                sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule that raises here would fail `compile` too: not tunable
            return f"{type(rule).__name__} (error)", None, None
        if sch is None:
            continue
        if isinstance(
            sch, list
        ):  # dlight rules may return several candidates; ApplyDefaultSchedule takes [0]
            sch = sch[0]
        base = next((m for s, m in created if s is sch), None)
        if isinstance(base, IRModule):
            base = base["main"]
        return type(rule).__name__, base, sch
    return None, None, None


def tuning_workload(func: tirx.PrimFunc, target, rules: list, binding: dict[str, int]):
    """(rule name, workload IRModule, default trace on the workload or None, default scheduled IRModule).

    The workload is the lowered PrimFunc specialised to `binding`. When the default rule schedules it
    directly, its trace replays on the workload and seeds the search. When the rule first rewrites the
    PrimFunc (the host q4 GEMV rule regroups the reduction), MetaSchedule cannot search the rewritten form
    (RewriteReductionBlock rejected 100% of 2,500 samples, measured), so the search runs on the original
    PrimFunc unseeded and the default is only the baseline it is measured against."""
    rule, base, sch = default_schedule(func, target, rules)
    if base is None:
        return rule, None, None, None
    workload = as_workload(specialize(func, binding))
    default_mod = None
    trace = sch.trace
    try:
        probe = s_tir.Schedule(as_workload(specialize(base, binding)))
        trace.apply_to_schedule(probe, remove_postproc=False)
        default_mod = probe.mod
    except Exception:  # noqa: BLE001 - a decision that depended on the dynamic shape: no baseline
        trace = None
    if not tvm_ffi_equal(base, func):
        trace = None  # the trace belongs to the rewritten PrimFunc, not to the workload
    return rule, workload, trace, default_mod


def tvm_ffi_equal(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b, map_free_vars=True))


def _buffer_bytes(func: tirx.PrimFunc, binding: dict[str, int]) -> int:
    total = 0
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            continue
        n = 1
        for d in _static_shape(shape, binding):
            n *= d
        total += n * tvm.DataType(str(param.dtype)).bits // 8
    return total


def _is_pre_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs or {}
    return "tirx.is_scheduled" in attrs and bool(int(attrs["tirx.is_scheduled"]))


def extract_kernels(
    mod: IRModule, preset: Preset, prefill_len: int = DEFAULT_PREFILL_LEN, with_workloads: bool = True
) -> list[Kernel]:
    """Distinct kernels called by one decode and one prefill step, most important first.

    Importance = share of the step's estimated memory traffic (calls x bytes touched per call). Decode at
    batch 1 is memory-bound, so this ranks its GEMVs correctly; for prefill it is only a rough proxy.
    Kernels the KV cache calls internally (attention) are not call sites of decode/prefill and come
    pre-scheduled; they are not listed."""
    decode, prefill = call_counts(mod, "decode"), call_counts(mod, "prefill")
    rules = schedule_rules(preset) if with_workloads else []
    target = preset.target
    kernels = []
    for name in sorted(set(decode) | set(prefill)):
        func = mod[name]
        # reshapes become views of their input in the VM (RewriteDataflowReshape): no kernel runs
        if not isinstance(func, tirx.PrimFunc) or relax.analysis.has_reshape_pattern(func):
            continue
        binding = step_binding(func, name in decode, prefill_len)
        kernel = Kernel(
            name,
            func,
            decode[name],
            prefill[name],
            _buffer_bytes(func, binding),
            binding,
            pre_scheduled=_is_pre_scheduled(func),
        )
        if with_workloads and not kernel.pre_scheduled:
            (kernel.rule, kernel.workload, kernel.default_trace, kernel.default_mod) = tuning_workload(
                func, target, rules, binding
            )
        kernels.append(kernel)
    for attr, calls in (("decode_share", "decode_calls"), ("prefill_share", "prefill_calls")):
        total = sum(getattr(k, calls) * k.bytes_per_call for k in kernels) or 1
        for k in kernels:
            setattr(k, attr, getattr(k, calls) * k.bytes_per_call / total)
    kernels.sort(key=lambda k: (-k.importance, k.name))
    return kernels


def format_table(kernels: list[Kernel]) -> str:
    """Plain-text table: kernel, calls per decode / prefill step, traffic share, default rule."""
    rows = [("kernel", "decode", "prefill", "MB/call", "decode%", "prefill%", "default rule", "tunable")]
    for k in kernels:
        rows.append(
            (
                k.name,
                str(k.decode_calls),
                str(k.prefill_calls),
                f"{k.bytes_per_call / 1e6:.3f}",
                f"{100 * k.decode_share:.1f}",
                f"{100 * k.prefill_share:.1f}",
                k.rule or ("pre-scheduled" if k.pre_scheduled else "-"),
                "yes" if k.tunable else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
