"""Resolve each model entry before any work: open the model, settle quantization, sizes and model_lib.

model_lib is what the app config names and the engine loads as `system://<model_lib>`: MLC's engine turns
'-' into '_' and appends '_' to get the system-lib prefix (cpp/serve/function_table.cc), and MLC's package
step checks the archive for the symbol `<prefix>__tvm_ffi__library_bin` (interface/package.py), both at
mlc-ai/mlc-llm 79d603f085f50500e9509fa01785ffa7ecfaaa93. The default model_lib follows MLC's JIT naming
(`{model_type}_{quantization}_{hash}`): the hash covers everything the library depends on, so distinct
libraries never share a prefix and identical ones are built once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import ModelSource, open_model
from ..checkpoint.mlc_format import MLC_MAX_BATCH_SIZE, default_window_sizes, model_type_of
from ..compile.attach_metadata import Limits
from ..errors import UserError
from .spec import DEFAULT_QUANTIZATION, ModelEntry, PackageSpec


@dataclass(frozen=True)
class ModelPlan:
    entry: ModelEntry
    source: ModelSource
    quantization: str
    limits: Limits
    model_lib: str
    library_key: str  # identifies the compiled library (config, quantization, preset, sizes)

    @property
    def system_lib_prefix(self) -> str:
        return self.model_lib.replace("-", "_") + "_"

    @property
    def converted(self) -> bool:
        """The model already is an MLC weight folder (bundled as it is, not converted again)."""
        return self.source.kind == "mlc"


def _quantization(entry: ModelEntry, source: ModelSource, where: str) -> str:
    if source.kind != "mlc":
        return entry.quantization or DEFAULT_QUANTIZATION
    own = source.scheme.name
    if entry.quantization is not None and entry.quantization != own:
        raise UserError(
            f"{where}.quantization: {entry.quantization} differs from the converted folder's {own}"
        )
    names = (source.chat_config.toolkit or {}).get("param_names", "hf")
    if names != "hf":
        # our libraries load weights by our parameter names; --param-names mlc is for MLC-compiled libraries
        raise UserError(
            f"{where}.model: converted with --param-names {names}; reconvert with the default names"
        )
    return own


def _limits(entry: ModelEntry, source: ModelSource) -> Limits:
    ctx, prefill = entry.context_window_size, entry.prefill_chunk_size
    if source.kind == "mlc":  # the folder's mlc-chat-config sizes unless overridden
        ctx = ctx or source.chat_config.context_window_size
        prefill = prefill or source.chat_config.prefill_chunk_size
    ctx, prefill = default_window_sizes(source.config, ctx, prefill)
    return Limits(context_window_size=ctx, prefill_chunk_size=prefill, max_batch_size=MLC_MAX_BATCH_SIZE)


def plan_model(entry: ModelEntry, spec: PackageSpec, index: int) -> ModelPlan:
    where = f"{spec.origin}: model_list[{index}]"
    source = open_model(entry.model)
    quantization = _quantization(entry, source, where)
    limits = _limits(entry, source)
    key_blob = json.dumps(
        [source.config.to_dict(), quantization, spec.preset.name, asdict(limits)], sort_keys=True, default=str
    )
    library_key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    model_lib = entry.model_lib or f"{model_type_of(source.config)}_{quantization}_{library_key[:8]}"
    return ModelPlan(entry, source, quantization, limits, model_lib, library_key)


def plan_all(spec: PackageSpec) -> list[ModelPlan]:
    """Plans for every entry; one model_lib must always mean one library (two models may share it)."""
    plans = [plan_model(e, spec, i) for i, e in enumerate(spec.models)]
    by_prefix: dict[str, ModelPlan] = {}
    for i, p in enumerate(plans):
        other = by_prefix.setdefault(p.system_lib_prefix, p)
        if other.library_key != p.library_key:
            raise UserError(
                f"{spec.origin}: model_list[{i}].model_lib: {p.model_lib!r} is also the model_lib of "
                f"{other.entry.model_id!r}, whose library differs (model, quantization or sizes)"
            )
    return plans


def model_path_label(path: Path | None) -> str:
    return "(embedded default model)" if path is None else str(path)
