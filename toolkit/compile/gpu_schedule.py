"""GPU scheduling for a device preset: tuned records first, then dlight rules; and a guard for unscheduled
kernels.

A GPU build without schedules "succeeds" but silently compiles every unscheduled PrimFunc as host code, which
crashes on the device (shared/notes/tvm-0.27-facts.md 3). `check_thread_bindings` turns that into an error.
"""

from __future__ import annotations

import inspect
import linecache
import sys

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import dlight as dl

from ..errors import UserError
from ..targets import Preset


def has_thread_binding(func: tirx.PrimFunc) -> bool:
    """Whether `func` binds a GPU thread: a thread-bound loop (`T.thread_binding`) or a `thread_extent`
    attribute (`T.launch_thread` / `T.env_thread`), found by walking its IR."""

    def bound(node):
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.THREAD_BINDING:
            return tvm_ffi.VisitInterrupt()
        if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent":
            return tvm_ffi.VisitInterrupt()
        return None

    return tvm_ffi.structural_walk(func.body, ((tirx.For, tirx.AttrStmt), bound), order="pre") is not None


def _declining(rule):
    """`rule`, returning None (declined: the next rule tries) where dlight's access analysis asserts instead
    of declining: the GGUF K-quant dequantize reads a multi-element region per output, which reached GEMV
    and Reduction once decode's row count became static on GPU presets."""
    inner = rule.apply

    def apply(func, target, tunable):
        try:
            return inner(func, target, tunable)
        except AssertionError:
            return None

    rule.apply = apply
    return rule


def dlight_rules(preset: Preset) -> list:
    """The preset's dlight rule objects, in its order, with the parameters dlight exposes set from the
    preset."""
    factories = {
        "Matmul": lambda: _matmul_rule(preset),
        "GEMV": dl.gpu.GEMV,
        "LowBatchGEMV": lambda: dl.gpu.LowBatchGEMV(bucket=preset.low_batch_gemv_bucket),
        "Reduction": dl.gpu.Reduction,
        "GeneralReduction": dl.gpu.GeneralReduction,
        "RMSNorm": dl.gpu.RMSNorm,
        "Transpose": dl.gpu.Transpose,
        "Fallback": dl.gpu.Fallback,
    }
    return [_declining(factories[name]()) for name in preset.dlight_rules]


def _matmul_rule(preset: Preset):
    if not preset.matmul_config:
        return dl.gpu.Matmul()
    config = dl.gpu.Matmul.Config(**preset.matmul_config)

    class PresetMatmul(dl.gpu.Matmul):
        """dlight Matmul with the SIMT tile configuration from the preset (tensor-core paths unchanged)."""

        def get_configs(self, target):  # noqa: ARG002 - same signature as dlight's
            return config

    return PresetMatmul()


def gpu_schedule_pass(preset: Preset) -> tvm.transform.Pass:
    """Module pass scheduling every PrimFunc for `preset` with its dlight rules. Kernels already marked
    `tirx.is_scheduled` (tuned records, applied before: compile/tuned_records.py) keep their schedule."""
    if not preset.is_gpu:
        raise ValueError(f"preset {preset.name} is not a GPU preset (kind {preset.kind})")
    from .low_batch_gemv import low_batch_dispatch

    rules = dlight_rules(preset)
    if preset.kind in ("metal", "cuda") and "Matmul" in preset.dlight_rules:
        import_tensor_intrinsics()
    target = preset.target
    dispatch = None
    if preset.low_batch_gemv:  # matmuls over a symbolic batch: GEMV schedules for small batches first
        large = [r for r, name in zip(rules, preset.dlight_rules, strict=True) if name != "LowBatchGEMV"]
        dispatch = low_batch_dispatch(preset.low_batch_gemv, large)

    @tvm.transform.module_pass(opt_level=0, name="GPUSchedule")
    def _schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            # dlight assigns into the module it is given (mod[gv] = ...), which would also rewrite the
            # caller's unscheduled module (the verification reference): work on a copy
            mod = mod.clone()
            if dispatch is not None:
                mod = dispatch(mod)
            return dl.ApplyDefaultSchedule(*rules)(mod)

    return _schedule


def unbound_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of PrimFuncs meant for the device that have no GPU thread binding (they would run as host
    code)."""
    missing = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_host_func(func):
            continue
        if not has_thread_binding(func):
            missing.append(gvar.name_hint)
    return sorted(missing)


def check_thread_bindings(mod: tvm.IRModule) -> None:
    """Raise UserError naming every device kernel left without thread bindings after scheduling."""
    missing = unbound_kernels(mod)
    if missing:
        raise UserError(
            f"{len(missing)} GPU kernel(s) have no thread bindings after scheduling and would run as host "
            f"code on the device: {', '.join(missing)}. "
            "Add a schedule rule (dlight Fallback) or a tuned record."
        )


def _is_host_func(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs or {}
    if "tirx.is_host_func" in attrs and int(attrs["tirx.is_host_func"]):
        return True
    target = attrs.get("target") if attrs else None
    return target is not None and target.kind.name in ("llvm", "c")


def import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (dlight Matmul does on metal/cuda) without its inspect.stack() cost.

    The module parses ~250 TVMScript functions at import; each parse calls inspect.stack(), which looks up the
    module of every frame by scanning sys.modules: about half of a 70 s import on this machine. TVMScript only
    reads frame objects and the source line of frames[2], so a stack with just those lines is equivalent.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack

    def light_stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno) if context else ""
            frames.append(
                inspect.FrameInfo(
                    frame,
                    code.co_filename,
                    frame.f_lineno,
                    code.co_name,
                    [line] if line else None,
                    0 if line else None,
                )
            )
            frame = frame.f_back
        return frames

    inspect.stack = light_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401 - registers the tensor intrinsics
    finally:
        inspect.stack = original
