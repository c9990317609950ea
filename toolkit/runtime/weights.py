"""Weights for a compiled library, in its parameter order, as TVM tensors on the device.

Sources: converter output (already quantized, checksums verified on load), or a checkpoint (HF / GGUF) that
is quantized on first use into the cache with the same converter, so the JIT path and `phi3 convert`
always produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tvm

from ..checkpoint import ModelSource, open_model
from ..compile.compile_model import CompiledModel, cache_root
from ..errors import UserError
from ..quantization import get_scheme

# scales for checkpoints quantized on first use: the converter default (activation-weighted clip search,
# lowest perplexity measured on SmolLM2)
JIT_CLIP = "auto"


def _to_device(
    items: Iterable[tuple[str, np.ndarray]], compiled: CompiledModel, device
) -> list[tvm.runtime.Tensor]:
    """Device tensors in the compiled model's parameter order, copied one at a time as `items` streams them
    (each host array is dropped once copied: peak host memory is the device copy plus one shard)."""
    want = {p["name"]: p for p in compiled.manifest["params"]}
    got: dict[str, tvm.runtime.Tensor] = {}
    for name, a in items:
        p = want.get(name)
        if p is None:
            continue
        if tuple(a.shape) != tuple(p["shape"]):
            raise UserError(
                f"tensor {name!r} has shape {tuple(a.shape)}, the compiled model expects {tuple(p['shape'])}"
            )
        got[name] = tvm.runtime.tensor(np.ascontiguousarray(a.astype(p["dtype"], copy=False)), device)
    missing = [n for n in want if n not in got]
    if missing:
        raise UserError(f"weights have no tensor {missing[0]!r} that the compiled model needs")
    return [got[n] for n in want]


def converted_weights_dir(source: ModelSource, quantization: str) -> Path:
    """Where the JIT path keeps a checkpoint converted to `quantization`."""
    st = source.path.stat()
    from ..checkpoint.mlc_format import FOLDER_REVISION

    key = [str(source.path.resolve()), st.st_size, st.st_mtime_ns, quantization, JIT_CLIP]
    key = json.dumps(key + ([FOLDER_REVISION] if FOLDER_REVISION > 1 else []))
    return cache_root() / "weights" / hashlib.sha256(key.encode()).hexdigest()[:20]


def load_params(source: ModelSource, compiled: CompiledModel, device) -> list[tvm.runtime.Tensor]:
    scheme = get_scheme(compiled.manifest["quantization"])
    if source.kind == "mlc":
        if source.scheme.name != scheme.name:
            raise UserError(
                f"weights are {source.scheme.name}, the compiled model is {scheme.name}", source.path
            )
        return _to_device(source.iter_params(), compiled, device)
    if scheme.is_quantized:
        folder = converted_weights_dir(source, scheme.name)
        if not (folder / "tensor-cache.json").is_file():
            from ..convert.converter import convert

            convert(source, scheme, folder, clip=JIT_CLIP, progress=True)
        return load_params(open_model(folder), compiled, device)
    # unquantized: stream the checkpoint straight into device tensors, one at a time
    wanted = {p["name"] for p in compiled.manifest["params"]}
    names = [n for n in source.tensor_names() if n in wanted]
    return _to_device(source.iter_tensors(names), compiled, device)
