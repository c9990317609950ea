"""Conversation templates: a plain registry of the few formats our models speak, rendered without Jinja
(used when a checkpoint ships no Jinja template of its own; toolkit/runtime/prompts.py picks).

Every template renders a conversation so that the rendering of a shorter history is a prefix of the rendering
of a longer one (given the same first message); `phi3 chat` relies on this to reuse the KV cache across turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# SmolLM2-Instruct's chat template (GGUF `tokenizer.chat_template`) inserts this system message when the
# conversation does not start with one.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    # per role: text before and after the message content; a role missing here is an error
    roles: dict[str, tuple[str, str]]
    generation_prompt: str  # opens the assistant's turn
    stop_strings: tuple[str, ...]  # text that ends the assistant's turn (also tried as special tokens)
    default_system: str | None = None  # inserted when the first message is not a system message


TEMPLATES: dict[str, ChatTemplate] = {
    # Phi-3 / Phi-3.5 / Phi-4-mini (tokenizer_config.json chat_template of microsoft/Phi-3-mini-4k-instruct)
    "phi3": ChatTemplate(
        name="phi3",
        roles={
            "system": ("<|system|>\n", "<|end|>\n"),
            "user": ("<|user|>\n", "<|end|>\n"),
            "assistant": ("<|assistant|>\n", "<|end|>\n"),
        },
        generation_prompt="<|assistant|>\n",
        stop_strings=("<|end|>", "<|endoftext|>"),
    ),
    # ChatML as SmolLM2-Instruct uses it, including its default system prompt
    "chatml": ChatTemplate(
        name="chatml",
        roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
        generation_prompt="<|im_start|>assistant\n",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
        default_system=SMOLLM2_DEFAULT_SYSTEM,
    ),
    # ChatML without an implied system message (Qwen-style models whose template has none)
    "chatml-plain": ChatTemplate(
        name="chatml-plain",
        roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")},
        generation_prompt="<|im_start|>assistant\n",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
    ),
    # no markup: message contents are concatenated; generation stops only at the model's EOS tokens
    "raw": ChatTemplate(
        name="raw",
        roles={r: ("", "") for r in ("system", "user", "assistant")},
        generation_prompt="",
        stop_strings=(),
    ),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def render(messages: list[dict], template: str, add_generation_prompt: bool = True) -> str:
    """Render `[{"role": ..., "content": ...}, ...]` as the prompt text for `template`."""
    t = get_template(template)
    parts: list[str] = []
    if t.default_system is not None and (not messages or messages[0].get("role") != "system"):
        pre, post = t.roles["system"]
        parts.append(pre + t.default_system + post)
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in t.roles:
            raise UserError(f"chat template {t.name!r} has no role {role!r}; roles: {', '.join(t.roles)}")
        if not isinstance(content, str):
            raise UserError(f"message content must be text, got {type(content).__name__}")
        pre, post = t.roles[role]
        parts.append(pre + content + post)
    if add_generation_prompt:
        parts.append(t.generation_prompt)
    return "".join(parts)


def stop_strings(template: str) -> tuple[str, ...]:
    return get_template(template).stop_strings


def stop_token_ids(template: str, tokenizer: Tokenizer) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS ids and the template's stop strings (if tokens)."""
    ids = set(tokenizer.eos_token_ids)
    for s in stop_strings(template):
        tid = tokenizer.token_to_id(s)
        if tid is not None:
            ids.add(tid)
    return ids


def template_from_jinja(text: str | None) -> str | None:
    """Recognise a Hugging Face / GGUF Jinja chat template as one of ours (None: not recognised)."""
    if not text:
        return None
    if "<|im_start|>" in text:
        return "chatml" if SMOLLM2_DEFAULT_SYSTEM in text else "chatml-plain"
    if "<|user|>" in text and "<|assistant|>" in text:
        return "phi3"
    return None


def jinja_for_hf_dir(path: str | Path) -> str | None:
    """A HF checkpoint folder's Jinja chat template: tokenizer_config.json's chat_template (a string, or
    transformers' list of named templates: the default one), else chat_template.jinja; None without one."""
    cfg_path = Path(path) / "tokenizer_config.json"
    text = None
    if cfg_path.is_file():
        try:
            tc = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"not valid JSON ({e})", cfg_path) from None
        text = tc.get("chat_template") if isinstance(tc, dict) else None
        if isinstance(text, list):  # transformers allows [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in text if isinstance(d, dict)}
            text = named.get("default") or next(iter(named.values()), None)
    if text is None:
        jinja = Path(path) / "chat_template.jinja"  # transformers >= 4.50 writes it as a separate file
        if jinja.is_file():
            try:
                text = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot be read as UTF-8 text ({e})", jinja) from None
    return text if isinstance(text, str) else None


def template_for_hf_dir(path: str | Path) -> str:
    """Our template name for a HF checkpoint folder: recognised from its Jinja template, Phi-3's when it has
    none (the runtime renders a Jinja template itself: toolkit/runtime/prompts.py)."""
    return template_from_jinja(jinja_for_hf_dir(path)) or "phi3"
