"""Tune the kernels that matter with MetaSchedule, seeded with the default schedule, and keep only winners.

Per kernel (a workload from extract.py):
  1. measure the default (hand / dlight) schedule with the runner and put it in the search database as a
     record, so the evolutionary search starts from it (its initial population draws from the database);
  2. `meta_schedule.tune_tir` for N trials (local builder + local runner, or TVM's RPC runner through a
     tracker, so phones / remote GPUs measure);
  3. re-measure default and best tuned schedule with the same runner, interleaved, and keep the tuned
     record only if it is faster by at least `min_gain`.
The seed guarantees the search never reports something worse than the default as "best", but a hand trace
has no sampling decisions, so MetaSchedule's mutators cannot explore around it: tuned candidates come from
its own design space (MultiLevelTiling etc.) on the same workload.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tvm import IRModule, s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..compile.workloads import func_hash
from ..cpu_threads import size_thread_pool
from ..targets import Preset
from ..tvm_compat import use_cpu_tensor_intrinsics_only
from .extract import Kernel
from .guard import meta_schedule_logging


@dataclass
class RPCTarget:
    """Where to measure: a TVM RPC tracker and the key the devices registered with."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_sec: int = 60


@dataclass
class KernelResult:
    """Outcome of tuning one kernel (times in ms, median of the final interleaved measurement)."""

    name: str
    decode_calls: int
    prefill_calls: int
    trials: int
    default_ms: float | None
    tuned_ms: float | None
    kept: bool
    note: str = ""
    workload: IRModule | None = field(default=None, repr=False)
    record: ms.database.TuningRecord | None = field(default=None, repr=False)
    func_hash: str = ""  # structural hash of the lowered (dynamic) PrimFunc: a cheap pre-filter when applying
    seconds: float = 0.0  # wall time spent tuning this kernel

    @property
    def speedup(self) -> float | None:
        if self.default_ms and self.tuned_ms:
            return self.default_ms / self.tuned_ms
        return None


