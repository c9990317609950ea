"""Run every GPU kernel of a scheduled module through a GPU API available here and compare with llvm.

The reference is the llvm build of the same PrimFunc *before* GPU scheduling, so the check covers the schedule
(thread layout, shared memory, reductions, dequant inlining) and the GPU code generator, not the model maths.
Runnable backends here: WGSL on wgpu/lavapipe ("webgpu") and OpenCL C on PoCL ("opencl", fp32 only).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import tirx
from tvm.target import Target

from ..compile.gpu_schedule import has_thread_binding
from ..compile.kernel_info import NO_CSE, FuncInfo, describe, with_global_symbols

# Error metric: max|gpu - ref| / max|ref|. The two builds differ only in evaluation order (split/tree
# reductions vs a serial loop) and dequant rounding points. A reduction of n terms re-ordered changes the
# result
# by about sqrt(n) * eps * max|terms|: fp32 eps 6e-8, n <= 16384 -> 8e-6, so 1e-4 leaves a 12x margin;
# fp16 eps 4.9e-4, n <= 512 in the tested kernels -> 1.1e-2, so 2e-2 leaves about 2x.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
# Other integer inputs (e.g. a 0/1 table selector such as rope_long) are zero: any value > 0 may index out of
# bounds, which reads garbage on every backend and can crash the llvm reference.
_POSITION_LIKE = re.compile(r"(^|_)(pos|position|positions|position_map|ids|token_ids)$")
# fp16 quantization scales and mins (q_scale / q_min params, or their bits as uint16): drawn small, so
# that a GGUF K-quant's d * sc (sc up to 255 for random bytes) * q (up to 63), summed over a row, stays
# inside fp16's range; standard normal ones overflow to inf there and leave no finite output to compare
_QUANT_SCALE = re.compile(r"q_(scale|min)\d*$")
QUANT_SCALE_STD = 2.0**-8
DEFAULT_SHAPE_VALUE = 7  # odd and not a multiple of any tile size, so boundary handling is exercised
RUN_TARGETS = {
    # 32 KB workgroup memory and 256 invocations are what lavapipe offers (wgpu limits) and what presets use
    "webgpu": {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 32768},
    "opencl": {"kind": "opencl", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768},
}


@dataclass
class KernelCheck:
    func: str
    kernels: list[str]
    backend: str
    status: str  # "ok" | "mismatch" | "not-run" | "error"
    error: float | None = None
    tolerance: float | None = None
    note: str = ""
    shape_values: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def random_scales(shape, rng: np.random.Generator) -> np.ndarray:
    """fp16 quantization scales / mins (about 1% of them fp16 subnormals, at this spread)."""
    return (rng.standard_normal(shape) * QUANT_SCALE_STD).astype(np.float16)


def random_inputs(
    info: FuncInfo, shape_values: dict[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random floats and packed weights; position-like index vectors get 0..n-1, other integers zero."""
    arrays = {}
    for p in info.params:
        if p.shape is None:  # scalar parameter: 1 is valid for the flags and small ids the model passes
            arrays[p.name] = np.array(1, dtype=p.dtype)
            continue
        shape = p.concrete_shape(shape_values)
        if p.dtype == "uint16" and _QUANT_SCALE.search(p.name):  # fp16 scale bits (fp32 gguf schemes)
            arrays[p.name] = random_scales(shape, rng).view(np.uint16)
        elif p.dtype == "uint32":  # packed q4 weights: every bit pattern is a valid set of nibbles
            arrays[p.name] = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
        elif p.dtype.startswith(("int", "uint")) and len(shape) == 1 and _POSITION_LIKE.search(p.name):
            # token ids / positions / KV position maps: distinct small values, so scatters never write a slot
            # twice (a race on a GPU) and gathers stay in bounds at the small test shapes
            arrays[p.name] = np.arange(shape[0]).astype(p.dtype)
        elif p.dtype.startswith(("int", "uint", "bool")):
            arrays[p.name] = np.zeros(shape, dtype=p.dtype)
        elif p.dtype == "float16" and _QUANT_SCALE.search(p.name):
            arrays[p.name] = random_scales(shape, rng)
        else:
            arrays[p.name] = rng.standard_normal(shape).astype(p.dtype)
    return arrays


