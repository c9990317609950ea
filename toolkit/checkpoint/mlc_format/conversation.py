"""MLC-LLM's registered conversation templates for the models we convert, and which one fits our template.

Values are those of MLC's `conversation_template/` registry (phi.py, registry.py) at the pinned commit; MLC's
runtimes render prompts from them, so they must be MLC's exactly, not our own rendering.
"""

from __future__ import annotations

from ...errors import UserError
from .chat_config import SYSTEM_PLACEHOLDER, Conversation

_PHI_SYSTEM = (
    "You are a helpful digital assistant. Please provide safe, ethical and accurate information to the user."
)
_PHI_TURNS = dict(
    roles={"user": "<|user|>", "assistant": "<|assistant|>"},
    seps=["<|end|>\n"],
    role_content_sep="\n",
    role_empty_sep="\n",
)
_CHATML_TURNS = dict(
    roles={"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
    seps=["<|im_end|>\n"],
    role_content_sep="\n",
    role_empty_sep="\n",
    stop_str=["<|im_end|>"],
    stop_token_ids=[2],
)

MLC_TEMPLATES: dict[str, dict] = {
    "phi-3": dict(
        system_template="<|system|>\n" + SYSTEM_PLACEHOLDER,
        system_message=_PHI_SYSTEM,
        system_prefix_token_ids=[1],
        stop_str=["<|endoftext|>"],
        stop_token_ids=[2, 32000, 32001, 32007],
        **_PHI_TURNS,
    ),
    # Phi-4-mini: the same text format over a 200k vocabulary (<|system|>, <|endoftext|>, <|end|> ids)
    "phi-4": dict(
        system_template="<|system|>\n" + SYSTEM_PLACEHOLDER,
        system_message=_PHI_SYSTEM,
        system_prefix_token_ids=[200022],
        stop_str=["<|endoftext|>", "<|end|>"],
        stop_token_ids=[199999, 200020],
        **_PHI_TURNS,
    ),
    "chatml": dict(
        system_template="<|im_start|>system\n" + SYSTEM_PLACEHOLDER + "<|im_end|>\n",
        system_message=(
            "A conversation between a user and an LLM-based AI assistant. "
            "The assistant gives helpful and honest answers."
        ),
        **_CHATML_TURNS,
    ),
    "chatml_nosystem": dict(system_template=SYSTEM_PLACEHOLDER, **_CHATML_TURNS),
    # plain language model: no markup
    "LM": dict(
        roles={"user": "", "assistant": ""},
        seps=[""],
        stop_token_ids=[2],
        system_prefix_token_ids=[1],
    ),
}

# our chat template (toolkit/chat_template.py) -> MLC's template of the same prompt format
_FROM_OURS = {"phi3": "phi-3", "chatml": "chatml", "chatml-plain": "chatml_nosystem", "raw": "LM"}
_TO_OURS = {v: k for k, v in _FROM_OURS.items()} | {"phi-4": "phi3"}
# Phi-4-mini's vocabulary; Phi-3's is 32064
_PHI4_MIN_VOCAB = 200_000


def mlc_template(name: str) -> Conversation:
    """MLC's registered template `name` as a Conversation."""
    if name not in MLC_TEMPLATES:
        raise UserError(f"no MLC conversation template {name!r}; known: {', '.join(MLC_TEMPLATES)}")
    return Conversation(name=name, **MLC_TEMPLATES[name])


def mlc_template_name(ours: str, vocab_size: int) -> str:
    """The MLC template for one of our chat templates (Phi-4's token ids differ from Phi-3's)."""
    if ours not in _FROM_OURS:
        raise UserError(f"chat template {ours!r} has no MLC-LLM counterpart; known: {', '.join(_FROM_OURS)}")
    name = _FROM_OURS[ours]
    return "phi-4" if name == "phi-3" and vocab_size >= _PHI4_MIN_VOCAB else name


def our_template_name(conv: Conversation) -> str | None:
    """Our chat template for an MLC conversation template, by its name (None: not one we render)."""
    return _TO_OURS.get(conv.name or "")
