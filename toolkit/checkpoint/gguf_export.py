"""Write a GGUF that llama.cpp (and Ollama) load, from any model our checkpoint readers open.

Layout follows llama.cpp's `phi3` architecture (its convert_hf_to_gguf.py Phi3MiniModel): fused
`attn_qkv`, fused `ffn_up` with the gate rows first, Q/K kept in Hugging Face rotate-half order
(llama.cpp's phi3 uses NEOX rope, so nothing is permuted), longrope factors as the global
`rope_factors_long/short` tensors. 2-D weights are Q4_0 or F16, norms and rope factors stay F32. Tensors
are streamed: the header is written from the shapes alone, then each tensor is read, encoded and written
before the next one is read, so memory is bounded by one tensor."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Phi3Config
from ..errors import UserError
from ..outputs import write_error
from .gguf_names import EXPORT_ARCH, EXPORT_QTYPES, ROPE_FACTOR_TENSORS, gguf_tensor_name

ARCH, QTYPES = EXPORT_ARCH, EXPORT_QTYPES
Q4_0_BLOCK = 32


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from (`source`, an HF name or None) and how it is stored."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols) = HF (out, in)
    ggml_type: Any  # gguf.GGMLQuantizationType
    source: str | None

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        n = int(np.prod(self.shape))
        return n // block * size

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The numpy shape of the encoded data (uint8 rows for block-quantized types)."""
        import gguf

        if self.ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return self.shape
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    @property
    def numpy_dtype(self) -> np.dtype:
        import gguf

        return {
            gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
            gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
        }.get(self.ggml_type, np.dtype(np.uint8))


@dataclass
class Vocab:
    """The tokenizer as GGUF stores it (`tokenizer.ggml.*`)."""

    model: str  # "llama" (sentencepiece-style BPE) | "gpt2" (byte-level BPE)
    pre: str  # llama.cpp pre-tokenizer name; only read for "gpt2"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    source: str = "tokenizer.json"  # where it came from: tokenizer.json | gguf | placeholder
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    path: Path
    qtype: str
    n_tensors: int
    nbytes: int
    vocab_source: str  # "tokenizer.json" | "gguf" | "placeholder"
    warnings: list[str]


# ---- plan (tensor names: `gguf_names`, shared with the reader) --------------------------------------------


def _ggml_type(qtype: str, shape: tuple[int, ...]):
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32  # norms: tiny, and llama.cpp keeps them F32 too
    if qtype == "f16":
        return T.F16
    if shape[-1] % Q4_0_BLOCK:
        raise UserError(f"Q4_0 needs rows that are a multiple of {Q4_0_BLOCK}; a tensor has shape {shape}")
    return T.Q4_0


def check_supported(cfg: Phi3Config) -> None:
    """What llama.cpp's phi3 graph cannot express is refused here rather than written and mis-run."""
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        raise UserError(
            f"llama.cpp's phi3 architecture needs heads*head_dim == hidden_size "
            f"({cfg.num_attention_heads}*{cfg.head_dim} != {cfg.hidden_size})"
        )


def plan_tensors(
    cfg: Phi3Config, hf_names: Iterable[str], shapes: Callable[[str], tuple[int, ...]], qtype: str
) -> list[PlannedTensor]:
    """GGUF tensors in file order: the model's own (renamed), then the longrope factors if it has them."""
    import gguf

    if qtype not in QTYPES:
        raise UserError(f"unknown --type {qtype!r}; choose one of {', '.join(QTYPES)}")
    plan = []
    for name in hf_names:
        shape = tuple(int(s) for s in shapes(name))
        plan.append(PlannedTensor(gguf_tensor_name(name), shape, _ggml_type(qtype, shape), name))
    if cfg.longrope is not None:
        n = cfg.rotary_dim // 2
        for name in ROPE_FACTOR_TENSORS:  # long, then short
            plan.append(PlannedTensor(name, (n,), gguf.GGMLQuantizationType.F32, None))
    return plan


