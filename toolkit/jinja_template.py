"""A checkpoint's own Jinja chat template, rendered the way transformers' `apply_chat_template` renders it:
jinja2's immutable sandbox, trim_blocks/lstrip_blocks, loop controls, `{% generation %}` blocks, and the same
globals (raise_exception, strftime_now, tojson without HTML escaping, dict, namespace) and variables
(messages, add_generation_prompt, bos_token, eos_token, ...). Templates are untrusted: hence the sandbox."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError


class TemplateError(UserError):
    """The template failed to render (a syntax error, or its own raise_exception: e.g. a role it refuses)."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Namespaces refuse underscore attributes (no reach into CPython internals), as transformers' do."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' does not
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the model's chat template does not parse: {e}") from None


def render_jinja(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    **extra: Any,
) -> str:
    """The prompt text for `messages` (plain JSON data: the template never sees our objects)."""
    template = compile_template(source)
    data = json.loads(json.dumps(messages))
    try:
        return template.render(
            messages=data,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
            **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the model's chat template refused the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise TemplateError(f"the model's chat template failed on this conversation: {e}") from None


def left_out(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    **extra: Any,
) -> list[int]:
    """Indices of the messages whose content the template leaves out of the prompt: many templates render
    only the roles they know (Phi-3's drops a 'developer' or 'tool' message; its first release dropped
    'system'). Each content is replaced by a marker of its own and the conversation rendered once more; a
    template that refuses the markers is not judged ([])."""
    nonce = uuid.uuid4().hex[:12]
    marked = [{**m, "content": f"[[{nonce}:{i}]]"} for i, m in enumerate(messages)]
    try:
        text = render_jinja(
            source,
            marked,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special_tokens,
            **extra,
        )
    except TemplateError:
        return []
    return [i for i in range(len(messages)) if f"[[{nonce}:{i}]]" not in text]
