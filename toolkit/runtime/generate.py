"""Text generation over the engine: one-shot prompts and multi-turn chat sessions that reuse the KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..chat_template import render, stop_token_ids
from ..errors import UserError
from ..tokenizer import Tokenizer
from .engine import ContextFullError, Engine
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""

    def summary(self) -> str:
        pf = self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0
        # the first generated token comes from prefill; the rest are decode steps
        dec_n = max(self.generated_tokens - 1, 0)
        dc = dec_n / self.decode_seconds if self.decode_seconds else 0.0
        return (
            f"prompt {self.prompt_tokens} tok, prefill {pf:.1f} tok/s; "
            f"generated {self.generated_tokens} tok, "
            f"decode {dc:.1f} tok/s; stop: {self.stop_reason}"
        )


class PromptTooLongError(UserError):
    """The prompt (with the conversation so far) does not fit the context window: nothing was generated."""


@dataclass
class ChatSession:
    """A conversation whose tokens live in one KV-cache sequence across turns."""

    engine: Engine
    tokenizer: Tokenizer
    template: str
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    seq: int | None = None

    def __post_init__(self) -> None:
        self.stop_ids = stop_token_ids(self.template, self.tokenizer)
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def _feed(self, ids: list[int]):
        """Bring the cache to hold `ids`: reuse the common prefix, drop what diverged, prefill the rest."""
        eng = self.engine
        if self.seq is None:
            self.seq = eng.add_sequence()
        cached = eng.seqs[self.seq].tokens
        common = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            common += 1
        if common == len(ids):  # everything cached: re-feed the last token to get its logits
            common -= 1
        if common < len(cached):
            eng.popn(self.seq, len(cached) - common)
        return eng.prefill(self.seq, ids[common:]), len(ids) - common

    def send(
        self,
        text: str,
        sampling: SamplingParams,
        max_tokens: int,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, GenerationStats]:
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = render(self.messages, self.template, add_generation_prompt=True)
            ids = self.tokenizer.encode(prompt)
            reply_ids, stats = [], GenerationStats()
            decoder = self.tokenizer.stream_decoder()
            for tok in generate_tokens(self, ids, sampling, max_tokens, stats):
                reply_ids.append(tok)
                if on_text:
                    on_text(decoder.feed(tok))
        except PromptTooLongError:
            self.messages.pop()  # never keep a message that got no answer: the next turn would overflow too
            raise
        if on_text:
            on_text(decoder.flush())
        reply = self.tokenizer.decode(reply_ids)
        self.messages.append({"role": "assistant", "content": reply})
        return reply, stats


def generate_tokens(
    session: ChatSession, ids: list[int], sampling: SamplingParams, max_tokens: int, stats: GenerationStats
) -> Iterator[int]:
    """Prefill `ids` (reusing the cache) then yield sampled tokens until a stop token or `max_tokens`;
    `stats` is filled in as it goes."""
    eng, sampler = session.engine, Sampler(sampling)
    t0 = time.perf_counter()
    try:
        logits, stats.prompt_tokens = session._feed(ids)
    except ContextFullError:
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens (with the chat template and history); the context window is "
            f"{eng.context_window} tokens"
        ) from None
    stats.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(max_tokens):
        tok = sampler(logits)
        if tok in session.stop_ids:
            stats.stop_reason = "stop token"
            break
        stats.generated_tokens += 1
        stats.decode_seconds = time.perf_counter() - t1
        yield tok
        if i + 1 == max_tokens:
            stats.stop_reason = "max tokens"
            break
        try:
            logits = eng.decode(session.seq, tok)
        except ContextFullError:
            stats.stop_reason = "context window full"
            break
    stats.decode_seconds = time.perf_counter() - t1
