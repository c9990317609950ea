"""MLC-LLM's weight format: `params_shard_N.bin` files plus `tensor-cache.json`, written and read streaming.

The layout follows TVM's `tvm.contrib.tvmjs.dump_tensor_cache` (what `mlc_llm convert_weight` calls), so MLC's
runtimes (C++ `function_table.cc`, iOS, Android, web) can read what we write:
  tensor-cache.json = {"metadata": {"ParamSize", "ParamBytes", "BitsPerParam"},
                       "records": [{"dataPath": "params_shard_K.bin", "format": "raw-shard", "nbytes",
                                    "records": [{"name", "shape", "dtype", "format": "raw", "nbytes",
                                                 "byteOffset"}, ...], "md5sum"}, ...]}
Shards hold about `shard_cap` bytes (32 MiB); a tensor that does not fit the current shard and is at least
half the cap gets a shard of its own (tvmjs' rule, numbering included). We always write "raw" records (MLC
bf16-encodes float32 with "f32-to-bf16"; the reader decodes that too).
Memory: the writer holds one pending shard plus the tensor being added, and up to two finished shards being
written; the reader one shard at a time. Finished shards are written and hashed in a thread
("phi3-shard-writer": both leave the GIL), so a converter quantizes the next tensors meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError

CACHE_JSON = "tensor-cache.json"
SHARD_PREFIX = "params_shard"
DEFAULT_SHARD_CAP = 32 * (1 << 20)
_DTYPES = {"float16", "float32", "float64", "uint32", "int32", "int64", "uint8", "int8", "uint16", "int16"}


class TensorCacheWriter:
    """Append tensors one at a time; `finish()` writes the last shard and tensor-cache.json. Shards are
    written in a thread: `close()` (or leaving a `with` block) waits for it, so call it before removing a
    folder that an unfinished writer writes into. A failed shard write is raised by the next `add` or
    `finish`."""

    def __init__(self, out_dir: str | Path, shard_cap: int = DEFAULT_SHARD_CAP) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_cap = shard_cap
        self.shards: list[dict[str, Any]] = []
        self._pending = bytearray()
        self._pending_records: list[dict[str, Any]] = []
        self._counter = 0
        self._names: set[str] = set()
        self.param_bytes = 0
        self._jobs: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TensorCacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str, array: np.ndarray) -> None:
        self._raise_failed()
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {dtype}")
        self._names.add(name)
        data = memoryview(np.ascontiguousarray(array)).cast("B")  # no copy for contiguous arrays
        rec = {
            "name": name,
            "shape": [int(d) for d in array.shape],
            "dtype": dtype,
            "format": "raw",
            "nbytes": data.nbytes,
        }
        self.param_bytes += data.nbytes
        if len(self._pending) + data.nbytes >= self.shard_cap:
            if data.nbytes * 2 >= self.shard_cap:
                rec["byteOffset"] = 0  # out of band: its own shard, the pending one keeps filling
                self._write_shard(data, [rec])
                return
            self._flush()
        rec["byteOffset"] = len(self._pending)
        self._pending_records.append(rec)
        self._pending += data

    def _flush(self) -> None:
        if self._pending:
            self._write_shard(self._pending, self._pending_records)
            self._pending = bytearray()
            self._pending_records = []

    def _write_shard(self, data: bytearray | memoryview, records: list[dict[str, Any]]) -> None:
        """Queue a shard (its bytes are not changed afterwards: a new pending buffer is started, and an
        out-of-band tensor's memoryview keeps its array alive); its entry takes its place in order now."""
        path = f"{SHARD_PREFIX}_{self._counter}.bin"
        self._counter += 1
        entry = {"dataPath": path, "format": "raw-shard", "nbytes": len(data), "records": records}
        self.shards.append(entry)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="phi3-shard-writer", daemon=True)
            self._thread.start()
        self._jobs.put((entry, data))

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            entry, data = job
            if self._error is not None:
                continue  # after a failure the rest is dropped; the caller raises it
            try:
                with open(self.out_dir / entry["dataPath"], "wb") as f:
                    f.write(data)
                entry["md5sum"] = hashlib.md5(data).hexdigest()
            except BaseException as e:
                self._error = e
            del job, entry, data

    def close(self) -> None:
        """Wait until every queued shard is written (or dropped after a failure); idempotent."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failed(self) -> None:
        if self._error is not None:
            self.close()
            raise self._error

    def finish(
        self, num_original_params: int | None = None, extra_metadata: dict | None = None
    ) -> dict[str, Any]:
        """Write the last shard and tensor-cache.json; returns the json content.

        `num_original_params`: weights of the unquantized model, for BitsPerParam (default: the element count
        of what was written).
        """
        self._flush()
        self.close()
        self._raise_failed()
        n_params = num_original_params
        if n_params is None:
            n_params = sum(math.prod(r["shape"]) for s in self.shards for r in s["records"])
        metadata = {
            "ParamSize": len(self._names),
            "ParamBytes": self.param_bytes,
            "BitsPerParam": self.param_bytes * 8.0 / max(n_params, 1),
        }
        metadata.update(extra_metadata or {})
        content = {"metadata": metadata, "records": self.shards}
        tmp = self.out_dir / (CACHE_JSON + ".tmp")
        tmp.write_text(json.dumps(content, indent=2))
        os.replace(tmp, self.out_dir / CACHE_JSON)
        return content


def write_tensor_cache(
    tensors: Iterable[tuple[str, np.ndarray]],
    out_dir: str | Path,
    shard_cap: int = DEFAULT_SHARD_CAP,
    num_original_params: int | None = None,
) -> dict[str, Any]:
    with TensorCacheWriter(out_dir, shard_cap) as writer:
        for name, array in tensors:
            writer.add(name, array)
        return writer.finish(num_original_params)


def read_cache_json(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / CACHE_JSON
    if not path.is_file():
        raise UserError(
            f"no {CACHE_JSON} (not a converted weight folder, or an interrupted conversion)", Path(cache_dir)
        )
    try:
        content = json.loads(path.read_text())
        for shard in content["records"]:
            for key in ("dataPath", "nbytes", "records"):
                shard[key]  # noqa: B018 (presence check)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"malformed tensor cache ({type(e).__name__}: {e})", path) from None
    return content


def _read_shard(cache_dir: Path, shard: dict[str, Any], verify: bool) -> bytes:
    path = cache_dir / shard["dataPath"]
    if not path.is_file():
        raise UserError(f"missing weight shard {shard['dataPath']}", path)
    size = path.stat().st_size
    if size != shard["nbytes"]:
        raise UserError(
            f"weight shard {shard['dataPath']} has {size} bytes, expected {shard['nbytes']} "
            "(truncated or overwritten; re-run the conversion)",
            path,
        )
    data = path.read_bytes()
    if verify and "md5sum" in shard and hashlib.md5(data).hexdigest() != shard["md5sum"]:
        raise UserError(
            f"weight shard {shard['dataPath']} is corrupt (md5 mismatch); re-run the conversion", path
        )
    return data


def _decode(data: bytes, rec: dict[str, Any], shard_path: Path) -> np.ndarray:
    start, nbytes = int(rec["byteOffset"]), int(rec["nbytes"])
    raw = data[start : start + nbytes]
    if len(raw) != nbytes:
        raise UserError(f"tensor {rec['name']} runs past the end of its shard", shard_path)
    dtype, fmt = rec["dtype"], rec.get("format", "raw")
    if fmt == "f32-to-bf16" and dtype == "float32":  # MLC's encoding: the top 16 bits of each float32
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rec["shape"])
    if dtype == "bfloat16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rec["shape"])
    if fmt != "raw" or dtype not in _DTYPES:
        raise UserError(f"tensor {rec['name']}: unsupported format/dtype {fmt}/{dtype}", shard_path)
    arr = np.frombuffer(raw, np.dtype(dtype))
    if arr.size != math.prod(rec["shape"]):
        raise UserError(f"tensor {rec['name']}: {arr.size} elements for shape {rec['shape']}", shard_path)
    return arr.reshape(rec["shape"]).copy()  # own the memory: the shard bytes can be freed


def iter_tensor_cache(
    cache_dir: str | Path, names: Iterable[str] | None = None, verify: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) shard by shard; each shard's size and md5 are checked before any of it is used."""
    cache_dir = Path(cache_dir)
    content = read_cache_json(cache_dir)
    wanted = None if names is None else set(names)
    for shard in content["records"]:
        recs = [r for r in shard["records"] if wanted is None or r["name"] in wanted]
        if not recs:
            continue
        data = _read_shard(cache_dir, shard, verify)
        for rec in recs:
            yield rec["name"], _decode(data, rec, cache_dir / shard["dataPath"])


def load_tensor_cache(cache_dir: str | Path, verify: bool = True) -> dict[str, np.ndarray]:
    return dict(iter_tensor_cache(cache_dir, verify=verify))


def verify_tensor_cache(cache_dir: str | Path) -> int:
    """Check every shard's presence, size and md5; returns the number of shards."""
    cache_dir = Path(cache_dir)
    content = read_cache_json(cache_dir)
    for shard in content["records"]:
        _read_shard(cache_dir, shard, verify=True)
    return len(content["records"])
