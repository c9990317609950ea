"""Tokenizers for our models, all through the `tokenizers` library.

Sources: a folder's `tokenizer.json` (+ optional tokenizer_config.json / generation_config.json), or a GGUF
vocabulary (byte-level BPE `gpt2`, or SentencePiece-style `llama`) rebuilt into a `tokenizers.Tokenizer`.
BOS is added by us (never by the tokenizer's post-processor) so `add_bos` means the same for every source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import tokenizers

    from .config import Phi3Config

# special tokens that end a turn or a document in the families we run; counted as EOS when the tokenizer has
# them as special (added) tokens
TURN_END_TOKENS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")

# llama.cpp pre-tokenizer names (GGUF `tokenizer.ggml.pre`) -> regex splits applied before byte-level BPE.
# The GPT-2 regex itself is ByteLevel(use_regex=True).
_GPT2 = None
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    # name: (extra regex split or "digits" for one-digit splits, whether ByteLevel applies the GPT-2 regex)
    "default": (_GPT2, True),
    "gpt-2": (_GPT2, True),
    "gpt2": (_GPT2, True),
    "smollm": ("digits", True),  # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 regex
    "llama-bpe": (_LLAMA3_REGEX, False),
    "llama3": (_LLAMA3_REGEX, False),
}


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def is_text(s: str) -> bool:
    """Whether `s` is text a tokenizer takes: bytes that were not UTF-8 reach Python as lone surrogates
    (argv, a surrogateescape stdin, a JSON escape such as \\ud800), which the tokenizers library refuses
    with a bare TypeError."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Tokenizer:
    """Encode/decode text, with the model's BOS/EOS conventions."""

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        self._tk = tk
        self.bos_token_id = bos_token_id
        special = {tid for tid, t in tk.get_added_tokens_decoder().items() if t.special}
        ids = set(eos_token_ids)
        for s in TURN_END_TOKENS:
            tid = tk.token_to_id(s)
            if tid is not None and tid in special:
                ids.add(tid)
        self.eos_token_ids: set[int] = ids
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.chat_template = chat_template  # the source's Jinja text, kept for save(); None if unknown

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path, config: Phi3Config | None = None) -> Tokenizer:
        """Load `tokenizer.json` from a folder; BOS/EOS from tokenizer_config.json and the config."""
        import tokenizers

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise UserError("no tokenizer.json in the model folder", path)
        try:
            tk = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"cannot load tokenizer ({str(e).splitlines()[0]})", tj) from None
        tc = _read_json(path / "tokenizer_config.json")
        gc = _read_json(path / "generation_config.json")

        bos_id = _special_id(tk, tc.get("bos_token"))
        if bos_id is None and config is not None and config.bos_token_id is not None:
            bos_id = int(config.bos_token_id)
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        else:
            # no explicit setting: follow what the tokenizer.json post-processor would have done
            add_bos = _post_processor_adds_bos(tk, bos_id)
        eos: set[int] = set(config.eos_token_ids) if config is not None else set()
        for v in (gc.get("eos_token_id"), tc.get("toolkit_eos_token_ids")):
            eos.update(int(x) for x in (v if isinstance(v, list) else [v]) if x is not None)
        eos_id = _special_id(tk, tc.get("eos_token"))
        if eos_id is not None:
            eos.add(eos_id)
        chat = tc.get("chat_template")
        tok = cls(
            tk,
            bos_token_id=bos_id,
            eos_token_ids=eos,
            add_bos=add_bos,
            chat_template=chat if isinstance(chat, str) else None,
        )
        if config is not None:
            top = max(tk.get_vocab(with_added_tokens=True).values(), default=-1)
            if top >= config.vocab_size:
                raise UserError(
                    f"tokenizer has token id {top}, but the model's vocab_size is {config.vocab_size}", tj
                )
        return tok

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer from GGUF `tokenizer.ggml.*` metadata (values already decoded)."""
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise UserError("GGUF file carries no tokenizer vocabulary (tokenizer.ggml.tokens)", path)
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if model == "gpt2":
            tk = _gguf_bpe(tokens, fields.get("tokenizer.ggml.merges") or [], fields, path)
        elif model == "llama":
            tk = _gguf_spm(tokens, fields.get("tokenizer.ggml.scores"), types, fields)
        else:
            raise UserError(
                f"unsupported GGUF tokenizer model {model!r}; supported: gpt2 (BPE), llama (SPM)", path
            )
        from tokenizers import AddedToken

        # control (3) and user-defined (4) tokens must never be split by BPE: register them as special
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if int(t) in (3, 4)
        ]
        tk.add_special_tokens(specials)
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eot = fields.get("tokenizer.ggml.eot_token_id")
        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = model == "llama"  # llama.cpp's default for SPM vocabularies
        return cls(
            tk,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids={int(x) for x in (eos, eot) if x is not None},
            add_bos=bool(add_bos),
            chat_template=fields.get("tokenizer.chat_template"),
        )

    # ---- use -----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids (as in chat templates)."""
        try:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str) and not is_text(text):  # checked only when refused: encode is per prompt
                raise UserError("the text holds bytes that are not UTF-8 (lone surrogates)") from None
            raise
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tk.id_to_token(tid)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (BOS/EOS conventions) into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "add_bos_token": self.add_bos,
            "bos_token": None if self.bos_token_id is None else self._tk.id_to_token(self.bos_token_id),
            "eos_token": None,
            "toolkit_eos_token_ids": sorted(self.eos_token_ids),
        }
        # the first EOS id that is a real token names eos_token, for tools that read tokenizer_config
        for tid in sorted(self.eos_token_ids):
            if self._tk.id_to_token(tid) is not None:
                cfg["eos_token"] = self._tk.id_to_token(tid)
                break
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        _atomic_write(out / "tokenizer.json", self._tk.to_str(pretty=False))
        _atomic_write(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))