def run_reference(
    func: tirx.PrimFunc, info: FuncInfo, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the unscheduled PrimFunc built for llvm on copies of `arrays`; returns every buffer afterwards."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main").without_attr("target")})
    with tvm.transform.PassContext(config=NO_CSE):
        lib = tvm.compile(mod, target=Target("llvm"))
    dev = tvm.cpu()
    args = [
        arrays[p.name].item() if p.shape is None else tvm.runtime.tensor(arrays[p.name].copy(), dev)
        for p in info.params
    ]
    lib["main"](*args)
    return {
        p.name: arrays[p.name] if p.shape is None else a.numpy()
        for p, a in zip(info.params, args, strict=True)
    }


def build_runner(scheduled: tvm.IRModule, backend: str, run_target: Target):
    """Generate the kernels for `run_target` and wrap them in the backend's launcher."""
    with tvm.transform.PassContext(config=NO_CSE):
        built = tvm.compile(scheduled, target=Target(run_target, Target("llvm")))
    device_mods = [m for m in built.mod.imports if m.kind != "llvm"]
    if not device_mods:
        return None
    source = device_mods[0].inspect_source()
    if backend == "webgpu":
        from .wgsl_runner import WGSLRunner, split_wgsl_source

        return WGSLRunner(split_wgsl_source(source))
    if backend == "opencl":
        from .opencl_runner import OpenCLRunner

        return OpenCLRunner(source)
    raise ValueError(f"no runner for backend {backend}")


