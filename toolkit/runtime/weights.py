"""Weights for a compiled library, in its parameter order, as TVM tensors on the device.

Sources: converter output (already quantized, checksums verified on load), or a checkpoint (HF / GGUF) that
is quantized on first use into the cache with the same converter, so the JIT path and `phi3 convert`
always produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tvm

from .. import interrupts
from ..checkpoint import ModelSource, open_model, require_finite
from ..checkpoint.mlc_format import read_cache_json, verify_tensor_cache
from ..compile.compile_model import CompiledModel
from ..errors import UserError
from ..locks import output_lock
from ..paths import cache_root
from ..quantization import get_scheme

# scales for checkpoints quantized on first use (e.g. the embedded model run directly): "auto", as `phi3
# convert` defaults to (a GGUF with a placeholder vocabulary still falls back to rtn)
JIT_CLIP = "auto"
# in a cached weights folder: the identities of the shards whose md5 the last full check passed
VERIFIED_STAMP = ".shards-verified.json"


def _to_device(
    items: Iterable[tuple[str, np.ndarray]], compiled: CompiledModel, device, origin: Path
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
        require_finite(name, a, origin)  # a converted folder's fp weights too
        got[name] = tvm.runtime.tensor(np.ascontiguousarray(a.astype(p["dtype"], copy=False)), device)
    missing = [n for n in want if n not in got]
    if missing:
        raise UserError(f"weights have no tensor {missing[0]!r} that the compiled model needs")
    return [got[n] for n in want]


def converted_weights_dir(source: ModelSource, quantization: str) -> Path:
    """Where the JIT path keeps a checkpoint converted to `quantization`."""
    from ..checkpoint.mlc_format import FOLDER_REVISION

    # per-file identity: replacing model.safetensors in place must not reuse the old model's weights
    key = [str(source.path.resolve()), source_identity(source.path), quantization, JIT_CLIP]
    key = json.dumps(key + ([FOLDER_REVISION] if FOLDER_REVISION > 1 else []))
    return cache_root() / "weights" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ino]


def source_identity(path: Path) -> list:
    """What the weights were read from: every file of the checkpoint (name, size, mtime_ns, inode). A
    folder's own stat does not change when a file inside it is replaced, so the files are keyed one by one."""
    path = Path(path)
    if path.is_file():
        return [_file_identity(path)]
    return [_file_identity(f) for f in sorted(path.iterdir()) if f.is_file()]


def _convert_into_cache(source: ModelSource, scheme, folder: Path) -> None:
    from ..convert.converter import convert

    convert(source, scheme, folder, clip=JIT_CLIP, progress=True)


def _needs_conversion(source: ModelSource, quantization: str) -> bool:
    """A checkpoint (not a converted folder) whose weights `quantization` quantizes, not yet in the cache."""
    scheme = get_scheme(quantization)
    if source.kind == "mlc" or not scheme.is_quantized:
        return False
    return not (converted_weights_dir(source, scheme.name) / "tensor-cache.json").is_file()


def ensure_converted(source: ModelSource, scheme) -> None:
    """Convert `source` to `scheme` into its cache folder unless it is there (one writer at a time: a
    second process or thread waits for the first's conversion, then finds it). The shards' md5 sums were
    computed from the bytes just written, so the entry is stamped as verified (see `_verify_shards`)."""
    folder = converted_weights_dir(source, scheme.name)
    with output_lock(folder):
        if not (folder / "tensor-cache.json").is_file():
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete entry: ours, and useless
            _convert_into_cache(source, scheme, folder)
            _stamp_verified(folder, _shard_names(folder))


@contextmanager
def converting_alongside(source: ModelSource, quantization: str) -> Iterator[None]:
    """Convert `source`'s weights into the cache in a child process while the caller's block runs (the
    library's compile), so a first run waits for the longer of the two rather than their sum
    (`convert_process` says why not a thread). The block's own error wins and stops the child; a
    conversion error is raised when the block ends. Nothing to convert: the block just runs."""
    if not _needs_conversion(source, quantization):
        yield
        return
    from .convert_process import ConversionProcess

    child = ConversionProcess(source, quantization)
    try:
        yield
        if interrupts.fired():  # a Ctrl-C that the block swallowed: the command ends, no need to wait
            raise KeyboardInterrupt
    except BaseException:
        child.stop()
        raise
    child.wait()


def _cached_converted(
    source: ModelSource, scheme, compiled: CompiledModel, device, param_meta: list[dict] | None
) -> list[tvm.runtime.Tensor]:
    """Load the cached conversion, converting on first use; a damaged entry (truncated shard, bad json) is
    ours to rebuild, once, with a notice."""
    folder = converted_weights_dir(source, scheme.name)
    with output_lock(folder):
        ensure_converted(source, scheme)
        try:
            return load_params(open_model(folder), compiled, device, param_meta, cache_entry=True)
        except UserError as e:
            print(f"notice: cached weights {folder} are damaged ({e}); rebuilding them", file=sys.stderr)
            shutil.rmtree(folder)
            _convert_into_cache(source, scheme, folder)
            return load_params(open_model(folder), compiled, device, param_meta, cache_entry=True)


