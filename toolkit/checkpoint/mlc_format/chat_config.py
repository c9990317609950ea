"""`mlc-chat-config.json` as a typed schema: the chat config, its conversation template and tokenizer info.

Field names, types and defaults are those of MLC-LLM's `MLCChatConfig` / `Conversation` pydantic models and
its C++ `TokenizerInfo` (commit pinned in `__init__.py`), so a file that validates here is one MLC's runtimes
load. Unknown keys are ignored on read, as MLC does (newer MLC versions may add fields).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import UserError

CHAT_CONFIG = "mlc-chat-config.json"
# MLC's MLC_CHAT_CONFIG_VERSION
MLC_CHAT_CONFIG_VERSION = "0.1.0"
# what MLC's gen_config fills in when neither generation_config.json nor config.json sets a value
SYSTEM_DEFAULTS: dict[str, Any] = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "temperature": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
}
# the placeholder a system template's message goes into (MLC's MessagePlaceholders.SYSTEM)
SYSTEM_PLACEHOLDER = "{system_message}"


def _default_role_templates() -> dict[str, str]:
    # MLC's Conversation starts from these and lets a template override them
    return {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"}


class Conversation(BaseModel):
    """MLC's conversation template: how a chat is rendered into a prompt, and when generation stops."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    system_template: str = SYSTEM_PLACEHOLDER
    system_message: str = ""
    system_prefix_token_ids: list[int] | None = None
    add_role_after_system_message: bool = True
    roles: dict[str, str]
    role_templates: dict[str, str] = Field(default_factory=_default_role_templates)
    messages: list[tuple[str, str | list[dict] | None]] = Field(default_factory=list)
    seps: list[str]
    role_content_sep: str = ""
    role_empty_sep: str = ""
    stop_str: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    strip_reasoning_in_history: bool = False
    function_string: str = ""
    use_function_calling: bool = False

    @field_validator("seps")
    @classmethod
    def _one_or_two_seps(cls, seps: list[str]) -> list[str]:
        if not 1 <= len(seps) <= 2:
            raise ValueError("seps must have 1 or 2 entries")
        return seps


class TokenizerInfo(BaseModel):
    """How MLC's runtime post-processes tokens (its C++ TokenizerInfo; these are its defaults)."""

    model_config = ConfigDict(extra="ignore")

    token_postproc_method: Literal["byte_fallback", "byte_level"] = "byte_fallback"
    prepend_space_in_encode: bool = False
    strip_space_in_decode: bool = False


class MLCChatConfig(BaseModel):
    """The whole `mlc-chat-config.json`. Python names differ from the JSON keys only where pydantic reserves
    the `model_` prefix; dump with `to_json()` (JSON keys, MLC's field order)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())

    version: str = MLC_CHAT_CONFIG_VERSION
    arch: str = Field(alias="model_type")
    quantization: str
    params: dict[str, Any] = Field(alias="model_config")
    vocab_size: int
    context_window_size: int
    sliding_window_size: int
    prefill_chunk_size: int
    attention_sink_size: int
    tensor_parallel_shards: int
    pipeline_parallel_stages: int = 1
    active_vocab_size: int | None = None
    temperature: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_p: float | None = None
    tokenizer_files: list[str] = Field(default_factory=list)
    tokenizer_info: TokenizerInfo = Field(default_factory=TokenizerInfo)
    conv_template: Conversation
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    task: Literal["chat", "embedding"] = Field(default="chat", alias="model_task")
    embedding_metadata: dict[str, Any] | None = None
    # ours, ignored by MLC: how the weights were made (clip method, source, parameter names, our template)
    toolkit: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.model_dump(by_alias=True)
        if d["toolkit"] is None:
            del d["toolkit"]
        return d


def read_chat_config(folder: str | Path) -> MLCChatConfig:
    """Parse and validate `folder/mlc-chat-config.json`; any problem is a one-line UserError."""
    path = Path(folder) / CHAT_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {CHAT_CONFIG} ({e})", path) from None
    if not isinstance(raw, dict):
        raise UserError("not a JSON object", path)
    try:
        return MLCChatConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(
            f"not an mlc-chat-config MLC-LLM can load: {where}: {err['msg']} "
            "(written by an older phi3-toolkit? re-run `phi3 convert`)",
            path,
        ) from None


def write_chat_config(chat: MLCChatConfig, folder: str | Path) -> Path:
    """Write `folder/mlc-chat-config.json` (temp file, then rename: never a half-written config)."""
    path = Path(folder) / CHAT_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(chat.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def detect_tokenizer_info(tokenizer_json: dict[str, Any] | None) -> TokenizerInfo:
    """What MLC's runtime detects from a tokenizer.json (its `DetectTokenizerInfo` rules, our code).

    token_postproc_method: the decoder (or, in a Sequence, the last of its decoders) that is ByteLevel or
    ByteFallback; byte_fallback when neither or no decoder. prepend_space_in_encode: a Prepend("▁")
    normalizer. strip_space_in_decode: a Strip(" ", start=1, stop=0) decoder.
    """
    if tokenizer_json is None:  # no tokenizer.json: MLC uses the defaults
        return TokenizerInfo()

    def parts(node: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        if node.get("type") == "Sequence":
            return [n for n in node.get(key) or [] if isinstance(n, dict)]
        return [node]

    decoders = parts(tokenizer_json.get("decoder"), "decoders")
    method = "byte_fallback"
    for d in decoders:
        if d.get("type") == "ByteLevel":
            method = "byte_level"
        elif d.get("type") == "ByteFallback":
            method = "byte_fallback"
    prepend = any(
        n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
        for n in parts(tokenizer_json.get("normalizer"), "normalizers")
    )
    strip = any(
        d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1 and d.get("stop") == 0
        for d in decoders
    )
    return TokenizerInfo(
        token_postproc_method=method, prepend_space_in_encode=prepend, strip_space_in_decode=strip
    )
