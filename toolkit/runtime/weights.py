"""Weights for a compiled library, in its parameter order, as TVM tensors on the device.

Sources: converter output (already quantized, checksums verified on load), or a checkpoint (HF / GGUF) that
is quantized on first use into the cache with the same converter, so the JIT path and `phi3 convert`
always produce the same bytes.
"""

from __future__ import annotations

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
from ..quantization import get_scheme
from .weight_cache import (
    VERIFIED_STAMP,
    convert_into_cache,
    converted_weights_dir,
    ensure_converted,
    file_identity,
    stamp_verified,
)


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


def _needs_conversion(source: ModelSource, quantization: str) -> bool:
    """A checkpoint (not a converted folder) whose weights `quantization` quantizes, not yet in the cache."""
    scheme = get_scheme(quantization)
    if source.kind == "mlc" or not scheme.is_quantized:
        return False
    return not (converted_weights_dir(source, scheme.name) / "tensor-cache.json").is_file()


@contextmanager
def converting_alongside(source: ModelSource, quantization: str) -> Iterator[None]:
    """Convert `source`'s weights into the cache in a child process while the caller's block runs (the
    library's compile), so a first run waits for the longer of the two rather than their sum
    (`convert_process` says why not a thread). The block's own error wins and stops the child; a
    conversion error is raised when the block ends. Nothing to convert: the block just runs."""
    from .convert_process import ConversionProcess, can_start

    if not _needs_conversion(source, quantization) or not can_start():
        yield  # (no child possible: `load_params` converts after the block)
        return

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
    source: ModelSource,
    scheme,
    compiled: CompiledModel,
    device,
    param_meta: list[dict] | None,
    huge_pages: bool,
) -> list[tvm.runtime.Tensor]:
    """Load the cached conversion, converting on first use; a damaged entry (truncated shard, bad json) is
    ours to rebuild, once, with a notice."""
    folder = converted_weights_dir(source, scheme.name)
    with output_lock(folder):
        ensure_converted(source, scheme)
        try:
            return load_params(
                open_model(folder), compiled, device, param_meta, cache_entry=True, huge_pages=huge_pages
            )
        except UserError as e:
            print(f"notice: cached weights {folder} are damaged ({e}); rebuilding them", file=sys.stderr)
            shutil.rmtree(folder)
            convert_into_cache(source, scheme, folder)
            return load_params(
                open_model(folder), compiled, device, param_meta, cache_entry=True, huge_pages=huge_pages
            )


def _verify_shards(folder: Path, shards: list[str], cache_entry: bool) -> None:
    """md5 of every shard (a damaged file is a one-line error, not a crash inside TVM). In a folder of our
    cache, only on its first load: the shards' identities (size, mtime, inode) are then recorded beside them,
    and a later load re-hashes only when one differs (a shard rewritten, truncated or replaced)."""
    if not cache_entry:
        verify_tensor_cache(folder)
        return
    stamp = folder / VERIFIED_STAMP
    try:
        now = [file_identity(folder / name) for name in shards]
    except OSError:
        now = None  # a shard is missing: the full check says which
    try:
        if now is not None and json.loads(stamp.read_text()) == now:
            return
    except (OSError, ValueError):
        pass
    verify_tensor_cache(folder)
    stamp_verified(folder, shards, now)


def load_mlc_params(
    folder: Path, param_meta: list[dict], device, cache_entry: bool = False, huge_pages: bool = False
) -> list[tvm.runtime.Tensor]:
    """A weights folder's tensors in the library's parameter order, loaded the way MLC-LLM's engine loads
    them (cpp/serve/function_table.cc `LoadParams`): `vm.builtin.tensor_cache.load`, then
    `param_array_from_cache_by_name` with the names of the library's `_metadata`, then
    `tensor_cache.clear`. Names, shapes, dtypes and shard checksums are checked first, so a mismatch or a
    damaged file is a one-line error here rather than a crash inside TVM (`cache_entry`: a folder of our
    cache, see `_verify_shards`).

    `huge_pages` (host libraries: decode streams the weights, see hugepages.py): the tensors end on huge
    pages; raw records are read from their shards straight into place, in parallel, instead of TVM's
    loader filling its own tensors and those being copied (`in_huge_pages`, the way for anything else)."""
    stored, shards, where = {}, [], {}
    for shard in read_cache_json(folder)["records"]:
        shards.append(shard["dataPath"])  # the shards the json names: only they count
        for rec in shard["records"]:
            stored[rec["name"]] = (tuple(rec["shape"]), rec["dtype"])
            where[rec["name"]] = (folder / shard["dataPath"], rec)
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
    if huge_pages and device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
        from ..hugepages import huge_pages_available

        if huge_pages_available():
            placed = _read_into_huge_pages([where[p["name"]] for p in param_meta])
            if placed is not None:
                return placed
    return _placed(_load_with_tvm(folder, param_meta, device), device, huge_pages)


