"""Generation options: one dataclass validated in one place, shared by the API and generate/chat/serve."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..tokenizer import is_text

# numpy's Generator takes any non-negative int; 2**63-1 keeps it a C long everywhere
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16  # OpenAI allows 4; more only costs a string search per token


class OptionsError(UserError):
    """A sampling option out of range or of the wrong type (HTTP 400 in the server, whose error names the
    option as its `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # transformers' (CTRL) penalty over prompt + output; 1 = off
    frequency_penalty: float = 0.0  # OpenAI's: minus count * f for each generated token
    presence_penalty: float = 0.0  # OpenAI's: minus p for each token generated at least once
    stop: tuple[str, ...] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        _int("max_tokens", self.max_tokens, 1)
        _num("temperature", self.temperature, 0.0, None)
        _num("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int("top_k", self.top_k, 0)
        _num("min_p", self.min_p, 0.0, 1.0)
        _num("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _num("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _num("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        stop = self.stop
        if isinstance(stop, str):  # OpenAI accepts one string or a list
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise OptionsError("stop must be a non-empty string or a list of non-empty strings", "stop")
        if not all(is_text(s) for s in stop):
            raise OptionsError("stop strings must be valid UTF-8 text", "stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise OptionsError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.logit_bias, Mapping):
            raise OptionsError("logit_bias must map token ids to numbers", "logit_bias")
        bias: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            try:
                tid = int(k)  # JSON keys are strings
            except (TypeError, ValueError):
                raise OptionsError(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
            if tid < 0 or str(tid) != str(k).strip():
                raise OptionsError(f"logit_bias key {k!r} is not a token id", "logit_bias")
            _num(f"logit_bias[{tid}]", v, -100.0, 100.0)
            bias[tid] = float(v)
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationOptions:
        """These options with `changes` (None values ignored: "not given"), validated again."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise OptionsError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check_vocab(self, vocab_size: int) -> None:
        """logit_bias keys must be token ids of this model."""
        bad = [t for t in self.logit_bias if t >= vocab_size]
        if bad:
            raise OptionsError(
                f"logit_bias token id {bad[0]} is outside the vocabulary (size {vocab_size})", "logit_bias"
            )


def _num(name: str, v: Any, lo: float, hi: float | None, *, low_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise OptionsError(f"{name} must be a finite number, got {v!r}", name.split("[")[0])
    if v < lo or (low_open and v == lo) or (hi is not None and v > hi):
        rng = f"{'(' if low_open else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}]'}"
        raise OptionsError(f"{name} must be in {rng}, got {v!r}", name.split("[")[0])


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionsError(f"{name} must be an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        raise OptionsError(f"{name} must be >= {lo}{'' if hi is None else f' and <= {hi}'}, got {v}", name)