def encode(arr: np.ndarray, t: PlannedTensor) -> np.ndarray:
    """float32 values -> the bytes GGUF stores for `t` (Q4_0 via gguf.quants, the reference code)."""
    import gguf

    if tuple(arr.shape) != t.shape:
        raise UserError(f"tensor {t.source} has shape {tuple(arr.shape)}, expected {t.shape}")
    T = gguf.GGMLQuantizationType
    if t.ggml_type == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if t.ggml_type == T.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t.ggml_type)


# ---- metadata -------------------------------------------------------------------------------------------


def add_model_metadata(writer, cfg: Phi3Config, qtype: str, name: str | None) -> None:
    """The phi3.* hyper-parameters llama.cpp reads (same keys and meanings as convert_hf_to_gguf.py)."""
    import gguf

    if name:
        writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    # 0 = none; llama.cpp uses 0 to tell Phi-4 (full attention) from Phi-3 (and currently ignores the window)
    writer.add_sliding_window(cfg.sliding_window or 0)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.longrope is not None:
        # llama.cpp picks the long factors when the context exceeds this length (HF picks them per sequence)
        writer.add_rope_scaling_orig_ctx_len(cfg.longrope.original_max_position_embeddings)
        writer.add_rope_scaling_attn_factors(cfg.longrope.attention_factor)
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "f16": gguf.LlamaFileType.MOSTLY_F16}[qtype]
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos_id, writer.add_bos_token_id),
        (vocab.eos_id, writer.add_eos_token_id),
        (vocab.unk_id, writer.add_unk_token_id),
        (vocab.pad_id, writer.add_pad_token_id),
    ):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---- tokenizer ------------------------------------------------------------------------------------------

# pre-tokenizer regexes of tokenizer.json -> llama.cpp's name for the same pre-tokenizer
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_PREFIX = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"


def _pre_tokenizer_parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _pre_tokenizer_parts(sub)]
    return [pre]