def make_runner(rpc: RPCTarget | None, evaluator: ms.runner.EvaluatorConfig, timeout_sec: float = 300):
    """LocalRunner, or RPCRunner over the tracker (one session per measurement, as MetaSchedule does)."""
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator)
    config = ms.runner.RPCConfig(
        tracker_host=rpc.tracker_host,
        tracker_port=rpc.tracker_port,
        tracker_key=rpc.key,
        session_timeout_sec=rpc.session_timeout_sec,
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process, one after another.

    MetaSchedule's LocalBuilder compiles in popen worker processes; on a loaded 2-core machine starting one
    (importing TVM: ~20 s) made a single tiny kernel take 340 s against 0.4 s in-process. Codegen errors are
    Python exceptions here, reported as build errors like LocalBuilder does."""

    def build(self, build_inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

        results = []
        for item in build_inputs:
            try:
                results.append(
                    ms.builder.BuilderResult(default_export(default_build(item.mod, item.target, None)), None)
                )
            except Exception as e:  # noqa: BLE001 - an invalid candidate is a result, not a crash
                results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results


def make_builder() -> ms.builder.Builder:
    return InProcessBuilder()


def device_type(target: Target) -> str:
    """The runtime device name a runner allocates on (`llvm` targets run on `cpu`)."""
    return "cpu" if target.kind.name in ("llvm", "c") else target.kind.name


def schedule_from_trace(workload: IRModule, trace: s_tir.Trace) -> IRModule:
    """The scheduled module a (complete, postprocessed) trace produces on the workload."""
    sch = s_tir.Schedule(workload)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


def measure(mods: list[IRModule], target: Target, builder, runner, args_info) -> list[list[float] | None]:
    """Build and run each module with MetaSchedule's builder/runner; seconds per repeat, None on failure."""
    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, index = [], []
    for i, b in enumerate(built):
        if b.error_msg is None:
            inputs.append(
                ms.runner.RunnerInput(b.artifact_path, device_type=device_type(target), args_info=args_info)
            )
            index.append(i)
    out: list[list[float] | None] = [None] * len(mods)
    for i, future in zip(index, runner.run(inputs), strict=True):
        res = future.result()
        if res.error_msg is None:
            out[i] = [float(s) for s in res.run_secs]
    return out


def compare(
    workload: IRModule,
    default_mod: IRModule | None,
    tuned_trace: s_tir.Trace,
    target: Target,
    builder,
    runner,
    rounds: int = 3,
) -> tuple[float | None, float | None]:
    """Median ms of default and tuned, measured interleaved (d, t, d, t, ...) so machine load hits both."""
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    tuned_mod = schedule_from_trace(workload, tuned_trace)
    mods = []
    for _ in range(rounds):
        if default_mod is not None:
            mods.append(default_mod)
        mods.append(tuned_mod)
    times = measure(mods, target, builder, runner, args_info)
    step = 2 if default_mod is not None else 1
    d_runs = [t for t in times[0::step] if t] if default_mod is not None else []
    t_runs = [t for t in times[step - 1 :: step] if t]

    def median_ms(runs):
        flat = [s for r in runs for s in r]
        return 1e3 * statistics.median(flat) if flat else None

    return median_ms(d_runs), median_ms(t_runs)


def _seed_database(
    db: ms.database.JSONDatabase, workload: IRModule, trace: s_tir.Trace, target: Target, builder, runner
) -> float | None:
    """Measure the default schedule and commit it as the first record of the workload."""
    args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
    (secs,) = measure([schedule_from_trace(workload, trace)], target, builder, runner, args_info)
    if secs is None:
        return None
    wl = db.commit_workload(workload)
    db.commit_tuning_record(ms.database.TuningRecord(trace, wl, secs, target, args_info))
    return 1e3 * statistics.median(secs)


def tune_kernel(
    kernel: Kernel,
    preset: Preset,
    trials: int,
    *,
    rpc: RPCTarget | None = None,
    cost_model: str = "xgb",
    min_gain: float = 0.03,
    work_dir: str | None = None,
    num_tuning_cores: int | None = None,
    seed: int | None = 0,
    rounds: int = 3,
) -> KernelResult:
    """Tune one kernel for `trials` MetaSchedule trials; the result says whether the tuned schedule won."""
    t0 = time.time()
    base = KernelResult(
        kernel.name,
        kernel.decode_calls,
        kernel.prefill_calls,
        trials,
        None,
        None,
        False,
        workload=kernel.workload,
        func_hash=func_hash(kernel.func),
    )
    if kernel.workload is None:
        base.note = "no tunable workload"
        return base
    target = preset.target
    use_cpu_tensor_intrinsics_only(target)
    cores = num_tuning_cores or int(target.attrs.get("num-cores", 1) or 1)
    if rpc is None and target.kind.name == "llvm":  # the local runner's workers: as many threads as a run
        size_thread_pool(int(target.attrs.get("num-cores", 1) or 1))
    search_eval = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    final_eval = ms.runner.EvaluatorConfig(number=3, repeat=5, min_repeat_ms=50)
    builder = make_builder()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        db = ms.database.JSONDatabase(work_dir=tmp, module_equality="structural")
        runner = make_runner(rpc, search_eval)
        seed_ms = None
        if kernel.default_trace is not None:
            seed_ms = _seed_database(db, kernel.workload, kernel.default_trace, target, builder, runner)
        try:
            with meta_schedule_logging():  # its logging setup crashes on a foreign unnamed handler
                ms.tune_tir(
                    kernel.workload,
                    target,
                    work_dir=tmp,
                    max_trials_global=trials,
                    num_trials_per_iter=min(trials, 16),
                    builder=builder,
                    runner=runner,
                    database=db,
                    cost_model=cost_model,
                    num_tuning_cores=cores,
                    seed=seed,
                )
        except RuntimeError as e:  # ScheduleError and TVM InternalError are RuntimeErrors
            # e.g. TVM 0.27's layout rewrite fails on some static-shape kernels: the default stays
            base.note = f"MetaSchedule failed: {str(e).strip().splitlines()[0][:120]}"
            base.default_ms = seed_ms
            base.seconds = time.time() - t0
            return base
        best = _best_new_record(db, kernel.workload, kernel.default_trace)
        if best is None:
            base.note = "search produced no valid candidate"
            base.default_ms = seed_ms
            base.seconds = time.time() - t0
            return base
        final_runner = make_runner(rpc, final_eval)
        d_ms, t_ms = compare(
            kernel.workload, kernel.default_mod, best.trace, target, builder, final_runner, rounds
        )
    base.default_ms, base.tuned_ms, base.record = d_ms, t_ms, best
    if t_ms is None:
        base.note = "tuned schedule failed to run in the final measurement"
    elif d_ms is None:
        base.kept = True
        base.note = "no default schedule to compare with"
    else:
        base.kept = t_ms < d_ms * (1.0 - min_gain)
        base.note = "faster" if base.kept else f"not faster than the default by {100 * min_gain:.0f}%"
    if base.kept and not replays_on_model_kernel(kernel, best.trace):
        # found at the static tuning shape; `compile` needs it on the dynamic PrimFunc (measured: MetaSchedule
        # GEMV traces fail there because their tile sampling needs a static batch extent)
        base.kept = False
        base.note = "tuned trace does not replay on the dynamic-shape kernel"
    base.seconds = time.time() - t0
    return base


def replays_on_model_kernel(kernel: Kernel, trace: s_tir.Trace) -> bool:
    """Whether `compile` can apply the trace to the model's (dynamic-shape) PrimFunc."""
    import warnings

    from ..compile.tuned_records import replay_on_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return replay_on_kernel(kernel.func, trace) is not None


def _best_new_record(db, workload: IRModule, seed_trace: s_tir.Trace | None):
    """Fastest record in the search database that is not the seeded default schedule."""
    seed_text = str(seed_trace) if seed_trace is not None else None
    wl = db.commit_workload(workload)
    for rec in db.get_top_k(wl, 64):
        if seed_text is None or str(rec.trace) != seed_text:
            return rec
    return None


def tune_kernels(
    kernels: list[Kernel],
    preset: Preset,
    trials: int,
    *,
    progress: Callable[[str], None] | None = None,
    **kwargs,
) -> list[KernelResult]:
    """Tune each kernel in turn (the order given: most important first)."""
    results = []
    for i, kernel in enumerate(kernels, 1):
        if progress:
            progress(f"[{i}/{len(kernels)}] tuning {kernel.name} ({trials} trials)")
        res = tune_kernel(kernel, preset, trials, **kwargs)
        if progress:
            progress(
                f"    default {_fmt(res.default_ms)} ms, tuned {_fmt(res.tuned_ms)} ms -> "
                f"{'KEEP' if res.kept else 'drop'} ({res.note}, {res.seconds:.0f} s)"
            )
        results.append(res)
    return results


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_results(results: list[KernelResult]) -> str:
    rows = [("kernel", "dec", "pre", "trials", "default ms", "tuned ms", "speedup", "kept", "note")]
    for r in results:
        rows.append(
            (
                r.name,
                str(r.decode_calls),
                str(r.prefill_calls),
                str(r.trials),
                _fmt(r.default_ms),
                _fmt(r.tuned_ms),
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                "yes" if r.kept else "no",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def tune_model(
    cfg,
    quantization: str,
    preset: Preset,
    trials: int,
    *,
    kernels: int = 3,
    rpc: RPCTarget | None = None,
    schedules_root=None,
    prefill_len: int = 128,
    progress: Callable[[str], None] | None = None,
    **kwargs,
) -> tuple[list, list[KernelResult]]:
    """Extract the model's kernels, tune the `kernels` most important tunable ones, write the records.

    Returns (all extracted kernels, tuning results)."""
    from ..compile.tuned_records import device_fingerprint
    from .extract import extract_kernels, format_table, lower_model
    from .records import write_records

    lowered = lower_model(cfg, quantization, preset)
    extracted = extract_kernels(lowered, preset, prefill_len)
    if progress:
        progress(format_table(extracted))
    chosen = [k for k in extracted if k.tunable][:kernels]
    results = tune_kernels(chosen, preset, trials, progress=progress, rpc=rpc, **kwargs)
    write_records(preset, results, device_fingerprint(preset, rpc.key if rpc else None), schedules_root)
    return extracted, results
