"""The non-weight half of a converted folder, as MLC-LLM's `gen_config` makes it: tokenizer files copied from
the checkpoint (or, for GGUF, a tokenizer.json built from its metadata) and mlc-chat-config.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint.mlc_format import (
    SYSTEM_DEFAULTS,
    TOKENIZER_FILES,
    MLCChatConfig,
    default_window_sizes,
    detect_tokenizer_info,
    mlc_model_config,
    mlc_sliding_window_size,
    mlc_template,
    mlc_template_name,
    model_type_of,
)
from ..errors import UserError
from ..quantization import QuantScheme

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

# files gen_config reads generation defaults from, first one wins per key
GENERATION_SOURCES = ("generation_config.json", "config.json")


def write_tokenizer_files(source: ModelSource, out_dir: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files byte for byte into `out_dir`; without a tokenizer.json (GGUF),
    write one from the tokenizer we run, so the folder is self-contained. Returns the names, MLC's order."""
    written: set[str] = set()
    if source.path.is_dir():
        for name in TOKENIZER_FILES:
            src = source.path / name
            if src.is_file():
                tmp = out_dir / (name + ".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, out_dir / name)
                written.add(name)
    if "tokenizer.json" not in written:
        # only a GGUF gets here with a tokenizer (folder sources need a tokenizer.json to have one at all);
        # save() writes tokenizer.json and tokenizer_config.json (BOS/EOS conventions, chat template)
        source.tokenizer().save(out_dir)
        written |= {"tokenizer.json", "tokenizer_config.json"}
    return [n for n in TOKENIZER_FILES if n in written]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path) from None
    return d if isinstance(d, dict) else {}


def generation_defaults(source: ModelSource) -> dict[str, Any]:
    """temperature, penalties, top_p and pad/bos/eos ids: from generation_config.json then config.json (a
    GGUF's metadata plays config.json's part), then MLC's system defaults."""
    found: dict[str, Any] = {}
    if source.path.is_dir():
        for name in GENERATION_SOURCES:
            if (source.path / name).is_file():
                for key, value in _read_json(source.path / name).items():
                    if key in SYSTEM_DEFAULTS and value is not None:
                        found.setdefault(key, value)
    elif source.kind == "gguf":
        # the ids the file declares (not the turn-end tokens our runtime also stops on)
        meta = source.gguf_metadata  # type: ignore[attr-defined]
        eos = [
            int(v)
            for v in (meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.eot_token_id"))
            if v is not None
        ]
        ids = {
            "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
            "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
            "eos_token_id": (eos[0] if len(set(eos)) == 1 else sorted(set(eos))) if eos else None,
        }
        found.update(
            {k: int(v) if isinstance(v, (int, np.integer)) else v for k, v in ids.items() if v is not None}
        )
    return {k: found.get(k, default) for k, default in SYSTEM_DEFAULTS.items()}


def _active_vocab_size(out_dir: Path, vocab_size: int) -> int:
    """Tokens the tokenizer can produce (added ones included), as MLC counts them; the model's vocab without
    a tokenizer.json."""
    import tokenizers

    tj = out_dir / "tokenizer.json"
    if not tj.is_file():
        return vocab_size
    return tokenizers.Tokenizer.from_file(str(tj)).get_vocab_size(with_added_tokens=True)


def gen_chat_config(
    source: ModelSource,
    scheme: QuantScheme,
    out_dir: Path,
    tokenizer_files: list[str],
    *,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    toolkit_info: dict[str, Any] | None = None,
) -> MLCChatConfig:
    """mlc-chat-config.json for `source` converted with `scheme`; tokenizer files already in `out_dir`."""
    cfg = source.config
    context, prefill = default_window_sizes(cfg, context_window_size, prefill_chunk_size)
    tj = out_dir / "tokenizer.json"
    return MLCChatConfig(
        model_type=model_type_of(cfg),
        quantization=scheme.name,
        model_config=mlc_model_config(cfg, context, prefill),
        vocab_size=cfg.vocab_size,
        context_window_size=context,
        sliding_window_size=mlc_sliding_window_size(cfg),
        prefill_chunk_size=prefill,
        attention_sink_size=-1,
        tensor_parallel_shards=1,
        pipeline_parallel_stages=1,
        active_vocab_size=_active_vocab_size(out_dir, cfg.vocab_size),
        tokenizer_files=tokenizer_files,
        tokenizer_info=detect_tokenizer_info(_read_json(tj) if tj.is_file() else None),
        conv_template=mlc_template(mlc_template_name(source.conv_template, cfg.vocab_size)),
        model_task="chat",
        toolkit={**(toolkit_info or {}), "conv_template": source.conv_template},
        **generation_defaults(source),
    )
