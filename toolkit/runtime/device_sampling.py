"""Sampling on the model's device with the library's own `sample_tokens` (compile/attach_sampling.py): a
forward's logits stay where they are and only the chosen token ids come back, 4 bytes per sequence instead
of a vocabulary-sized row of float32 logits, and no softmax on the host.

It covers greedy, temperature, top-k, top-p and min-p (the defaults among them), drawn as the host sampler
(`TokenSampler`) draws: the same cuts (ties at the top-p edge by lower id), the same walk in id order, from
the uniform number the host would have taken from the seed's stream for that token. So a seed gives the
same text either way, unless float32 rounding moves a boundary that float64 on the host puts elsewhere.
Greedy takes the lowest id among the maxima, as numpy's argmax does. Requests with penalties or a logit
bias stay on the host (`TokenSampler.fits_device`).
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
# forward -> its fused step: embed, forward and sample_tokens in one call (compile/attach_decode_sample.py;
# libraries from before it have none, and the engine makes the three calls)
FUSED_STEPS = {"decode": "decode_and_sample", "batch_decode": "batch_decode_and_sample"}
# the largest float32 below 1: a uniform number rounded up to 1.0 would run past the last token
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))


@dataclass(frozen=True)
class Draw:
    """One token to draw: temperature 0 is greedy; `uniform` is the host sampler's number for this token."""

    temperature: float
    uniform: float
    top_p: float = 1.0  # 1: no top-p cut
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0  # 0: no min-p cut


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
        self.max_rows = max_rows
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

    def sample(
        self,
        logits: tvm.runtime.Tensor,
        picks: Sequence[tuple[int, Draw]],
        params: tvm.runtime.Tensor | None = None,
    ) -> list[int]:
        """Token ids for `picks` (row of `logits`, draw), in their order. `params`: `upload`'s for them, made
        before the forward that computed `logits` (an upload waits for the device's queue: after the forward
        it would wait for the whole forward with nothing queued behind it)."""
        b = int(logits.shape[0])
        params = self.upload(b, picks) if params is None else params
        tok = self._fn(logits._create_view((b, 1, int(logits.shape[-1]))), params).numpy()
        return [int(tok[r]) for r, _ in picks]

    def upload(self, b: int, picks: Sequence[tuple[int, Draw]]) -> tvm.runtime.Tensor:
        """The params [5, b] of `b` rows drawing `picks` (row, draw), on the device: `sample_tokens`' second
        argument, and the fused steps' third."""
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
        return buf