class StreamDecoder:
    """Turns a stream of token ids into printable text deltas.

    Decodes a short window of already-printed tokens together with the new ones and emits only the new text,
    so tokenizers that strip a leading space per call (SentencePiece) stay right, and holds back output while
    it ends in U+FFFD (a UTF-8 character whose bytes are split across tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here have been printed

    def feed(self, ids: int | Iterable[int]) -> str:
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        now = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character shows as U+FFFD)."""
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        now = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return now[len(before) :] if now.startswith(before) else now


# ---- helpers -----------------------------------------------------------------------------------------------
def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", p) from None
    return d if isinstance(d, dict) else {}


def _special_id(tk: tokenizers.Tokenizer, tok: Any) -> int | None:
    content = _token_content(tok)
    return None if content is None else tk.token_to_id(content)


def _post_processor_adds_bos(tk: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    if bos_id is None or tk.post_processor is None:
        return False
    with_special = tk.encode("a", add_special_tokens=True).ids
    return (
        bool(with_special)
        and with_special[0] == bos_id
        and tk.encode("a", add_special_tokens=False).ids[:1] != [bos_id]
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _gguf_bpe(tokens: list[str], merges: list[str], fields: dict[str, Any], path: str | Path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UserError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}",
            path,
        )
    split, gpt2_regex = GGUF_PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    steps = []
    if split == "digits":
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    elif split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tk.decoder = decoders.ByteLevel()
    return tk


def _gguf_spm(tokens: list[str], scores: list[float] | None, types: list[int], fields: dict[str, Any]):
    """SentencePiece-BPE vocabulary (llama.cpp `llama` model) as a tokenizers BPE with byte fallback.

    Merges are derived from the scores the way transformers' SentencePieceExtractor does it: every token that
    splits into two vocabulary pieces gives a merge, ranked by the merged token's score.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    score = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    normal = [i for i, t in enumerate(types) if int(t) == 1]
    merges: list[tuple[float, int, int, str, str]] = []
    for i in normal:
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score[i], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    tk = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(m[3], m[4]) for m in merges],
            unk_token=None if unk is None else tokens[int(unk)],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    norm = [normalizers.Replace(" ", "\u2581")]
    add_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    if add_prefix:
        norm.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    return tk
