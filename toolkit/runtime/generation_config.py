"""Generation defaults from the checkpoint: generation_config.json (transformers' meaning) for a HF folder,
mlc-chat-config.json for a converted one, the embedded model's own (default_model.py); the toolkit's defaults
otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .options import GenerationOptions, OptionsError


def _read(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", path) from None
    return d if isinstance(d, dict) else {}


def generation_defaults(path: Path, base: GenerationOptions | None = None) -> GenerationOptions:
    base = base or GenerationOptions()
    path = Path(path)
    if not path.is_dir():
        from ..default_model import SAMPLING_DEFAULTS, is_default_model

        return base.replace(**SAMPLING_DEFAULTS) if is_default_model(path) else base
    changes: dict[str, Any] = {}
    gc = path / "generation_config.json"
    mlc = path / "mlc-chat-config.json"
    if gc.is_file():
        d = _read(gc)
        # transformers samples only with do_sample (default False): otherwise greedy, whatever the temperature
        changes["temperature"] = d.get("temperature", 1.0) if d.get("do_sample") else 0.0
        for key in ("top_p", "top_k", "repetition_penalty"):
            changes[key] = d.get(key)
        changes["max_tokens"] = d.get("max_new_tokens")
        where = gc
    elif mlc.is_file():
        d = _read(mlc)
        for key in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            changes[key] = d.get(key)
        where = mlc
    else:
        return base
    try:
        return base.replace(**changes)
    except OptionsError as e:
        raise UserError(f"bad generation default: {e}", where) from None
