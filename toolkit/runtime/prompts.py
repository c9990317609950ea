"""A model's prompt format: its own Jinja chat template when the checkpoint ships one (rendered and tokenized
as transformers' `apply_chat_template` does), our hand-written template only when it has none; the token ids
that end a reply; the generation defaults."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ..chat_template import jinja_for_hf_dir, render, stop_token_ids, template_from_jinja
from ..errors import UserError
from ..jinja_template import compile_template, left_out, render_jinja
from ..tokenizer import Tokenizer
from .options import GenerationOptions

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# roles every chat model is trained with. A template that leaves one of them out does so by design (the first
# Phi-3 release's has no system turn): rendered as transformers renders it, with one notice. Any other role
# it leaves out is an error: the message would vanish from the prompt without a word.
CORE_ROLES = ("system", "user", "assistant")


@dataclass
class PromptFormat:
    tokenizer: Tokenizer
    jinja: str | None  # the checkpoint's template; None: render `template` (ours)
    template: (
        str  # our template's name; with a Jinja template, the one whose stop strings apply ("raw": none)
    )
    special_tokens: dict[str, str]
    stop_ids: set[int]
    defaults: GenerationOptions
    noticed: set[str] = field(default_factory=set, repr=False)  # core roles already said to be left out

    @classmethod
    def for_source(cls, source: Any, tokenizer: Tokenizer) -> PromptFormat:
        from .generation_config import generation_defaults

        jinja = checkpoint_jinja(source, tokenizer)
        if jinja is not None:
            compile_template(jinja)  # a template that does not parse is an error at load, not per request
            name = template_from_jinja(jinja) or "raw"
        else:
            name = source.conv_template
        return cls(
            tokenizer=tokenizer,
            jinja=jinja,
            template=name,
            special_tokens=special_tokens(source, tokenizer),
            stop_ids=stop_token_ids(name, tokenizer),
            defaults=generation_defaults(source.path),
        )

    def generation_defaults(self) -> GenerationOptions:
        return self.defaults

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        if self.jinja is None:
            return render(messages, self.template, add_generation_prompt=add_generation_prompt)
        text = render_jinja(
            self.jinja,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
        )
        dropped = left_out(
            self.jinja,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
        )
        for i in dropped:
            role = messages[i]["role"]
            if role not in CORE_ROLES:
                raise UserError(
                    f"this model's chat template leaves messages[{i}] (role {role!r}) out of the prompt: it "
                    "does not render that role"
                )
            if role not in self.noticed:
                self.noticed.add(role)
                print(
                    f"notice: this model's chat template leaves {role} messages out of the prompt (as "
                    "transformers renders it): they have no effect",
                    file=sys.stderr,
                )
        return text

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        # apply_chat_template tokenizes without special tokens: a BOS the template wants, it writes itself
        ids = (
            self.tokenizer.encode(text, add_bos=False)
            if self.jinja is not None
            else self.tokenizer.encode(text)
        )
        if not ids:
            raise no_tokens(text)
        return ids


def no_tokens(text: str) -> UserError:
    """The error for a prompt that encodes to no token ids: empty, or text the tokenizer has no pieces for
    (a GGUF written with placeholder tokens runs token ids but cannot tokenize)."""
    if not text.strip():
        return UserError("the prompt is empty")
    return UserError(
        "the prompt encodes to no tokens: this model's tokenizer has no pieces for its text (a placeholder "
        "vocabulary, as in GGUFs written without a tokenizer?)"
    )


def check_messages(messages: list[dict[str, Any]]) -> None:
    if not messages:
        raise UserError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}].content must be text")


def checkpoint_jinja(source: Any, tokenizer: Tokenizer) -> str | None:
    """The checkpoint's own Jinja template: tokenizer_config.json / chat_template.jinja / GGUF metadata."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if source.path.is_dir():
        return jinja_for_hf_dir(source.path)
    return None


def special_tokens(source: Any, tokenizer: Tokenizer) -> dict[str, str]:
    """What apply_chat_template passes as bos_token, eos_token, ...: the strings tokenizer_config.json names,
    or (GGUF) the tokens of tokenizer.ggml.*_token_id."""
    out: dict[str, str] = {}
    if source.path.is_dir() and (source.path / "tokenizer_config.json").is_file():
        import json

        try:
            tc = json.loads((source.path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"not valid JSON ({e})", source.path / "tokenizer_config.json") from None
        for key in SPECIAL_TOKEN_KEYS:
            v = tc.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
    elif source.kind == "gguf":
        gguf_keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
        for key, g in gguf_keys.items():
            tid = source.gguf_metadata(f"tokenizer.ggml.{g}_token_id")
            tok = tokenizer.id_to_token(int(tid)) if tid is not None else None
            if tok is not None:
                out[key] = tok
    elif tokenizer.bos_token_id is not None:
        out["bos_token"] = tokenizer.id_to_token(tokenizer.bos_token_id) or ""
    return out
