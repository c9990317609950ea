"""GGUF reader: a Llama-family model (e.g. SmolLM2) or a llama.cpp `phi3` model, mapped onto the Phi-3 graph.

Llama: q/k/v are fused into `qkv_proj`, gate/up into `gate_up_proj` (gate first), and Q/K are un-permuted.
llama.cpp's converter permutes the rows of each Q/K head so that its "normal" RoPE (rotating adjacent pairs
(2j, 2j+1)) equals HF's rotate-half RoPE (pairs (j, j + hd/2)); our graph uses rotate-half, so we undo it.
Phi3: llama.cpp keeps HF's fused layout and uses NEOX (rotate-half) RoPE, so tensors map one to one.
Tensors are dequantized to float32 one at a time, when iterated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, LongRope, Phi3Config
from ..errors import UserError
from ..row_blocks import parallel_row_blocks
from . import ModelSource, expected_tensor_shapes, require_finite
from .ggml_dequant import DEQUANT_INTO
from .gguf_names import ROPE_FACTOR_TENSORS, gguf_names

SUPPORTED_GGUF_ARCHS = ("llama", "phi3")
CONTROL_TOKEN_TYPE = 3
# llama.cpp rope types that need more than plain RoPE; we refuse them rather than run them wrong
_UNSUPPORTED_ROPE_SCALING = ("linear", "yarn", "longrope")
# elements per dequantization step of gguf-py's dequantizer (16 MB of float32 output)
_DEQUANT_ELEMS = 1 << 22
# rows per step of ours (ggml_dequant), whose temporaries are a few rows' size
_FAST_ROWS = 64


def read_gguf(path: Path | str):
    """gguf-py's reader, with the same fields, parts and tensors, parsed faster:
    - over a plain ndarray view of the file map: its field walk slices the map ~10^6 times for a
      49k-token vocabulary, and every np.memmap slice pays memmap's __array_finalize__;
    - a little-endian array of strings or scalars is walked in one loop (`_array_parts`) instead of one
      generic `_get_field_parts` call per element.
    Tensor data stay lazily mapped views of the same file."""
    from gguf import GGUFReader, GGUFValueType

    class _Reader(GGUFReader):
        def _get(self, *args, **kwargs):
            if type(self.data) is np.memmap:
                self._map = self.data  # the view below keeps the map alive; held here for clarity
                self.data = self.data.view(np.ndarray)
            return super()._get(*args, **kwargs)

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type == GGUFValueType.ARRAY and self.byte_order == "I" and sys.byteorder == "little":
                parsed = self._array_parts(orig_offs)
                if parsed is not None:
                    return parsed
            return super()._get_field_parts(orig_offs, raw_type)

        def _array_parts(self, orig_offs: int):
            """(size, parts, data indices, types) exactly as gguf-py builds them for a flat array: the
            element type and length, then per element its parts (a string: its length and its bytes)."""
            itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            sub, n, offs = GGUFValueType(int(itype[0])), int(alen[0]), orig_offs + 12
            parts: list[np.ndarray] = [itype, alen]
            data = self.data
            if sub == GGUFValueType.STRING:
                mv, end = memoryview(data), len(data)
                for _ in range(n):
                    if offs + 8 > end:
                        return None  # a truncated or damaged file: gguf-py's own walk raises its error
                    size = int.from_bytes(mv[offs : offs + 8], "little")
                    parts.append(data[offs : offs + 8].view(np.uint64))
                    parts.append(data[offs + 8 : offs + 8 + size])
                    offs += 8 + size
                idxs = list(range(3, 2 + 2 * n + 1, 2))
            elif sub in self.gguf_scalar_to_np:
                dt = np.dtype(self.gguf_scalar_to_np[sub])
                arr = data[offs : offs + n * dt.itemsize].view(dt)
                if arr.size != n:
                    return None  # a truncated file: gguf-py's own walk raises its error
                parts += list(arr.reshape(n, 1))
                offs += n * dt.itemsize
                idxs = list(range(2, 2 + n))
            else:
                return None  # arrays of arrays: gguf-py's generic walk
            if offs > len(data):
                return None
            return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY] + ([sub] if n else [])

    return _Reader(path)


def open_gguf_reader(path: Path):
    """gguf-py's reader of `path`, or a one-line UserError naming it."""
    try:
        return read_gguf(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise UserError(
            f"not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", path
        ) from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _str_at(field, i: int) -> str:
    """The i-th string of a GGUF string-array field, without decoding the whole array."""
    return bytes(field.parts[field.data[i]]).decode("utf-8", errors="replace")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: rows (h, j, s) in GGUF order -> (h, s, j) in HF order."""
    out_dim = w.shape[0]
    hd = out_dim // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(ModelSource):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        from ..chat_template import template_from_jinja

        path = Path(path)
        reader = open_gguf_reader(path)
        arch = _field(reader, "general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise UserError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}", path
            )
        self._reader = reader
        self.arch = arch
        self._tensors = {t.name: t for t in reader.tensors}
        self._tokenizer = None
        self.path = path  # the error paths of _build_config name the file
        try:
            config = self._build_config(path)
        except (ConfigError, ValueError, TypeError, ZeroDivisionError) as e:
            # a metadata value of the wrong type or out of range: one line naming the file
            raise UserError(f"bad GGUF metadata: {e}", path) from None
        jinja = _field(reader, "tokenizer.chat_template")
        default_template = "phi3" if arch == "phi3" else "raw"
        super().__init__(path, config, template_from_jinja(jinja) or default_template)
        self._expected = expected_tensor_shapes(config)
        self._validate()

    # ---- config --------------------------------------------------------------------------------------------
    def _req(self, key: str) -> Any:
        v = _field(self._reader, f"{self.arch}.{key}")
        if v is None:
            raise UserError(f"GGUF metadata lacks {self.arch}.{key}", self.path)
        return v

    def _opt(self, key: str, default: Any = None) -> Any:
        return _field(self._reader, f"{self.arch}.{key}", default)

    def _build_config(self, path: Path) -> Phi3Config:
        r = self._reader
        hidden = int(self._req("embedding_length"))
        n_head = int(self._req("attention.head_count"))
        for key, v in (("embedding_length", hidden), ("attention.head_count", n_head)):
            if v <= 0:  # both divide below
                raise UserError(f"GGUF metadata {self.arch}.{key} is {v}; it must be positive", path)
        n_kv = int(self._opt("attention.head_count_kv", n_head))
        head_dim = int(self._opt("attention.key_length", hidden // n_head))
        rot = int(self._opt("rope.dimension_count", head_dim))
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = self._opt("vocab_size")
        if vocab is None:
            # the embedding's row count is the model's vocabulary (it may exceed the tokenizer's, e.g. Phi-3)
            embd = self._tensors.get("token_embd.weight")
            if embd is None:
                raise UserError("GGUF has no token_embd.weight", path)
            vocab = int(embd.shape[-1])
        if tokens is not None and len(tokens.data) > int(vocab):
            raise UserError(
                f"GGUF tokenizer has {len(tokens.data)} tokens, more than the vocab_size {vocab}", path
            )
        scaling = self._opt("rope.scaling.type")
        if scaling not in (None, "none") and not (self.arch == "phi3" and scaling == "longrope"):
            raise UserError(f"GGUF rope scaling {scaling!r} is not supported", path)
        if "rope_freqs.weight" in self._tensors:
            raise UserError(
                "GGUF has rope_freqs (Llama-3.1 style rope scaling), which is not supported", path
            )
        if self.arch == "llama" and rot != head_dim:
            raise UserError(
                f"partial rotary ({rot} of {head_dim} dims) is not supported for llama GGUF", path
            )
        longrope = self._longrope(rot, path) if self.arch == "phi3" else None
        eos = [_field(r, "tokenizer.ggml.eos_token_id"), _field(r, "tokenizer.ggml.eot_token_id")]
        if tokens is not None:
            # turn/document-end control tokens stop generation too (SmolLM2's EOS is <|im_end|> only)
            from ..tokenizer import TURN_END_TOKENS

            types = r.fields.get("tokenizer.ggml.token_type")
            ctrl = [] if types is None else np.flatnonzero(np.asarray(types.contents()) == CONTROL_TOKEN_TYPE)
            eos += [int(i) for i in ctrl if _str_at(tokens, int(i)) in TURN_END_TOKENS]
        eos_ids = tuple(sorted({int(e) for e in eos if e is not None}))
        sw = self._opt("attention.sliding_window")
        bos = _field(r, "tokenizer.ggml.bos_token_id")
        pad = _field(r, "tokenizer.ggml.padding_token_id")
        return Phi3Config(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._req("feed_forward_length")),
            num_hidden_layers=int(self._req("block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            # GGUF stores it as float32 (1e-5 -> 9.99999975e-06); 7 significant digits give the source value
            rms_norm_eps=float(f"{float(self._opt('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
            rope_theta=float(self._opt("rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._opt("context_length", 4096)),
            partial_rotary_factor=rot / head_dim,
            longrope=longrope,
            sliding_window=int(sw) if sw else None,
            tie_word_embeddings="output.weight" not in self._tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            pad_token_id=None if pad is None else int(pad),
            source_arch=self.arch,
        )

    def _longrope(self, rot: int, path: Path) -> LongRope | None:
        long_t, short_t = (
            self._tensors.get("rope_factors_long.weight"),
            self._tensors.get("rope_factors_short.weight"),
        )
        if long_t is None and short_t is None:
            return None
        if long_t is None or short_t is None:
            raise UserError("GGUF has only one of rope_factors_long/rope_factors_short", path)
        orig = self._opt("rope.scaling.original_context_length")
        if orig is None:
            raise UserError("GGUF longrope factors without phi3.rope.scaling.original_context_length", path)
        long, short = (tuple(float(x) for x in self._dequant(t).reshape(-1)) for t in (long_t, short_t))
        if len(long) != rot // 2 or len(short) != rot // 2:
            raise UserError(
                f"GGUF rope factors have {len(long)}/{len(short)} entries, expected {rot // 2}", path
            )
        att = self._opt("rope.scaling.attn_factor")
        if att is None:
            import math

            factor = int(self._req("context_length")) / int(orig)
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(orig)))
        return LongRope(short, long, int(orig), float(att))

    # ---- tensor mapping ------------------------------------------------------------------------------------
    def _sources(self, name: str) -> list[str]:
        """GGUF tensors that make up one of our tensors (fused ones have several, in order)."""
        return list(gguf_names(name, self.arch))

    def _gguf_shape(self, gname: str) -> tuple[int, ...]:
        t = self._tensors[gname]
        # ggml lists dims innermost first ([in, out]); ours are numpy order ([out, in])
        return tuple(int(d) for d in reversed(list(t.shape)))

    def _validate(self) -> None:
        used: set[str] = set(ROPE_FACTOR_TENSORS)
        for name, shape in self._expected.items():
            parts = self._sources(name)
            for g in parts:
                if g not in self._tensors:
                    raise UserError(f"GGUF lacks tensor {g} (needed for {name})", self.path)
            shapes = [self._gguf_shape(g) for g in parts]
            fused = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
            if fused != shape or any(s[1:] != shapes[0][1:] for s in shapes):
                raise UserError(
                    f"tensor {'+'.join(parts)} has shape {[list(s) for s in shapes]}, "
                    f"metadata implies {list(shape)}",
                    self.path,
                )
            used.update(parts)
        extra = sorted(set(self._tensors) - used)
        if extra:
            raise UserError(
                f"unexpected GGUF tensor {extra[0]} ({len(extra)} in all) for a {self.arch} model", self.path
            )

    def _release_pages(self) -> None:
        """Drop this process's pages of the file map. Pages read stay mapped (and count in RSS) until the
        map closes, so a whole conversion would end up holding the file (2.2 GB for Phi-3-mini Q4_0);
        views of the map stay valid and fault their pages back in from the file when read again."""
        m = getattr(getattr(self._reader, "_map", None), "_mmap", None)
        if m is not None and hasattr(m, "madvise"):
            import mmap

            m.madvise(mmap.MADV_DONTNEED)

    def _dequant(self, t) -> np.ndarray:
        from gguf.quants import dequantize

        data = t.data
        fast = DEQUANT_INTO.get(t.tensor_type.name)
        if fast is not None and data.ndim == 2 and data.shape[1] % fast[0] == 0:
            block_bytes, block_weights, into = fast
            arr = np.empty((data.shape[0], data.shape[1] // block_bytes * block_weights), np.float32)

            def fast_rows(r0: int) -> None:
                with np.errstate(invalid="ignore", over="ignore"):  # a NaN scale is refused later, by name
                    into(data[r0 : r0 + _FAST_ROWS], arr[r0 : r0 + _FAST_ROWS])

            # the dequantization, not the quantizer after it, is what a conversion from these blocks waits on
            parallel_row_blocks(fast_rows, data.shape[0], _FAST_ROWS)
            return arr.reshape(self._gguf_shape(t.name))
        # gguf-py's dequantizers hold several full-size temporaries (a 32064 x 3072 Q4_0 embedding peaks at
        # ~1 GB): dequantize rows of blocks into one float32 output instead (blocks never span rows)
        rows = data.shape[0] if data.ndim == 2 else 1
        step = max(1, _DEQUANT_ELEMS // max(1, data.size // rows))
        try:
            if data.ndim != 2 or rows <= step:
                arr = np.ascontiguousarray(dequantize(data, t.tensor_type), dtype=np.float32)
            else:
                first = dequantize(data[:step], t.tensor_type)
                arr = np.empty((rows, *first.shape[1:]), np.float32)
                arr[:step] = first

                def block_rows(r0: int) -> None:
                    arr[r0 : r0 + step] = dequantize(data[r0 : r0 + step], t.tensor_type)

                parallel_row_blocks(block_rows, rows, step, start=step)
        except NotImplementedError as e:
            raise UserError(
                f"cannot dequantize {t.name} of type {t.tensor_type.name} ({e})", self.path
            ) from None
        arr = arr.reshape(self._gguf_shape(t.name))
        # F32 tensors come back as views of the read-only file mapping: hand out a private copy
        return arr if arr.flags.writeable else arr.copy()

    def _load(self, name: str) -> np.ndarray:
        self._release_pages()
        cfg = self.config
        parts = [self._dequant(self._tensors[g]) for g in self._sources(name)]
        if self.arch == "llama" and name.endswith("qkv_proj.weight"):
            q, k, v = parts
            parts = [
                unpermute_rows(q, cfg.num_attention_heads),
                unpermute_rows(k, cfg.num_key_value_heads),
                v,
            ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def tensor_type(self, name: str) -> str | None:
        """ggml type name (Q4_1, F32, ...) of our tensor `name`; None when its GGUF parts differ in type."""
        types = {self._tensors[g].tensor_type.name for g in self._sources(name)}
        return types.pop() if len(types) == 1 else None

    def raw_rows(self, name: str) -> tuple[str, np.ndarray] | None:
        """(ggml type name, (N, row bytes) uint8) of our 2-D tensor `name` as the GGUF stores it, fused and
        un-permuted like `_load` but on whole rows of blocks (a block never spans rows), so no value changes;
        None when its GGUF parts differ in type or it is not 2-D."""
        parts = [self._tensors[g] for g in self._sources(name)]
        types = {t.tensor_type for t in parts}
        if len(types) != 1 or len(self._expected[name]) != 2:
            return None
        self._release_pages()
        rows = [np.asarray(t.data).reshape(int(t.shape[-1]), -1) for t in parts]
        if self.arch == "llama" and name.endswith("qkv_proj.weight"):
            cfg = self.config
            rows[0] = unpermute_rows(rows[0], cfg.num_attention_heads)
            rows[1] = unpermute_rows(rows[1], cfg.num_key_value_heads)
        out = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
        return parts[0].tensor_type.name, np.ascontiguousarray(out)

    # ---- ModelSource ---------------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._expected)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._expected[name]

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._check_names(names):
            yield name, require_finite(name, self._load(name), self.path)

    def gguf_tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> ggml type name (Q4_1, Q8_0, F32, ...), for inspection."""
        return {n: t.tensor_type.name for n, t in self._tensors.items()}

    def gguf_metadata(self, key: str, default: Any = None) -> Any:
        return _field(self._reader, key, default)

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        if self._tokenizer is None:  # rebuilding the BPE from 49k merges takes ~0.5 s: do it once
            keys = [k for k in self._reader.fields if k.startswith("tokenizer.")]
            fields = {k: _field(self._reader, k) for k in keys}
            self._tokenizer = Tokenizer.from_gguf_fields(fields, self.path)
        return self._tokenizer
