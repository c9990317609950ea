"""Compile a Phi-3 config for a device preset: graph -> our pipeline -> a library file + manifest.

Compiling needs no weights. The library's parameter order is recorded in the manifest ("params"), which the
runtime uses to hand weights to the VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import IRModule
from tvm.s_tir import dlight as dl

from .. import __version__, interrupts
from ..config import Phi3Config
from ..errors import UserError
from ..locks import output_lock
from ..model.phi3 import GraphOptions
from ..outputs import check_output_dir
from ..paths import cache_root
from ..quantization import get_scheme
from ..targets import Preset, load_preset
from . import pipeline
from .artifacts import (
    MANIFEST,
    check_object_format,
    export_library,
    kernel_launch_table,
    verify_manifest,
    vm_function_table,
    write_manifest,
)
from .attach_cuda_graph import with_capture_hints
from .attach_decode_sample import attach_decode_sample
from .attach_metadata import Limits, attach_metadata, memory_usage, model_metadata, variable_bounds
from .cpu_isa import host_kernel_isas
from .gpu_attention import swapped
from .knobs import knobs_for

LIB_NAME = "model"  # model.so / model.tar / model.dylib


def graph_options(quantization: str, preset: Preset, dtype: str | None = None) -> GraphOptions:
    """Activations follow the scheme's model dtype, except on the host CPU: LLVM has no fast fp16 path on
    x86 (measured 2.3x slower, shared/notes/tvm-0.27-facts.md 5), so the host computes in fp32 and only
    the stored scales stay fp16."""
    scheme = get_scheme(quantization)
    if dtype is None:
        dtype = "float32" if preset.kind == "llvm" else scheme.model_dtype
    return GraphOptions(
        quantization=scheme.name,
        dtype=dtype,
        kv_dtype=preset.kv_cache_dtype,
        static_decode=preset.is_gpu,
        cache_rope=preset.is_gpu,
        gpu_decode_attention=preset.decode_attention == "ours",
    )


def schedule_rules(preset: Preset) -> list:
    """The rules a preset's kernels are scheduled by (dlight on GPUs, ours on the CPU, with this machine's
    knobs): what `compile` applies and the baseline `phi3 tune` measures against."""
    if preset.is_gpu:
        from .gpu_schedule import dlight_rules

        return dlight_rules(preset)
    from .cpu_schedule import cpu_schedule_rules

    return cpu_schedule_rules(preset.target, preset.q4_activations, knobs_for(preset))


def schedule_fn(preset: Preset):
    """The scheduling step of the pipeline for a preset: this device's tuned records from schedules/<preset>/
    first (when its TVM version made them), then `schedule_rules`."""
    from .tuned_records import apply_tuned_records

    if preset.is_gpu:
        from .gpu_schedule import check_thread_bindings, gpu_schedule_pass

        def gpu(mod: IRModule) -> IRModule:
            mod = gpu_schedule_pass(preset)(apply_tuned_records(mod, preset))
            check_thread_bindings(mod)
            return mod

        return gpu
    rules = schedule_rules(preset)
    return lambda mod: dl.ApplyDefaultSchedule(*rules)(apply_tuned_records(mod, preset))


@dataclass
class CompiledModel:
    folder: Path
    manifest: dict[str, Any]

    @property
    def library(self) -> Path:
        return self.folder / self.manifest["library"]

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["params"]]


def system_lib_prefix(cfg: Phi3Config, quantization: str) -> str:
    """MLC's default prefix for a static library (`{model_type}_{quantization}_`, '-' as '_'): an app's
    `model_lib` "phi3_q4f16_1" loads it as `system://phi3_q4f16_1`."""
    return f"{cfg.source_arch}_{quantization}_".replace("-", "_")


def compile_model(
    cfg: Phi3Config, quantization: str, preset: Preset | str, out_dir: str | Path, **options: Any
) -> CompiledModel:
    """Build the library into `out_dir` (see `_build_library` for `options`): never over a folder that is not
    an earlier compile output, one writer at a time, no partial folder left when the build fails."""
    out_dir = check_compile_output(out_dir)
    with output_lock(out_dir):  # one writer at a time; it also clears temp folders of dead runs
        check_compile_output(out_dir)  # what the writer before us left must still be ours to replace
        try:
            return _build_library(cfg, quantization, preset, out_dir, **options)
        finally:
            shutil.rmtree(_temp_dir(out_dir), ignore_errors=True)  # gone once renamed; a failure's leftovers


def _temp_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")


def _build_library(
    cfg: Phi3Config,
    quantization: str,
    preset: Preset | str,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    limits: Limits | None = None,
    lib_prefix: str | None = None,
    cuda_graph: bool = False,
    kernel_timeline: bool = False,
    gpu_sampler: bool | None = None,
) -> CompiledModel:
    """Build the library into `out_dir` (written to a temp folder, renamed when complete).

    `dtype` overrides the activation dtype (default: see `graph_options`); `limits` the sizes recorded in
    `_metadata` (default: MLC's); `lib_prefix` a static library's symbol prefix (default: MLC's);
    `cuda_graph` (CUDA presets) captures the forward functions as CUDA graphs (attach_cuda_graph.py);
    `kernel_timeline` ticks after every kernel call, for measurement only (kernel_timeline.py);
    `gpu_sampler` overrides which targets get the sampler functions (default: GPU presets; True on the host
    lets tests run the engine's device-sampling path there)."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    opts = graph_options(quantization, preset, dtype)
    target = preset.target
    out_dir = Path(out_dir)
    tmp = _temp_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if preset.kind == "vulkan":
        from ..backends import vulkan  # noqa: F401  (registers target.build.vulkan, which the wheel lacks)
    t0 = time.time()
    knobs = knobs_for(preset) if preset.kind == "llvm" else None
    mod, named_params = pipeline.export_model(cfg, opts, target, knobs)
    ours_attention = swapped(mod)
    limits = limits or Limits.default(cfg)
    from .attach_sampling import attach_sampling_functions  # MLC engine's sampling/logit functions

    mod = attach_sampling_functions(
        mod,
        target,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        dtype=opts.dtype,
        prefill_chunk_size=limits.prefill_chunk_size,
        gpu_sampler=gpu_sampler,
    )
    prefix = system_lib_prefix(cfg, opts.quantization) if lib_prefix is None else lib_prefix
    metadata = model_metadata(cfg, opts.quantization, limits, named_params)

    if cuda_graph and preset.kind != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA preset, not {preset.name}")

    def with_metadata(scheduled: IRModule) -> IRModule:
        metadata["memory_usage"] = memory_usage(scheduled, target, limits)
        out = attach_decode_sample(attach_metadata(scheduled, metadata))
        return with_capture_hints(out, variable_bounds(limits)) if cuda_graph else out

    try:
        ex, scheduled = pipeline.build(
            mod,
            target,
            schedule_fn(preset),
            system_lib=preset.system_lib,
            system_lib_prefix=prefix,
            attach=with_metadata,
            cuda_graph=cuda_graph,
            timeline=kernel_timeline,
        )
    except RuntimeError as e:  # TVM's errors, and ours from inside its codegen callbacks, arrive as these
        if interrupts.interrupted(e):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(
            f"compiling for {preset.name} failed in code generation (a toolkit bug; please report it): "
            f"{first[:300]}"
        ) from e
    lib_file = LIB_NAME + preset.output
    notes = export_library(ex, tmp / lib_file, preset)
    check_object_format(tmp / lib_file, preset)  # real object code for the preset's triple
    kernels = kernel_launch_table(scheduled, target) if preset.is_gpu else []
    extra = {
        "toolkit_version": __version__,
        "dtype": opts.dtype,
        "kv_cache_dtype": opts.cache_dtype,
        "library": lib_file,
        "params": [
            {"name": n, "shape": [int(x) for x in p.shape], "dtype": p.dtype} for n, p in named_params
        ],
        "compile_seconds": round(time.time() - t0, 2),
        "system_lib_prefix": prefix if preset.system_lib else None,
        "vm_functions": vm_function_table(ex),
        "mlc_metadata": metadata,
        "limits": {
            "context_window_size": limits.context_window_size,
            "prefill_chunk_size": limits.prefill_chunk_size,
            "max_batch_size": limits.max_batch_size,
        },
        "build": notes,
        "cpu_isa": None if preset.is_gpu else host_kernel_isas(preset.target, preset.q4_activations),
        "cuda_graph": cuda_graph,
        "kernel_timeline": kernel_timeline,
        # whose paged decode attention kernel the library runs (compile/gpu_attention.py)
        "decode_attention": None if not preset.is_gpu else "ours" if ours_attention else "tvm",
        "cpu_knobs": None if knobs is None else {"source": knobs.source, "values": knobs.values},
    }
    manifest = write_manifest(tmp, preset, opts.quantization, cfg, kernels, extra=extra)
    replace_dir(tmp, out_dir)
    return CompiledModel(out_dir, manifest)


def _owned_by_compile(out_dir: Path) -> list[str]:
    """Names a `phi3 compile` output may hold: the library and what its manifest lists."""
    names = [f"{LIB_NAME}.*", f".{MANIFEST}.tmp"]
    try:
        files = json.loads((out_dir / MANIFEST).read_text()).get("files", {})
        names += sorted({Path(rel).parts[0] for rel in files})
    except (OSError, ValueError, AttributeError):
        pass  # a damaged manifest: only the library name counts as ours
    return names


def check_compile_output(out_dir: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output folder that holds anything but an earlier compile output, or overlaps an input."""
    out_dir = Path(out_dir).expanduser()
    return check_output_dir(
        out_dir,
        inputs=inputs,
        marker=MANIFEST,
        owned=_owned_by_compile(out_dir),
        what="a `phi3 compile` output",
    )


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap a finished temp folder in for `out_dir` (an earlier output of ours, already checked)."""
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def load_compiled(folder: str | Path) -> CompiledModel:
    """A folder written by `compile_model`, its files checked against the manifest's sha256."""
    folder = Path(folder)
    manifest = verify_manifest(folder)
    if "library" not in manifest or "params" not in manifest:
        raise UserError("manifest has no library/params: not a model library folder", folder)
    return CompiledModel(folder, manifest)


# -- JIT cache (under `paths.cache_root()`) -------------------------------------------------------------
def cache_key(cfg: Phi3Config, quantization: str, preset: Preset) -> str:
    """Key a compiled library by model config, quantization, device target and toolkit/TVM versions."""
    blob = json.dumps(
        [
            cfg.to_dict(),
            quantization,
            preset.target_dict,
            preset.name,
            preset.q4_activations,
            preset.kv_cache_dtype,
            knobs_for(preset).digest() if preset.kind == "llvm" else None,
            __version__,
            tvm.__version__,
            _toolkit_source_hash(),
            _records_hash(preset),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def hashed_sources() -> list[Path]:
    """The sources a library is built from: graph, quantization, compile passes and the code generators we
    own (the Vulkan backend), so that a change to any of them never reuses a stale library."""
    root = Path(__file__).resolve().parent.parent
    subs = ("model", "compile", "quantization", "backends")
    return [f for sub in subs for f in sorted((root / sub).rglob("*.py"))]


def _toolkit_source_hash() -> str:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for f in hashed_sources():
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _records_hash(preset: Preset) -> str:
    """Hash of the tuned MetaSchedule records that `compile` applies for this machine: new records mean a
    new library."""
    from .tuned_records import active_records

    h = hashlib.sha256()
    found = active_records(preset)
    for f in sorted(found[0].glob("*.json")) if found else []:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def library_folder(cfg: Phi3Config, quantization: str, preset: Preset) -> Path:
    """Where `compiled_for` keeps the library for (config, quantization, preset)."""
    return cache_root() / "lib" / cache_key(cfg, quantization, preset)


def is_compiled(cfg: Phi3Config, quantization: str, preset: Preset) -> bool:
    """Whether `compiled_for` will find the library in the cache (if undamaged) rather than compile it."""
    return library_folder(cfg, quantization, preset).is_dir()


def compiled_for(cfg: Phi3Config, quantization: str, preset: Preset | str) -> CompiledModel:
    """The cached library for (config, quantization, preset), compiled on first use."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    folder = library_folder(cfg, quantization, preset)
    with output_lock(folder):  # a second process waits, then finds the library built
        if folder.exists():
            try:
                return _load_cached(folder)
            except UserError as e:
                # the cache is ours: a truncated library or a bad manifest is rebuilt, not a dead end
                print(f"notice: cached library {folder} is damaged ({e}); rebuilding it", file=sys.stderr)
                shutil.rmtree(folder)
        return compile_model(cfg, quantization, preset, folder)


def _load_cached(folder: Path) -> CompiledModel:
    compiled = load_compiled(folder)
    if not compiled.library.is_file():
        raise UserError("library file missing", compiled.library)
    return compiled
