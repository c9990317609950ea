"""Sampling on the model's device with the library's own `sample_tokens` (compile/attach_sampling.py): a
forward's logits stay where they are and only the chosen token ids come back, 4 bytes per sequence instead
of a vocabulary-sized row of float32 logits, and no softmax on the host.

It covers every knob of the host sampler (`TokenSampler`), drawn as it draws: logit bias, repetition,
frequency and presence penalties first (the library's `adjust_logits`, in the host's order), then greedy,
temperature, top-k, top-p and min-p with the same cuts (ties at the top-p edge by lower id) and the same
walk in id order, from the uniform number the host would have taken from the seed's stream for that token.
So a seed gives the same text either way, unless float32 rounding moves a boundary that float64 on the host
puts elsewhere. Greedy takes the lowest id among the maxima, as numpy's argmax does. A library from before
`adjust_logits` leaves requests with a bias or penalties on the host (`TokenSampler.device_draw`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:  # tvm is imported where it is used: the API imports this module before it may import tvm
    import tvm

FUNCTIONS = ("sample_tokens",)
ADJUST = "adjust_logits"  # bias and penalties (compile/adjust_logits.py); older libraries have none
# forward -> its fused step: embed, forward and sample_tokens in one call (compile/attach_decode_sample.py;
# libraries from before it have none, and the engine makes the three calls)
FUSED_STEPS = {"decode": "decode_and_sample", "batch_decode": "batch_decode_and_sample"}
# the largest float32 below 1: a uniform number rounded up to 1.0 would run past the last token
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))


@dataclass(frozen=True, eq=False)
class Adjust:
    """Logit changes before a draw (`TokenSampler.adjust`'s): `tokens` unique, with each one's bias,
    whether the repetition penalty covers it (1/0) and how often it was generated."""

    tokens: np.ndarray  # int32 [n]
    bias: np.ndarray  # float32 [n]
    covered: np.ndarray  # int32 [n]
    counts: np.ndarray  # int32 [n]
    repetition: float = 1.0
    frequency: float = 0.0
    presence: float = 0.0


@dataclass(frozen=True)
class Draw:
    """One token to draw: temperature 0 is greedy; `uniform` is the host sampler's number for this token."""

    temperature: float
    uniform: float
    top_p: float = 1.0  # 1: no top-p cut
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0  # 0: no min-p cut
    adjust: Adjust | None = None  # bias and penalties first


@dataclass
class Upload:
    """A step's draw inputs on the device: sample_tokens' params, and adjust_logits' pairs and values where a
    row has a bias or penalties."""

    params: tvm.runtime.Tensor
    adjust: tuple[tvm.runtime.Tensor, tvm.runtime.Tensor] | None = None


class DeviceSampler:
    """Draws one token per row of a forward's logits [b, 1, v] on the device they were computed on, in one
    library call per step."""

    def __init__(self, vm, device: tvm.runtime.Device, max_rows: int, vocab: int | None = None) -> None:
        missing = [n for n in FUNCTIONS if not vm.module.implements_function(n)]
        if missing:
            raise UserError(
                f"this library has no sampler functions ({', '.join(missing)}): sample on the host, or "
                "compile for a GPU preset"
            )
        import tvm

        self._fn = vm["sample_tokens"]
        # adjust_logits: a PrimFunc of the library, looked up as MLC's engine looks up its processors
        try:
            self._adjust = vm.module.get_function(ADJUST, query_imports=True)
        except AttributeError:  # a library from before it: bias and penalties stay on the host
            self._adjust = None
        self.max_rows, self._device = max_rows, device
        self._pairs = self._values = None  # adjust_logits' inputs, grown as requests need
        # params [5, b] (rows: temperature, uniform, top_p, top_k, min_p): one host-to-device copy per step
        self._buf = tvm.runtime.empty((5 * max_rows,), "float32", device)
        if vocab is not None:  # one greedy draw: a library whose sample_tokens takes other params says so now
            try:
                self.sample(tvm.runtime.empty((1, 1, vocab), "float32", device), [(0, Draw(0.0, 0.0))])
            except Exception as e:
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                raise UserError(
                    f"this library's sample_tokens failed a test draw ({type(e).__name__}: {first[:160]}); "
                    "one compiled by an older toolkit takes other params than [5, b]: recompile it, or "
                    "sample on the host"
                ) from e

    @property
    def adjusts(self) -> bool:
        """Whether the library applies bias and penalties on the device (`adjust_logits`)."""
        return self._adjust is not None

    def sample(
        self, logits: tvm.runtime.Tensor, picks: Sequence[tuple[int, Draw]], upload: Upload | None = None
    ) -> list[int]:
        """Token ids for `picks` (row of `logits`, draw), in their order; the logits of rows with a bias or
        penalties change in place. `upload`: `upload`'s for them, made before the forward that computed
        `logits` (an upload waits for the device's queue: after the forward it would wait for the whole
        forward with nothing queued behind it)."""
        b, v = int(logits.shape[0]), int(logits.shape[-1])
        upload = self.upload(b, picks) if upload is None else upload
        if upload.adjust is not None:
            self._adjust(logits._create_view((b, v)), *upload.adjust)
        tok = self._fn(logits._create_view((b, 1, v)), upload.params).numpy()
        return [int(tok[r]) for r, _ in picks]

    def upload(self, b: int, picks: Sequence[tuple[int, Draw]]) -> Upload:
        """The draw inputs of `b` rows drawing `picks` (row, draw), on the device: `sample_tokens`' params
        [5, b] (also the fused steps' third argument), and `adjust_logits`' arrays if a pick has any."""
        if b > self.max_rows:
            raise ValueError(f"{b} rows exceed the sampler's {self.max_rows}")
        # sample_tokens' params rows: temperature, uniform, top_p, top_k, min_p; rows without a pick are
        # greedy (not read)
        params = np.zeros((5, b), np.float32)
        params[2] = 1.0
        for r, d in picks:
            params[:, r] = d.temperature, min(np.float32(d.uniform), _BELOW_ONE), d.top_p, d.top_k, d.min_p
        buf = self._buf._create_view((5, b))
        buf.copyfrom(params)
        adjusts = [(r, d.adjust) for r, d in picks if d.adjust is not None and d.adjust.tokens.size]
        return Upload(buf, self._upload_adjust(b, adjusts) if adjusts else None)

    def _upload_adjust(self, b: int, adjusts: list[tuple[int, Adjust]]):
        if self._adjust is None:
            raise UserError("this library has no adjust_logits: recompile it, or sample on the host")
        import tvm

        pairs, values = pack_adjust(b, adjusts)
        if self._pairs is None or self._pairs.shape[0] < pairs.size:  # grown in powers of two
            size = 1 << (pairs.size - 1).bit_length()
            self._pairs = tvm.runtime.empty((size,), "int32", self._device)
            self._values = tvm.runtime.empty((size + 3 * self.max_rows,), "float32", self._device)
        p, val = self._pairs._create_view(pairs.shape), self._values._create_view(values.shape)
        p.copyfrom(pairs)
        val.copyfrom(values)
        return p, val


def pack_adjust(b: int, adjusts: Sequence[tuple[int, Adjust]]) -> tuple[np.ndarray, np.ndarray]:
    """adjust_logits' arguments for `b` rows with `adjusts` (row, Adjust): pairs i32[4, n] (row, token,
    covered, count) and values f32[n + 3 b] (each pair's bias, then each row's repetition, frequency and
    presence; rows without an Adjust change nothing)."""
    pairs = np.concatenate(
        [np.stack([np.full(a.tokens.size, r), a.tokens, a.covered, a.counts]) for r, a in adjusts], axis=1
    ).astype(np.int32)
    n = pairs.shape[1]
    values = np.zeros(n + 3 * b, np.float32)
    values[:n] = np.concatenate([a.bias for _, a in adjusts])
    rows = values[n:].reshape(b, 3)
    rows[:, 0] = 1.0
    for r, a in adjusts:
        rows[r] = a.repetition, a.frequency, a.presence
    return pairs, values
