"""One generation in flight: turns each step's logits into a token, text and, at the end, a finish reason.

The same object drives the API's single sequence and the server's batched loop, so both produce the same
tokens for the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..tokenizer import Tokenizer
from .device_sampling import Draw
from .options import GenerationOptions
from .sampling import TokenSampler
from .stops import StopText

# OpenAI's finish reasons
STOP, LENGTH = "stop", "length"


@dataclass
class Step:
    text: str  # new text to show (may be empty: a character split across tokens, a held-back stop prefix)
    finish_reason: str | None = None  # set on the last step


@dataclass
class Generation:
    prompt: list[int]
    options: GenerationOptions
    tokenizer: Tokenizer
    stop_ids: set[int]
    context_window: int
    tokens: list[int] = field(default_factory=list)  # generated so far (stop token excluded)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.sampler = TokenSampler(self.options, self.prompt)
        self._decoder = self.tokenizer.stream_decoder()
        self._stops = StopText(self.options.stop)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def device_draw(self, adjusts: bool = True) -> Draw | None:
        """What the device sampler draws for the next token (None: these options sample on the host;
        `adjusts`: the library applies bias and penalties)."""
        return self.sampler.device_draw(adjusts)

    def step(self, out: np.ndarray | int) -> Step:
        """Take the next token: sampled here from the logits of the last fed token, or the id the device
        sampler drew for `device_draw()`'s draw. After a step with a finish reason, feed nothing more;
        otherwise the caller feeds `last_token` and calls again with its output."""
        tok = out if isinstance(out, int) else self.sampler(out)
        if tok in self.stop_ids:
            return self._finish(STOP, "")
        self.sampler.accept(tok)
        self.tokens.append(tok)
        text = self._stops.feed(self._decoder.feed(tok))
        if self._stops.stopped:
            return self._finish(STOP, text)
        if len(self.tokens) >= self.options.max_tokens:
            return self._finish(LENGTH, text)
        if len(self.prompt) + len(self.tokens) > self.context_window:  # no room to feed this token
            return self._finish(LENGTH, text)
        return Step(text)

    def _finish(self, reason: str, text: str) -> Step:
        self.finish_reason = reason
        if reason == LENGTH or not self._stops.stopped:  # flush held-back text unless a stop string cut it
            text += self._stops.feed(self._decoder.flush()) + self._stops.flush()
        return Step(text, reason)


def draw_for(engine, gen: Generation) -> Draw | None:
    """The draw for `gen`'s next token where `engine` samples on its device (None: logits come back)."""
    return gen.device_draw(engine.sampler.adjusts) if engine.sampler is not None else None
