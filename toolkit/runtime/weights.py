"""Weights for a compiled library, in its parameter order, as TVM tensors on the device.

Sources: converter output (already quantized, checksums verified on load), or a checkpoint (HF / GGUF) that
is quantized on first use into the cache with the same converter, so the JIT path and `phi3 convert`
always produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
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


def _to_device(arrays: dict[str, np.ndarray], compiled: CompiledModel, device) -> list[tvm.runtime.Tensor]:
    out = []
    for p in compiled.manifest["params"]:
        name, shape, dtype = p["name"], tuple(p["shape"]), p["dtype"]
        if name not in arrays:
            raise UserError(f"weights have no tensor {name!r} that the compiled model needs")
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise UserError(f"tensor {name!r} has shape {tuple(a.shape)}, the compiled model expects {shape}")
        out.append(tvm.runtime.tensor(np.ascontiguousarray(a.astype(dtype, copy=False)), device))
    return out


def converted_weights_dir(source: ModelSource, quantization: str) -> Path:
    """Where the JIT path keeps a checkpoint converted to `quantization`."""
    st = source.path.stat()
    key = json.dumps([str(source.path.resolve()), st.st_size, st.st_mtime_ns, quantization, JIT_CLIP])
    return cache_root() / "weights" / hashlib.sha256(key.encode()).hexdigest()[:20]


def load_params(source: ModelSource, compiled: CompiledModel, device) -> list[tvm.runtime.Tensor]:
    scheme = get_scheme(compiled.manifest["quantization"])
    if source.kind == "mlc":
        if source.scheme.name != scheme.name:
            raise UserError(
                f"weights are {source.scheme.name}, the compiled model is {scheme.name}", source.path
            )
        return _to_device(source.load_params(), compiled, device)
    if scheme.is_quantized:
        folder = converted_weights_dir(source, scheme.name)
        if not (folder / "tensor-cache.json").is_file():
            from ..convert.converter import convert

            convert(source, scheme, folder, clip=JIT_CLIP, progress=True)
        return load_params(open_model(folder), compiled, device)
    # unquantized: stream the checkpoint straight into device tensors, one at a time
    by_name = {p["name"]: p for p in compiled.manifest["params"]}
    arrays = {}
    for name, arr in source.iter_tensors([n for n in source.tensor_names() if n in by_name]):
        arrays[name] = arr.astype(by_name[name]["dtype"])
    return _to_device(arrays, compiled, device)