def _load_with_tvm(folder: Path, param_meta: list[dict], device) -> list[tvm.runtime.Tensor]:
    load = tvm.get_global_func("vm.builtin.tensor_cache.load")
    load(str(folder), device.dlpack_device_type(), device.index)
    try:
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        return list(by_name([p["name"] for p in param_meta]))
    finally:
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()


def _read_into_huge_pages(records: list[tuple[Path, dict]]) -> list[tvm.runtime.Tensor] | None:
    """The parameters, given as (shard, record) in the library's order, read from their shards into one
    huge-page mapping (`hugepages.huge_arrays`); None when a record is not plain bytes numpy can view (MLC's
    f32-to-bf16, bfloat16): TVM's loader decodes those."""
    from ..hugepages import huge_arrays

    specs, spans = [], []
    for path, rec in records:
        try:
            dtype = np.dtype(rec["dtype"])
        except TypeError:
            return None
        shape = tuple(int(d) for d in rec["shape"])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if rec.get("format", "raw") != "raw" or int(rec["nbytes"]) != nbytes or dtype.kind not in "biuf":
            return None
        specs.append((shape, dtype))
        spans.append((path, int(rec["byteOffset"]), rec["name"]))
    fds: dict[Path, int] = {}

    def fill(i: int, start: int, dst: np.ndarray) -> None:
        path, offset, name = spans[i]
        done = 0
        while done < dst.size:  # preadv may return less than asked
            got = os.preadv(fds[path], [dst[done:]], offset + start + done)
            if got == 0:
                raise UserError(f"tensor {name} runs past the end of its shard", path)
            done += got

    try:
        for path, _, _ in spans:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
        arrays = huge_arrays(specs, fill)
    finally:
        for fd in fds.values():
            os.close(fd)
    return [tvm.runtime.from_dlpack(a) for a in arrays]


def load_params(
    source: ModelSource,
    compiled: CompiledModel,
    device,
    param_meta: list[dict] | None = None,
    *,
    cache_entry: bool = False,
    huge_pages: bool = False,
) -> list[tvm.runtime.Tensor]:
    """Weights for `compiled`: a weights folder through MLC's builtins (`param_meta`: the `params` of the
    library's `_metadata`, default the manifest's; `cache_entry`: the folder is our cache's), a checkpoint
    converted into the cache first when quantized, streamed tensor by tensor when not. `huge_pages`: host
    tensors end on huge pages (`load_mlc_params`)."""
    scheme = get_scheme(compiled.manifest["quantization"])
    if source.kind == "mlc":
        if source.scheme.name != scheme.name:
            raise UserError(
                f"weights are {source.scheme.name}, the compiled model is {scheme.name}", source.path
            )
        meta = param_meta or compiled.manifest["params"]
        if all(source.stored_dtype(p["name"]) == p["dtype"] for p in meta):
            return load_mlc_params(source.path, meta, device, cache_entry, huge_pages)
        # an unquantized folder (q0f16) under a library computing in fp32 (the host): cast on the way in;
        # MLC's runtime would refuse this pair, quantized schemes never hit it (norms keep the folder dtype)
        return _placed(_to_device(source.iter_params(), compiled, device, source.path), device, huge_pages)
    if scheme.is_quantized:
        return _cached_converted(source, scheme, compiled, device, param_meta, huge_pages)
    # unquantized: stream the checkpoint straight into device tensors, one at a time
    wanted = {p["name"] for p in compiled.manifest["params"]}
    names = [n for n in source.tensor_names() if n in wanted]
    return _placed(_to_device(source.iter_tensors(names), compiled, device, source.path), device, huge_pages)


def _placed(params: list[tvm.runtime.Tensor], device, huge_pages: bool) -> list[tvm.runtime.Tensor]:
    if not huge_pages:
        return params
    from ..hugepages import in_huge_pages

    return in_huge_pages(params, device)
