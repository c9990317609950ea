"""Hugging Face checkpoint folder reader: config.json + single or sharded safetensors (or opt-in pickle .bin).

Every header is read and validated against the config up front, so a bad checkpoint fails before any work
starts, with a one-line error naming the offending file (`safe_open` parses and checks each header).
Tensors are then streamed one at a time: each is read with `os.preadv` from its data offsets (the header's,
kept from the scan) into a numpy buffer and widened to float32 there (bf16: its 16 bits shifted into the
top of a float32). Reading copies each tensor out instead of keeping the whole shard mapped
(shared/notes/coreml-facts.md §4: peak RSS 600 MB vs 1.6 GB with mmap on a 2 GB checkpoint), and it needs
no torch: reading through safetensors' torch tensors cost an import (~200 MB of RSS) and a cast twice as slow
as numpy's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..config import load_hf_config
from ..errors import UserError
from . import ModelSource, expected_tensor_shapes, require_finite

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# safetensors spellings and torch spellings (pickle checkpoints)
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64", "bfloat16", "float16", "float32", "float64"}
# buffers some older checkpoints saved next to the weights; recomputed from the config, so ignored
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# safetensors dtype -> the numpy dtype its bytes are read as (bf16 as its raw 16 bits)
_READ_AS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"unreadable shard index ({type(e).__name__}: {e})", index) from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _safetensors_error(e: Exception) -> str:
    return f"corrupt or truncated safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


class HFSource(ModelSource):
    """A local Hugging Face Phi3ForCausalLM folder."""

    kind = "hf"

    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        from ..chat_template import template_for_hf_dir

        path = Path(path)
        config = load_hf_config(path)
        super().__init__(path, config, template_for_hf_dir(path))
        self._pickle = False
        # name -> (file, shape, dtype string)
        self._entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        # name -> byte offset of its data in its safetensors file; file -> (size, mtime) when scanned
        self._offsets: dict[str, int] = {}
        self._scanned: dict[Path, tuple[int, int]] = {}
        files = self._weight_files(allow_pickle)
        if self._pickle:
            self._scan_pickle(files)
        else:
            self._scan_safetensors(files)
        self._validate()

    @property
    def uses_pickle(self) -> bool:
        """Whether the weights are pickle `.bin` files (the folder was opened with allow_pickle)."""
        return self._pickle

    # ---- discovery -----------------------------------------------------------------------------------------
    def _weight_files(self, allow_pickle: bool) -> dict[Path, set[str] | None]:
        """Weight files mapped to the names the index puts in them (None: no index, take what is there)."""
        p = self.path
        if (p / SAFETENSORS_INDEX).is_file():
            return self._indexed_files(p / SAFETENSORS_INDEX)
        if (p / "model.safetensors").is_file():
            return {p / "model.safetensors": None}
        singles = sorted(p.glob("*.safetensors"))
        if singles:
            return dict.fromkeys(singles)
        pickles = sorted(p.glob("pytorch_model*.bin"))
        if (p / PICKLE_INDEX).is_file() or pickles:
            first = p / PICKLE_INDEX if (p / PICKLE_INDEX).is_file() else pickles[0]
            if not allow_pickle:
                raise UserError(
                    "pickle .bin checkpoint refused: unpickling can run arbitrary code; convert it to "
                    "safetensors, or pass --allow-pickle if you trust it",
                    first,
                )
            self._pickle = True
            if (p / PICKLE_INDEX).is_file():
                return self._indexed_files(p / PICKLE_INDEX)
            return dict.fromkeys(pickles)
        raise UserError("no weights: expected model.safetensors or model.safetensors.index.json", p)

    def _indexed_files(self, index: Path) -> dict[Path, set[str] | None]:
        files: dict[Path, set[str] | None] = {}
        for name, shard in _read_index(index).items():
            f = self.path / shard
            if not f.is_file():
                raise UserError(f"shard named in {index.name} is missing", f)
            names = files.setdefault(f, set())
            assert names is not None
            names.add(name)
        return files

    def _scan_safetensors(self, files: dict[Path, set[str] | None]) -> None:
        from safetensors import SafetensorError, safe_open

        for f, promised in files.items():
            try:
                with safe_open(f, framework="numpy") as h:  # checks the header against the file
                    for name in h.keys():
                        sl = h.get_slice(name)
                        self._add(name, f, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
                self._offsets.update(_data_offsets(f))
                self._scanned[f] = _identity(f)
            except SafetensorError as e:
                raise UserError(_safetensors_error(e), f) from None
            except OSError as e:
                raise UserError(f"cannot read ({e.strerror or e})", f) from None
            self._check_promised(f, promised)

    def _scan_pickle(self, files: dict[Path, set[str] | None]) -> None:
        for f, promised in files.items():
            for name, t in self._load_pickle(f).items():
                if not hasattr(t, "shape"):
                    raise UserError(f"entry {name!r} of the state dict is not a tensor", f)
                self._add(name, f, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            self._check_promised(f, promised)

    @staticmethod
    def _load_pickle(f: Path) -> dict:
        import torch

        try:
            # weights_only: refuse arbitrary objects; mmap: tensors stay on disk until touched (zip format)
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy format: read it whole
        except Exception as e:  # torch raises many types for a bad or unsafe pickle
            raise UserError(
                f"cannot load pickle checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})", f
            ) from None
        if not isinstance(sd, dict):
            raise UserError("pickle checkpoint is not a state dict", f)
        return sd

    def _add(self, name: str, f: Path, shape: tuple[int, ...], dtype: str) -> None:
        if name.endswith(IGNORED_SUFFIXES):
            return
        if name in self._entries:
            raise UserError(f"tensor {name} appears twice (also in {self._entries[name][0].name})", f)
        self._entries[name] = (f, shape, dtype)

    def _check_promised(self, f: Path, promised: set[str] | None) -> None:
        if promised is None:
            return
        absent = sorted(n for n in promised if n not in self._entries and not n.endswith(IGNORED_SUFFIXES))
        if absent:
            raise UserError(f"the index says {absent[0]} is in this shard, but it is not", f)

    # ---- validation ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.config
        expected = expected_tensor_shapes(cfg)
        if cfg.tie_word_embeddings:
            # a tied checkpoint may still carry a copy of the embedding as lm_head; embed_tokens is used
            self._entries.pop("lm_head.weight", None)
        missing = [n for n in expected if n not in self._entries]
        if missing:
            hint = (
                " (lm_head.weight is absent: is tie_word_embeddings missing?)"
                if missing == ["lm_head.weight"]
                else ""
            )
            raise UserError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[0]}{hint}", self.path)
        unexpected = [n for n in self._entries if n not in expected]
        if unexpected:
            f = self._entries[unexpected[0]][0]
            raise UserError(
                f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all) "
                "for a Phi3ForCausalLM with this config",
                f,
            )
        for name, shape in expected.items():
            f, got, dtype = self._entries[name]
            if got != shape:
                raise UserError(f"tensor {name} has shape {list(got)}, config.json implies {list(shape)}", f)
            if dtype not in FLOAT_DTYPES:
                raise UserError(
                    f"tensor {name} has dtype {dtype}; only bf16/fp16/fp32 checkpoints are supported", f
                )
        self._names = list(expected)

    # ---- ModelSource ---------------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        names = self._check_names(names)
        if self._pickle:
            yield from self._iter_pickle(names)
            return
        fd, fd_file = None, None
        try:
            for name in names:
                f, shape, dtype = self._entries[name]
                if f != fd_file:
                    if fd is not None:
                        os.close(fd)
                        fd = None
                    try:
                        fd = os.open(f, os.O_RDONLY)
                    except OSError as e:
                        raise UserError(f"cannot read ({e.strerror or e})", f) from None
                    fd_file = f
                    if _identity(f) != self._scanned[f]:  # its offsets were read from another version
                        raise UserError("changed since the checkpoint was opened; run the command again", f)
                arr = _read_tensor(fd, f, name, self._offsets[name], shape, dtype)
                yield name, require_finite(name, arr, f)
                del arr
        finally:
            if fd is not None:
                os.close(fd)

    def _iter_pickle(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        loaded, loaded_file = None, None
        for name in names:
            f = self._entries[name][0]
            if f != loaded_file:
                loaded = None  # drop the previous shard's mapping before mapping the next
                loaded, loaded_file = self._load_pickle(f), f
            assert loaded is not None
            yield name, require_finite(name, _to_float32(loaded[name]), f)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path, config=self.config)


def _to_float32(t) -> np.ndarray:
    import torch

    return np.ascontiguousarray(t.to(torch.float32).numpy())


def _identity(f: Path) -> tuple[int, int]:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns


def _data_offsets(f: Path) -> dict[str, int]:
    """Each tensor's absolute data offset in a safetensors file: an 8-byte little-endian header length, the
    JSON header (its `data_offsets` count from the header's end), then the data. Called after `safe_open`
    accepted the file, so the header is known to be well formed."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


_CHUNK = 8 << 20  # source bytes per read: a staging buffer that stays in cache while it is widened


def _read_tensor(fd: int, f: Path, name: str, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """One tensor as float32 of `shape`. float32 data is read into the result itself; narrower data is read
    a chunk at a time into a small buffer and widened from there into the result, so the only fresh memory
    (whose page faults are most of a read's cost) is the result's."""
    out = np.empty(shape, np.float32)
    src = np.dtype(_READ_AS[dtype])
    flat = out.reshape(-1)
    n = flat.size
    step = max(1, _CHUNK // src.itemsize)
    stage = None if dtype == "F32" else np.empty(min(n, step), src)
    for i in range(0, n, step):
        m = min(step, n - i)
        dst = flat[i : i + m] if stage is None else stage[:m]
        _read_exactly(fd, f, name, memoryview(dst.view(np.uint8)), offset + i * src.itemsize)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            np.left_shift(dst, 16, out=flat[i : i + m].view(np.uint32), dtype=np.uint32)
        elif stage is not None:
            flat[i : i + m] = dst
    return out


def _read_exactly(fd: int, f: Path, name: str, buf: memoryview, offset: int) -> None:
    got = 0
    while got < len(buf):  # a read may come back in pieces
        try:
            more = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:
            raise UserError(f"cannot read tensor {name} ({e.strerror or e})", f) from None
        if more == 0:
            raise UserError(_safetensors_error(ValueError(f"tensor {name} ends past the end of the file")), f)
        got += more