def retarget(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Drop per-function targets so a module scheduled for one GPU (e.g. metal) is built for another."""
    funcs = {}
    for gv, f in with_global_symbols(mod).functions_items():
        funcs[gv] = f.without_attr("target") if f.attrs and "target" in f.attrs else f
    return tvm.IRModule(funcs)


def verify_kernels(
    unscheduled: tvm.IRModule,
    scheduled: tvm.IRModule,
    backend: str,
    run_target: Target | None = None,
    shape_values: dict[str, int] | None = None,
    seed: int = 0,
    skip: dict[str, str] | None = None,
) -> list[KernelCheck]:
    """Compare every scheduled PrimFunc run on `backend` with the llvm build of its unscheduled version."""
    run_target = run_target or Target(RUN_TARGETS[backend])
    scheduled = retarget(scheduled, run_target)
    skip = dict(skip or {})
    for gv, f in unscheduled.functions_items():
        if isinstance(f, tirx.PrimFunc) and has_thread_binding(f):
            # e.g. the paged KV-cache kernels TVM ships pre-scheduled: no unscheduled version to compare with
            skip[gv.name_hint] = "scheduled before the GPU schedule step (no unscheduled llvm reference)"
    not_runnable = _not_runnable(scheduled, backend)
    skip.update(not_runnable)
    runnable = tvm.IRModule({gv: f for gv, f in scheduled.functions_items() if gv.name_hint not in skip})
    skip = {k: v for k, v in skip.items() if k in {gv.name_hint for gv in scheduled.get_global_vars()}}
    infos = describe(runnable, run_target) if runnable.functions else {}
    runner = build_runner(runnable, backend, run_target) if infos else None
    rng = np.random.default_rng(seed)
    checks = [KernelCheck(name, [], backend, "not-run", note=why) for name, why in sorted(skip.items())]
    for name, info in sorted(infos.items()):
        values = {v: (shape_values or {}).get(v, DEFAULT_SHAPE_VALUE) for v in info.shape_vars}
        values.update({v: 0 for v in info.offset_vars})
        check = KernelCheck(name, [k.name for k in info.kernels], backend, "error", shape_values=values)
        start = time.perf_counter()
        try:
            inputs = random_inputs(info, values, rng)
            values.update({p.name: int(inputs[p.name]) for p in info.params if p.shape is None})
            expected = run_reference(unscheduled[name], info, inputs)
            actual = {k: v.copy() for k, v in inputs.items()}
            for launch in info.kernels:
                runner.launch(launch, actual, values)
            outputs = [p.name for p in info.params if not np.array_equal(expected[p.name], inputs[p.name])]
            check.error, check.tolerance, check.note = _compare(outputs, expected, actual)
            check.status = "ok" if check.error <= check.tolerance else "mismatch"
            if not outputs:  # nothing to compare would make "ok" meaningless
                check.status, check.note = "error", "the reference wrote no buffer"
            else:
                check.note += f"; outputs {', '.join(outputs)}"
        except Exception as e:  # a broken kernel is a finding to report, not a reason to stop checking others
            check.note = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        check.seconds = round(time.perf_counter() - start, 3)
        checks.append(check)
    return checks


def _compare(outputs: list[str], expected: dict, actual: dict) -> tuple[float, float, str]:
    """(error, tolerance, note) of the output buffer that is furthest from its tolerance."""
    worst = (-1.0, 0.0, 0.0, "")  # (error / tolerance, error, tolerance, buffer)
    for name in outputs:
        ref, got = expected[name], actual[name]
        if ref.dtype.kind == "f" and ref.size:
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            tol = TOLERANCE.get(str(ref.dtype), 1e-4)
            finite = np.isfinite(ref64)
            # a NaN/inf pattern that differs, or a reference with nothing finite to compare, is a failure:
            # a NaN difference would otherwise never become the worst error and read as a pass
            if not finite.any() or not np.array_equal(finite, np.isfinite(got64)):
                err = float("inf")
            else:
                r, g = ref64[finite], got64[finite]
                err = float(np.abs(g - r).max() / max(float(np.abs(r).max()), 1e-30))
        else:
            tol, err = 0.0, (0.0 if np.array_equal(ref, got) else float("inf"))
        ratio = err / tol if tol else (0.0 if err == 0 else float("inf"))
        if ratio > worst[0]:
            worst = (ratio, err, tol, name)
    return worst[1], worst[2], f"worst buffer {worst[3]}"


def _not_runnable(mod: tvm.IRModule, backend: str) -> dict[str, str]:
    """Kernels that cannot be lowered for `backend` here, with the reason (reported, never silently
    dropped)."""
    reasons = {}
    for gv, f in mod.functions_items():
        text = f.script()
        if "simdgroup" in text:
            reasons[gv.name_hint] = (
                "uses Metal simdgroup matrix intrinsics: no WGSL/OpenCL lowering; MSL parse only"
            )
        elif "mma_sync" in text or "ptx_mma" in text or "wmma" in text:
            reasons[gv.name_hint] = "uses CUDA tensor-core intrinsics: nvcc compile only"
        elif backend == "opencl" and "float16" in text:
            from .opencl_runner import fp16_supported

            if not fp16_supported():
                reasons[gv.name_hint] = "fp16 kernel: this OpenCL device has no cl_khr_fp16 (PoCL)"
    return reasons


# -- whole compiled models --------------------------------------------------------------------------------
@dataclass
class ModelReport:
    preset: str
    quantization: str
    backend: str
    checks: list[KernelCheck] = field(default_factory=list)
    msl_ok: bool | None = None
    msl_diagnostics: str = ""
    cuda: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> int:
        """How many kernels a check actually covered (run and matched, or compiled by nvcc)."""
        ran = sum(c.status == "ok" for c in self.checks)
        return ran + sum(r["compiled"] for r in self.cuda) + (1 if self.msl_ok else 0)

    @property
    def ok(self) -> bool:
        bad = [c for c in self.checks if c.status in ("mismatch", "error")]
        cuda_bad = [c for c in self.cuda if c["missing"] or c.get("error")]
        # "OK" for a build where nothing ran would be a silent pass: nothing verified is a failure
        return not bad and not cuda_bad and self.msl_ok is not False and self.verified > 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.checks:
            out[c.status] = out.get(c.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "quantization": self.quantization,
            "backend": self.backend,
            "ok": self.ok,
            "verified": self.verified,
            "counts": self.counts(),
            "checks": [c.to_dict() for c in self.checks],
            "msl_ok": self.msl_ok,
            "msl_diagnostics": self.msl_diagnostics,
            "cuda": self.cuda,
            "notes": self.notes,
        }


def lowered_and_scheduled(cfg, quantization: str, preset, dtype: str | None = None):
    """(unscheduled TIR module, scheduled TIR module) of the model graph for a preset, as `phi3 compile`
    makes."""
    from ..compile import pipeline
    from ..compile.compile_model import graph_options, schedule_fn

    target = preset.target
    mod, _params = pipeline.export_model(cfg, graph_options(quantization, preset, dtype), target)
    lowered = pipeline.lower_to_tir(mod, target)
    with target:
        scheduled = schedule_fn(preset)(lowered)
    prim = lambda m: tvm.IRModule({gv: f for gv, f in m.functions_items() if isinstance(f, tirx.PrimFunc)})  # noqa: E731
    return prim(lowered), prim(scheduled)


def backend_for(preset) -> str | None:
    """Where this machine can run the preset's kernels: WGSL for webgpu and Metal, OpenCL for OpenCL
    presets."""
    return {"webgpu": "webgpu", "metal": "webgpu", "opencl": "opencl", "vulkan": "webgpu"}.get(preset.kind)


def runtime_backend(preset) -> str | None:
    """The TVM runtime plugin that runs this preset's library here (vulkan / opencl with an x86-64 host and
    the plugin built), else None: then our own launchers check the kernels."""
    import platform

    from ..runtime.plugins import load_plugins

    host = (preset.host_triple or "").split("-")[0]
    if preset.kind not in ("vulkan", "opencl") or host != platform.machine():
        return None
    if preset.kind not in load_plugins((preset.kind,)):
        return None
    dev = tvm.vulkan(0) if preset.kind == "vulkan" else tvm.opencl(0)
    return preset.kind if dev.exist else None


def verify_model(out_dir, seed: int = 0, shape_values: dict[str, int] | None = None) -> ModelReport:
    """Verify every kernel of the model in `out_dir` (written by `phi3 compile`) on the GPU API at hand."""
    from ..compile.artifacts import verify_manifest
    from ..config import Phi3Config
    from ..errors import UserError
    from ..targets import load_preset

    manifest = verify_manifest(out_dir)
    library = manifest.get("library")
    if not library or not (Path(out_dir) / library).is_file():
        raise UserError(f"library {library or '(none in the manifest)'} is missing", out_dir)
    preset = load_preset(manifest["preset"])
    cfg = Phi3Config.from_dict(manifest["model_config"])
    quantization = manifest["quantization"]
    unscheduled, scheduled = lowered_and_scheduled(cfg, quantization, preset, manifest.get("dtype"))
    backend = backend_for(preset)
    runtime = runtime_backend(preset)
    if runtime is not None:
        # TVM's own runtime is here: every kernel (TVM's paged-attention ones too) launched as it launches
        # them, on the inputs the host-exact build's kernels received
        from .runtime_check import verify_with_runtime

        report = ModelReport(preset.name, quantization, f"{runtime} (TVM runtime plugin)")
        report.checks = verify_with_runtime(
            cfg,
            quantization,
            preset,
            manifest.get("dtype"),
            unscheduled,
            scheduled,
            Path(out_dir) / library,
            seed=seed,
        )
        return report
    report = ModelReport(preset.name, quantization, backend or "none")
    if backend is not None:
        report.checks = verify_kernels(unscheduled, scheduled, backend, shape_values=shape_values, seed=seed)
        if preset.kind in ("metal", "vulkan"):
            report.notes.append(
                f"{preset.kind} schedule executed as WGSL on {backend}: same TIR schedule and thread "
                "layout, different code generator"
            )
    if preset.kind == "metal":
        from .metal_check import check_msl

        with tvm.transform.PassContext(config=NO_CSE):
            built = tvm.compile(scheduled, target=preset.target)
        msl = next(m for m in built.mod.imports if m.kind != "llvm").inspect_source()
        result = check_msl(msl)
        report.msl_ok, report.msl_diagnostics = result.ok, result.diagnostics
    if preset.kind == "cuda":
        from .cuda_check import compile_kernels

        try:
            built = tvm.compile(scheduled, target=preset.target)
            source = next(m for m in built.mod.imports if m.kind == "cuda").inspect_source()
            r = compile_kernels(source, preset)
        except Exception as e:  # e.g. a TVM InternalError generating CUDA: a finding, reported on one line
            msg = f"{type(e).__name__}: {e}".strip().splitlines()
            report.cuda.append(
                {"arch": preset.name, "kernels": 0, "compiled": 0, "missing": [], "error": msg[0][:300]}
            )
        else:
            report.cuda.append(
                {
                    "arch": r.arch,
                    "kernels": len(r.kernels),
                    "compiled": len(r.compiled),
                    "compiled_kernels": list(r.compiled),
                    "missing": r.missing,
                    "seconds": r.seconds,
                }
            )
            report.notes.append("CUDA: compile-only here (no GPU); every kernel compiled to SASS by ptxas")
    if backend is None and preset.kind != "cuda":
        report.notes.append(f"no runnable backend for {preset.kind} here")
    return report
