"""`phi3 package`: compile, archive and bundle every model of a spec into MLC-LLM's `dist/` layout.

    dist/lib/libmodel_{iphone,android}.a   all models' objects (members `<model_lib>-<object>`)
    dist/bundle/mlc-app-config.json         model_list: model_id, model_lib, model_path | model_url,
                                            estimated_vram_bytes (MLC's app-config shape)
    dist/bundle/<model_id>/                 weights + mlc-chat-config.json + tokenizer, for bundled models
    dist/phi3-package.json                  what was packaged from what (marks the folder as ours)

Names and shapes follow MLC-LLM's package step (python/mlc_llm/interface/package.py at mlc-ai/mlc-llm
79d603f085f50500e9509fa01785ffa7ecfaaa93); MLC's own later step, building the app bindings from its source
tree, is not part of this. Everything is written into `<dist>.tmp-<pid>` and swapped in when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint.mlc_format import CHAT_CONFIG, read_chat_config, write_chat_config
from ..compile.artifacts import MANIFEST, expected_format
from ..compile.compile_model import CompiledModel, cache_key, compile_model, load_compiled
from ..convert.converter import convert
from ..locks import clean_stale_temps, output_lock
from ..outputs import check_output_dir
from ..paths import cache_root
from .plan import ModelPlan, model_path_label, plan_all
from .spec import PackageSpec
from .staticlib import check_archive, create_archive, extract_objects, find_tool

MLC_LLM_COMMIT = "79d603f085f50500e9509fa01785ffa7ecfaaa93"
PACKAGE_MANIFEST = "phi3-package.json"
APP_CONFIG = "mlc-app-config.json"
ARCHIVE_NAMES = {"iphone": "libmodel_iphone.a", "android": "libmodel_android.a"}  # MLC's fixed names


@dataclass
class PackageResult:
    out_dir: Path
    archive: Path
    app_config: dict[str, Any]
    manifest: dict[str, Any]


def check_package_output(out_dir: Path, inputs) -> None:
    """The shared output rule (toolkit/outputs.py): only an empty folder or an earlier package output, holding
    nothing the user added, is replaced; never an input."""
    check_output_dir(
        out_dir,
        inputs=inputs,
        marker=PACKAGE_MANIFEST,
        owned=("lib", "bundle"),
        what="a `phi3 package` output",
    )


def compiled_library(plan: ModelPlan, spec: PackageSpec, log: Callable[[str], None] = print) -> CompiledModel:
    """The model's static library, from the toolkit cache when an identical build exists (rebuilding an app
    package usually changes one model, not all)."""
    cfg = plan.source.config
    key = f"{cache_key(cfg, plan.quantization, spec.preset)}-{plan.library_key}-{plan.system_lib_prefix}"
    folder = cache_root() / "package-lib" / key
    if (folder / MANIFEST).is_file():
        log(f"cached library {plan.model_lib} ({folder})")
        return load_compiled(folder)
    log(f"compile {plan.model_lib} ({spec.preset.name}, {plan.quantization})")
    return compile_model(
        cfg, plan.quantization, spec.preset, folder, limits=plan.limits, lib_prefix=plan.system_lib_prefix
    )


def bundle_weights(plan: ModelPlan, dest: Path) -> None:
    """Weights + configs for the app bundle: a converted folder as it is (its sizes set to the library's),
    anything else converted with the library's quantization and sizes."""
    limits = plan.limits
    if not plan.converted:
        convert(
            plan.source,
            plan.quantization,
            dest,
            progress=False,
            context_window_size=limits.context_window_size,
            prefill_chunk_size=limits.prefill_chunk_size,
        )
        return
    shutil.copytree(plan.source.path, dest, ignore=shutil.ignore_patterns("*.tmp-*", ".*"))
    chat = read_chat_config(dest)
    if (chat.context_window_size, chat.prefill_chunk_size) != (
        limits.context_window_size,
        limits.prefill_chunk_size,
    ):
        # the engine reads the sizes from this file; keep them equal to what the library was compiled for
        chat.context_window_size = limits.context_window_size
        chat.prefill_chunk_size = limits.prefill_chunk_size
        chat.params = {
            **chat.params,
            "context_window_size": limits.context_window_size,
            "prefill_chunk_size": limits.prefill_chunk_size,
        }
        write_chat_config(chat, dest)


def estimate_vram_bytes(compiled: CompiledModel) -> int:
    """Weights + the KV cache at the full context (K and V, every layer) + the largest planned temporary
    memory of any function, from what the compiler recorded; MLC's configs give this number by hand."""
    m = compiled.manifest
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4, "int32": 4, "int8": 1, "uint8": 1}
    weights = 0
    for p in m["params"]:
        n = itemsize[p["dtype"]]
        for s in p["shape"]:
            n *= s
        weights += n
    cfg = m["model_config"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = (
        2
        * cfg["num_hidden_layers"]
        * cfg["num_key_value_heads"]
        * head_dim
        * m["limits"]["context_window_size"]
        * itemsize[m["dtype"]]
    )
    temp = max(m["mlc_metadata"]["memory_usage"].values(), default=0)
    return int(weights + kv + temp)


def app_config_entry(plan: ModelPlan, device: str, vram: int) -> dict[str, Any]:
    """MLC's app-config record: the iOS app opens bundled weights by `model_path` (relative to its bundle
    folder), otherwise apps download from `model_url`."""
    e = plan.entry
    entry: dict[str, Any] = {"model_id": e.model_id, "model_lib": plan.model_lib}
    if e.bundle_weight and device == "iphone":
        entry["model_path"] = e.model_id
    else:
        entry["model_url"] = e.model_url
    entry["estimated_vram_bytes"] = vram
    return entry


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def package(spec: PackageSpec, out_dir: str | Path, log: Callable[[str], None] = print) -> PackageResult:
    """Build `out_dir` for `spec`. All checks that need no compiling run first."""
    out_dir = Path(out_dir).expanduser()
    check_package_output(out_dir, [e.model for e in spec.models])
    for tool in ("ar", "nm"):  # missing tools fail now, not after the compiles
        find_tool(tool)
    plans = plan_all(spec)
    fmt, arch = expected_format(spec.preset)
    with output_lock(out_dir):
        clean_stale_temps(out_dir)
        return _write(spec, out_dir, plans, fmt, arch, log)


def _write(spec, out_dir: Path, plans, fmt: str, arch: str, log) -> PackageResult:
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    (tmp / "lib").mkdir(parents=True)
    (tmp / "bundle").mkdir()
    try:
        libraries: dict[str, CompiledModel] = {}
        app_models, records = [], []
        for plan in plans:
            e = plan.entry
            if plan.system_lib_prefix not in libraries:
                libraries[plan.system_lib_prefix] = compiled_library(plan, spec, log)
            compiled = libraries[plan.system_lib_prefix]
            if e.bundle_weight:
                log(f"bundle {e.model_id}")
                bundle_weights(plan, tmp / "bundle" / e.model_id)
            vram = e.estimated_vram_bytes or estimate_vram_bytes(compiled)
            app_models.append(app_config_entry(plan, spec.device, vram))
            records.append(
                {
                    "model_id": e.model_id,
                    "model": model_path_label(e.model),
                    "model_lib": plan.model_lib,
                    "system_lib_prefix": plan.system_lib_prefix,
                    "quantization": plan.quantization,
                    "context_window_size": plan.limits.context_window_size,
                    "prefill_chunk_size": plan.limits.prefill_chunk_size,
                    "bundled": e.bundle_weight,
                    "estimated_vram_bytes": vram,
                    "vram_estimated_here": e.estimated_vram_bytes is None,
                }
            )
        archive = tmp / "lib" / ARCHIVE_NAMES[spec.device]
        with tempfile.TemporaryDirectory(dir=tmp) as objdir:
            objects = []
            for prefix, compiled in libraries.items():
                objects += extract_objects(compiled.library, prefix[:-1], Path(objdir), fmt, arch)
            create_archive(archive, objects, fmt)
        members = check_archive(archive, list(libraries), fmt)
        for r in records:
            r["archive_member"] = members[r["system_lib_prefix"]]
        app_config = {"model_list": app_models}
        (tmp / "bundle" / APP_CONFIG).write_text(json.dumps(app_config, indent=2) + "\n")
        manifest = {
            "toolkit_version": __version__,
            "mlc_llm_commit": MLC_LLM_COMMIT,
            "device": spec.device,
            "preset": spec.preset.name,
            "object_format": f"{fmt}/{arch}",
            "library": f"lib/{archive.name}",
            "config": spec.origin,
            "models": records,
        }
        (tmp / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackageResult(out_dir, out_dir / "lib" / archive.name, app_config, manifest)


__all__ = ["APP_CONFIG", "ARCHIVE_NAMES", "CHAT_CONFIG", "PACKAGE_MANIFEST", "PackageResult", "package"]
