"""The files swift-transformers loads next to an exported `.mlpackage`: tokenizer.json, tokenizer_config.json
and config.json (see `swift_transformers.py`), so `AutoTokenizer.from(modelFolder:)` works offline.

One path for every source: the toolkit's tokenizer (HF tokenizer.json as is, or rebuilt from a GGUF
vocabulary) is serialised by the `tokenizers` library. Two adjustments for swift-transformers' encoder and its
generation loop:
- BOS: the toolkit adds BOS itself, swift-transformers only through tokenizer.json's post-processor; when the
  model wants BOS and the post-processor does not add it (GGUF-built tokenizers), a template adding it is set.
- EOS: generation stops on exactly one id, the tokenizer's `eos_token`. For chat models that is the turn end
  (`<|end|>` for Phi-3), not `<|endoftext|>`, or replies run on into invented turns. All EOS ids stay in
  `toolkit_eos_token_ids` for our own tools.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..tokenizer import TURN_END_TOKENS, Tokenizer
from .swift_transformers import TOKENIZER_FILES


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path) from None
    return d if isinstance(d, dict) else {}


def stop_token_id(tok: Tokenizer) -> int | None:
    """The one EOS id swift-transformers will stop on: the chat turn end if the model has one."""
    for name in TURN_END_TOKENS:
        tid = tok.token_to_id(name)
        if tid is not None and tid in tok.eos_token_ids:
            return tid
    return min(tok.eos_token_ids) if tok.eos_token_ids else None


def _tokenizer_json(tok: Tokenizer) -> str:
    import tokenizers
    from tokenizers.processors import TemplateProcessing

    tk = tokenizers.Tokenizer.from_str(tok.backend.to_str())  # a copy: the source's tokenizer stays as it is
    bos = tok.bos_token_id
    if tok.add_bos and bos is not None:
        adds = tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
        if not adds:
            piece = tk.id_to_token(bos)
            tk.post_processor = TemplateProcessing(
                single=f"{piece} $A", pair=f"{piece} $A {piece} $B", special_tokens=[(piece, bos)]
            )
    return tk.to_str(pretty=False)


def _tokenizer_class(tok: Tokenizer, source_class: str | None) -> str:
    if source_class:
        return source_class
    # swift-transformers picks its model by this name; byte-level BPE is GPT-2's, byte-fallback BPE Llama's
    model = json.loads(tok.backend.to_str()).get("model", {})
    return "LlamaTokenizer" if model.get("byte_fallback") else "GPT2Tokenizer"


def write_model_folder(src, out_dir: Path, *, context: int) -> list[Path]:
    """Write the tokenizer and config files for `src` (a ModelSource) into `out_dir`; returns their paths."""
    tok = src.tokenizer()
    hf_dir = src.path if src.kind == "hf" else None
    tc = _read_json(hf_dir / "tokenizer_config.json") if hf_dir else {}
    eos = stop_token_id(tok)
    bos = tok.bos_token_id
    tc.update(
        {
            "tokenizer_class": _tokenizer_class(tok, tc.get("tokenizer_class")),
            "bos_token": None if bos is None else tok.id_to_token(bos),
            "eos_token": None if eos is None else tok.id_to_token(eos),
            "add_bos_token": tok.add_bos,
            "add_eos_token": False,
            "model_max_length": context,
            "toolkit_eos_token_ids": sorted(tok.eos_token_ids),
        }
    )
    if tok.chat_template and not isinstance(tc.get("chat_template"), str | list):
        tc["chat_template"] = tok.chat_template
    tc.pop("added_tokens_decoder", None)  # duplicates tokenizer.json's added_tokens; ids must not disagree

    cfg = src.config
    config = _read_json(hf_dir / "config.json") if hf_dir else {}
    if not config:
        config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": cfg.vocab_size}
    # swift-transformers reads single integers here (LanguageModel.bosTokenId / eosTokenId)
    config["bos_token_id"] = bos
    config["eos_token_id"] = eos

    texts = {
        "tokenizer.json": _tokenizer_json(tok),
        "tokenizer_config.json": json.dumps(tc, indent=2, ensure_ascii=False),
        "config.json": json.dumps(config, indent=2, ensure_ascii=False),
    }
    assert tuple(texts) == TOKENIZER_FILES
    paths = []
    for name, text in texts.items():
        _atomic_write(out_dir / name, text)
        paths.append(out_dir / name)
    return paths
