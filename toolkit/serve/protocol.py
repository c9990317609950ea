"""OpenAI's wire format: request bodies -> (prompt, GenerationOptions), responses, stream chunks, errors."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

# body field -> GenerationOptions field (OpenAI names; the extras vLLM / llama.cpp servers accept too)
OPTION_FIELDS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop": "stop",
    "logit_bias": "logit_bias",
    "seed": "seed",
}


# Fields that ask for output this server does not produce (tool calls, a JSON schema, log-probabilities, ...):
# a value that asks for it is refused, as OpenAI refuses what a model cannot do, rather than answered with 200
# and the feature silently missing. Their "off" values (tools [], tool_choice "none", logprobs false, ...),
# which SDKs send by default, pass. field -> True when the value asks for the feature.
NOT_SUPPORTED_CHAT = {
    "tools": bool,
    "functions": bool,
    "tool_choice": lambda v: v not in (None, "none"),
    "function_call": lambda v: v not in (None, "none"),
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
    "logprobs": bool,
    "top_logprobs": bool,
    "modalities": lambda v: v is not None and v != ["text"],
    "audio": lambda v: v is not None,
}
NOT_SUPPORTED_COMPLETIONS = {
    "echo": bool,
    "suffix": bool,
    "best_of": lambda v: v not in (None, 1),
    "logprobs": lambda v: v is not None,
}


class BadRequest(UserError):
    """HTTP 400 with an OpenAI-shaped body; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ParsedRequest:
    model: str | None
    stream: bool
    include_usage: bool
    options_changes: dict[str, Any]
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | list[int] | None = None  # completions


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    v = body.get(name, default)
    if v is not None and (not isinstance(v, kind) or isinstance(v, bool) and kind is not bool):
        raise BadRequest(f"'{name}' has the wrong type", param=name)
    return v


def parse(body: Any, *, chat: bool) -> ParsedRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    n = _field(body, "n", int, 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    for name, asks in (NOT_SUPPORTED_CHAT if chat else NOT_SUPPORTED_COMPLETIONS).items():
        if asks(body.get(name)):
            raise BadRequest(f"'{name}' is not supported by this server (no such output here)", param=name)
    stream = bool(_field(body, "stream", bool, False))
    so = _field(body, "stream_options", dict, {}) or {}
    changes: dict[str, Any] = {}
    for key, opt in OPTION_FIELDS.items():
        if body.get(key) is not None:
            changes[opt] = body[key]
    if isinstance(changes.get("stop"), list):
        changes["stop"] = tuple(changes["stop"])
    req = ParsedRequest(
        model=_field(body, "model", str),
        stream=stream,
        include_usage=bool(so.get("include_usage")),
        options_changes=changes,
    )
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list", param="messages")
        req.messages = [_message(m, i) for i, m in enumerate(msgs)]
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            req.prompt = p
        elif isinstance(p, str) and p:
            req.prompt = p
        else:
            raise BadRequest("'prompt' must be a non-empty string (or one list of token ids)", param="prompt")
    return req


# the roles OpenAI's API takes; the template then decides what it renders (prompts.PromptFormat.render)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRequest(f"messages[{i}] must be an object with a string 'role'", param="messages")
    if m["role"] not in ROLES:
        roles = ", ".join(ROLES)
        raise BadRequest(f"messages[{i}].role {m['role']!r} is not one of {roles}", param="messages")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise BadRequest(f"messages[{i}].name must be a string", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        if len(texts) != len(content) or not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be text", param="messages")
    return {**m, "content": content}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class ResponseShape:
    """Builds one endpoint's response objects (chat.completion or text_completion) for one request."""

    chat: bool
    model: str

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish_reason
        body = self._base("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        choice["finish_reason"] = finish_reason
        return {
            **self._base("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