def _verify_shards(folder: Path, shards: list[str], cache_entry: bool) -> None:
    """md5 of every shard (a damaged file is a one-line error, not a crash inside TVM). In a folder of our
    cache, only on its first load: the shards' identities (size, mtime, inode) are then recorded beside them,
    and a later load re-hashes only when one differs (a shard rewritten, truncated or replaced)."""
    if not cache_entry:
        verify_tensor_cache(folder)
        return
    stamp = folder / VERIFIED_STAMP
    try:
        now = [_file_identity(folder / name) for name in shards]
    except OSError:
        now = None  # a shard is missing: the full check says which
    try:
        if now is not None and json.loads(stamp.read_text()) == now:
            return
    except (OSError, ValueError):
        pass
    verify_tensor_cache(folder)
    _stamp_verified(folder, shards, now)


def _shard_names(folder: Path) -> list[str]:
    return sorted(shard["dataPath"] for shard in read_cache_json(folder)["records"])


def _stamp_verified(folder: Path, shards: list[str], identities: list | None = None) -> None:
    """Record the shards' identities as checked (`identities`: taken before the check, default now)."""
    stamp = folder / VERIFIED_STAMP
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        now = identities if identities is not None else [_file_identity(folder / n) for n in shards]
        tmp.write_text(json.dumps(now))
        tmp.replace(stamp)
    except OSError:  # a cache we may read but not write (full disk, read-only): hash again next time
        tmp.unlink(missing_ok=True)


def load_mlc_params(
    folder: Path, param_meta: list[dict], device, cache_entry: bool = False
) -> list[tvm.runtime.Tensor]:
    """A weights folder's tensors in the library's parameter order, loaded the way MLC-LLM's engine loads
    them (cpp/serve/function_table.cc `LoadParams`): `vm.builtin.tensor_cache.load`, then
    `param_array_from_cache_by_name` with the names of the library's `_metadata`, then
    `tensor_cache.clear`. Names, shapes, dtypes and shard checksums are checked first, so a mismatch or a
    damaged file is a one-line error here rather than a crash inside TVM (`cache_entry`: a folder of our
    cache, see `_verify_shards`)."""
    stored, shards = {}, []
    for shard in read_cache_json(folder)["records"]:
        shards.append(shard["dataPath"])  # the shards the json names: only they count
        for rec in shard["records"]:
            stored[rec["name"]] = (tuple(rec["shape"]), rec["dtype"])
    for p in param_meta:
        if p["name"] not in stored:
            raise UserError(f"weights have no tensor {p['name']!r} that the compiled model needs", folder)
        if stored[p["name"]][0] != tuple(p["shape"]):
            raise UserError(
                f"tensor {p['name']!r} has shape {list(stored[p['name']][0])}, the compiled model expects "
                f"{list(p['shape'])}",
                folder,
            )
    _verify_shards(folder, sorted(shards), cache_entry)
    load = tvm.get_global_func("vm.builtin.tensor_cache.load")
    load(str(folder), device.dlpack_device_type(), device.index)
    try:
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        return list(by_name([p["name"] for p in param_meta]))
    finally:
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()


def load_params(
    source: ModelSource,
    compiled: CompiledModel,
    device,
    param_meta: list[dict] | None = None,
    *,
    cache_entry: bool = False,
) -> list[tvm.runtime.Tensor]:
    """Weights for `compiled`: a weights folder through MLC's builtins (`param_meta`: the `params` of the
    library's `_metadata`, default the manifest's; `cache_entry`: the folder is our cache's), a checkpoint
    converted into the cache first when quantized, streamed tensor by tensor when not."""
    scheme = get_scheme(compiled.manifest["quantization"])
    if source.kind == "mlc":
        if source.scheme.name != scheme.name:
            raise UserError(
                f"weights are {source.scheme.name}, the compiled model is {scheme.name}", source.path
            )
        meta = param_meta or compiled.manifest["params"]
        if all(source.stored_dtype(p["name"]) == p["dtype"] for p in meta):
            return load_mlc_params(source.path, meta, device, cache_entry)
        # an unquantized folder (q0f16) under a library computing in fp32 (the host): cast on the way in;
        # MLC's runtime would refuse this pair, quantized schemes never hit it (norms keep the folder dtype)
        return _to_device(source.iter_params(), compiled, device, source.path)
    if scheme.is_quantized:
        return _cached_converted(source, scheme, compiled, device, param_meta)
    # unquantized: stream the checkpoint straight into device tensors, one at a time
    wanted = {p["name"] for p in compiled.manifest["params"]}
    names = [n for n in source.tensor_names() if n in wanted]
    return _to_device(source.iter_tensors(names), compiled, device, source.path)