def _llama_cpp_pre_name(tok: dict) -> tuple[str, str | None]:
    """The llama.cpp pre-tokenizer that splits text like this tokenizer.json, and a warning if none does."""
    parts = _pre_tokenizer_parts(tok.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    regexes = [(p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    byte_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    if any(r.startswith(_GPT4O_PREFIX) for r in regexes):
        return "gpt-4o", None
    if _LLAMA3_RE in regexes:
        return "llama-bpe", None
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and digits and byte_regex:
        return "smollm", None
    return "default", (
        f"pre-tokenizer {kinds} is not one llama.cpp knows by name; wrote 'default', so llama.cpp "
        "may split some texts differently from the source tokenizer (token ids are unaffected)"
    )


def _merge_strings(merges: list) -> list[str]:
    # tokenizers >= 0.20 may store merges as pairs instead of "a b" strings
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def vocab_from_tokenizer_json(tok_dir: Path, cfg: Phi3Config) -> Vocab:
    """Build the GGUF vocab from a Hugging Face tokenizer.json (+ tokenizer_config.json when present)."""
    import gguf

    TT = gguf.TokenType
    path = tok_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tokenizer ({e})", path) from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"tokenizer model {model.get('type')!r} is not supported for GGUF export (BPE only)", path
        )
    vocab: dict[str, int] = model["vocab"]
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    n = max(cfg.vocab_size, max(vocab.values(), default=-1) + 1, max(added, default=-1) + 1)
    if n > cfg.vocab_size:
        raise UserError(
            f"tokenizer has ids up to {n - 1} but the model's vocab_size is {cfg.vocab_size}", path
        )
    tokens: list[str | None] = [None] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    for i, a in added.items():
        tokens[i] = a["content"]

    sentencepiece_style = bool(model.get("byte_fallback"))
    merges = _merge_strings(model.get("merges", []))
    unk_piece = model.get("unk_token")
    types, scores = [], []
    rank_of = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
    for i in range(n):
        piece = tokens[i]
        if piece is None:
            tokens[i] = f"[PAD{i}]"
            types.append(TT.UNUSED)
            scores.append(-10000.0)
            continue
        # byte-fallback pieces are BYTE even when listed as added tokens: llama.cpp maps raw bytes to them
        if sentencepiece_style and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types.append(TT.BYTE)
            scores.append(0.0)
        elif piece == unk_piece:
            types.append(TT.UNKNOWN)
            scores.append(0.0)
        elif i in added:
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
            scores.append(0.0)
        else:
            types.append(TT.NORMAL)
            # llama.cpp's SPM tokenizer merges the highest-scoring bigram first: score = -(merge rank)
            scores.append(-float(rank_of.get(piece, 0)))

    tcfg: dict[str, Any] = {}
    tcfg_path = tok_dir / "tokenizer_config.json"
    if tcfg_path.is_file():
        try:
            tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"not valid JSON ({e})", tcfg_path) from None
    template = tcfg.get("chat_template")
    warnings: list[str] = []
    if sentencepiece_style:
        name, pre, warn = "llama", "default", None
    else:
        name = "gpt2"
        pre, warn = _llama_cpp_pre_name(tok)
    if warn:
        warnings.append(warn)
    unk_id = vocab.get(unk_piece) if unk_piece else None
    return Vocab(
        model=name,
        pre=pre,
        tokens=[str(t) for t in tokens],
        types=[int(t) for t in types],
        scores=scores if name == "llama" else None,
        merges=merges if name == "gpt2" else None,
        bos_id=cfg.bos_token_id,
        eos_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        unk_id=unk_id,
        pad_id=cfg.pad_token_id,
        add_bos=bool(tcfg.get("add_bos_token", False)),
        add_eos=bool(tcfg.get("add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        warnings=warnings,
    )


def placeholder_vocab(cfg: Phi3Config) -> Vocab:
    """Token `i` is the text `<tok_i>`: llama.cpp loads the model and runs token ids but cannot tokenize.

    A few ids get the Phi-3 special texts (0 <unk>, 1 <s>, 2 </s>, the eos id <|endoftext|>): llama.cpp looks
    these four up by text when the model's name contains "phi3"/"phi-3" and fails to load without them."""
    import gguf

    n = cfg.vocab_size
    tokens = [f"<tok_{i}>" for i in range(n)]
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    if n >= 4:
        tokens[0], tokens[1], tokens[2] = "<unk>", "<s>", "</s>"
        tokens[eos if eos is not None and 2 < eos < n else n - 1] = "<|endoftext|>"
    special = {i for i in (cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_ids) if i is not None}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(n)]
    return Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=[0.0] * n,
        bos_id=cfg.bos_token_id,
        eos_id=eos,
        pad_id=cfg.pad_token_id,
        source="placeholder",
        warnings=["the model has no tokenizer.json: wrote placeholder tokens (text in/out will not work)"],
    )


def vocab_from_gguf(path: Path, cfg: Phi3Config) -> Vocab:
    """Copy the tokenizer of a source GGUF unchanged: it is already in llama.cpp's form."""

    from .gguf_source import read_gguf

    fields = read_gguf(path).fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    tokens = get("tokens")
    if not tokens:
        return placeholder_vocab(cfg)
    if len(tokens) != cfg.vocab_size:
        raise UserError(f"GGUF has {len(tokens)} tokens but vocab_size {cfg.vocab_size}", path)
    template = fields.get("tokenizer.chat_template")
    return Vocab(
        model=get("model", "llama"),
        pre=get("pre", "default"),
        tokens=list(tokens),
        types=[int(t) for t in get("token_type", [1] * len(tokens))],
        scores=get("scores"),
        merges=get("merges"),
        bos_id=get("bos_token_id"),
        eos_id=get("eos_token_id"),
        unk_id=get("unknown_token_id"),
        pad_id=get("padding_token_id"),
        add_bos=bool(get("add_bos_token", False)),
        add_eos=bool(get("add_eos_token", False)),
        chat_template=None if template is None else template.contents(),
        source="gguf",
    )


def model_vocab(src) -> Vocab:
    """The source's tokenizer: tokenizer.json, a source GGUF's, or its Tokenizer's; else placeholders."""
    cfg: Phi3Config = src.config
    folder = src.path if src.path.is_dir() else src.path.parent
    if src.kind == "hf" and (folder / "tokenizer.json").is_file():
        return vocab_from_tokenizer_json(folder, cfg)
    if src.kind == "gguf":
        return vocab_from_gguf(src.path, cfg)
    try:
        tokenizer = src.tokenizer()
    except (UserError, ImportError):
        return placeholder_vocab(cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        if (Path(tmp) / "tokenizer.json").is_file():
            return vocab_from_tokenizer_json(Path(tmp), cfg)
    return placeholder_vocab(cfg)


_PHI3_NAMED_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _llama_cpp_accepts_name(name: str, vocab: Vocab) -> bool:
    """llama.cpp (llama-vocab.cpp) sets Phi-3 token attributes when general.name contains "phi3" or "phi-3",
    with `token_to_id.at(...)` on four texts: a vocabulary without one of them fails to load."""
    lowered = name.lower()
    if "phi3" not in lowered and "phi-3" not in lowered:
        return True
    return set(_PHI3_NAMED_TOKENS) <= set(vocab.tokens)


# ---- writing --------------------------------------------------------------------------------------------


def write_gguf(
    out: str | Path,
    cfg: Phi3Config,
    vocab: Vocab,
    plan: list[PlannedTensor],
    data: Iterator[np.ndarray],
    *,
    qtype: str,
    name: str,
    progress: Callable[[int, int, PlannedTensor], None] | None = None,
) -> int:
    """Write the GGUF: header from `plan`, then each encoded array of `data` in plan order; returns its size.

    Written to a temporary name in the same folder and renamed at the end, so a partial file never looks done.
    """
    import gguf

    check_supported(cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    name_ok = _llama_cpp_accepts_name(name, vocab)
    if not name_ok:
        vocab.warnings.append(
            f"general.name {name!r} left out: llama.cpp looks up <unk>, <s>, </s> and <|endoftext|> for "
            "models named phi3/phi-3 and this vocabulary lacks some of them"
        )
    try:
        add_model_metadata(writer, cfg, qtype, name if name_ok else None)
        add_vocab(writer, vocab)
        for t in plan:
            writer.add_tensor_info(t.name, t.byte_shape, t.numpy_dtype, t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        count = 0
        for t in plan:
            arr = next(data, None)
            if arr is None:
                raise RuntimeError(f"tensor data ended before {t.name}")
            if arr.nbytes != t.nbytes or arr.dtype != t.numpy_dtype:
                raise RuntimeError(
                    f"{t.name}: encoded {arr.dtype} {arr.nbytes} B, planned {t.numpy_dtype} {t.nbytes} B"
                )
            writer.write_tensor_data(arr)
            count += 1
            if progress is not None:
                progress(count, len(plan), t)
        if next(data, None) is not None:
            raise RuntimeError("more tensor data than planned tensors")
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        try:
            writer.close()
        except OSError:
            pass  # closing flushes: on a full disk that fails too, and the partial file goes anyway
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(e, out) from None
        raise
    return out.stat().st_size


def export_gguf(
    model: str | Path | None,
    out: str | Path,
    *,
    qtype: str = "q4_0",
    progress: Callable[[int, int, PlannedTensor], None] | None = None,
) -> ExportResult:
    """Export a model (HF folder, GGUF, converter output, or None for the default model) to a phi3 GGUF."""
    from . import open_model

    src = open_model(model)
    cfg: Phi3Config = src.config
    check_supported(cfg)
    names = src.tensor_names()
    plan = plan_tensors(cfg, names, src.tensor_shape, qtype)
    vocab = model_vocab(src)
    lr = cfg.longrope

    def data() -> Iterator[np.ndarray]:
        by_source = {t.source: t for t in plan if t.source is not None}
        for hf_name, arr in src.iter_tensors(names):
            yield encode(arr, by_source[hf_name])
        if lr is not None:
            yield np.asarray(lr.long_factor, dtype=np.float32)
            yield np.asarray(lr.short_factor, dtype=np.float32)

    label = src.path.name if src.path.is_dir() else src.path.stem
    nbytes = write_gguf(out, cfg, vocab, plan, data(), qtype=qtype, name=label, progress=progress)
    return ExportResult(
        path=Path(out),
        qtype=qtype,
        n_tensors=len(plan),
        nbytes=nbytes,
        vocab_source=vocab.source,
        warnings=list(vocab.warnings),
    )
