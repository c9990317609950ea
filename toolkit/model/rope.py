"""RoPE applied by us, before the paged KV cache, with Hugging Face's semantics.

TVM's KV-cache RoPE cannot be used for LongRoPE: it picks long vs short factors by the length of the current
chunk, while HF picks by position (long iff max(position_ids) + 1 > original_max_position_embeddings), so a
decode that crosses the boundary silently diverges. We rotate q and k inside the fused qkv tensor ourselves
and run the cache with RopeMode.NONE. The factor set is chosen per token inside the graph from the KV
cache's query positions (MLC's engine passes nothing else): a token uses the long factors iff the last
position of its sequence in this forward + 1 exceeds original_max_position_embeddings. Where the sequence
ends is known exactly in `prefill` (one sequence), `batch_prefill` (logit_positions) and decode (one token
per sequence); `batch_verify` takes each run of consecutive positions as one sequence. The engine makes
generation follow transformers' `generate()` on top of that (re-encoding a sequence when it first grows past
the switch).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from ..config import Phi3Config


def inv_freq_table(cfg: Phi3Config) -> np.ndarray:
    """(2, rotary_dim/2) float32: row 0 short (or plain) frequencies, row 1 long ones."""
    rot = cfg.rotary_dim
    # same float32 arithmetic as transformers' _compute_default/longrope_parameters
    base = np.float32(cfg.rope_theta) ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot))
    if cfg.longrope is None:
        inv = (1.0 / base).astype(np.float32)
        return np.stack([inv, inv])
    short = np.asarray(cfg.longrope.short_factor, dtype=np.float32)
    long = np.asarray(cfg.longrope.long_factor, dtype=np.float32)
    return np.stack([1.0 / (short * base), 1.0 / (long * base)]).astype(np.float32)


def attention_factor(cfg: Phi3Config) -> float:
    return 1.0 if cfg.longrope is None else cfg.longrope.attention_factor


def longrope_flags(
    positions: nn.Tensor, cfg: Phi3Config, ends: str, logit_positions: nn.Tensor | None = None
) -> nn.Tensor | None:
    """(n,) int32, 1 where a token takes the long factors (None without LongRoPE).

    `ends` says where each token's sequence ends in this forward: "forward" (one sequence: the last token),
    "token" (every token is its own sequence's last, as in decode), "segments" (`logit_positions` holds the
    index of each sequence's last token, ascending, as MLC's batch_prefill gets it), "runs" (a sequence is
    a run of consecutive positions: exact for one sequence, and for several unless one starts right at the
    position after the previous one's end)."""
    if cfg.longrope is None:
        return None
    orig = cfg.longrope.original_max_position_embeddings

    def by_forward(pos: te.Tensor) -> te.Tensor:
        n = pos.shape[0]
        return te.compute((n,), lambda i: (pos[n - 1] + 1 > orig).astype("int32"), name="rope_long")

    def by_token(pos: te.Tensor) -> te.Tensor:
        return te.compute(pos.shape, lambda i: (pos[i] + 1 > orig).astype("int32"), name="rope_long")

    def by_segments(pos: te.Tensor, ends_at: te.Tensor) -> te.Tensor:
        n, b = pos.shape[0], ends_at.shape[0]
        j = te.reduce_axis((0, b), name="j")
        # the first sequence end at or after token i is where i's sequence ends. int32 throughout: an int64
        # reduction (n is int64) puts int64 in GPU shared memory, which WGSL does not have
        last = te.compute(
            (n,),
            lambda i: te.min(
                tirx.if_then_else(ends_at[j] >= i.astype("int32"), ends_at[j], (n - 1).astype("int32")),
                axis=j,
            ),
            name="sequence_end",
        )
        return te.compute((n,), lambda i: (pos[last[i]] + 1 > orig).astype("int32"), name="rope_long")

    def by_runs(pos: te.Tensor) -> te.Tensor:
        n = pos.shape[0]
        j = te.reduce_axis((0, n), name="j")

        def run_end(k):  # token k ends a run: the last token, or the next one does not continue it
            return tirx.any(k == n - 1, pos[tirx.min(k + 1, n - 1)] != pos[k] + 1)

        last = te.compute(  # int32, as in by_segments
            (n,),
            lambda i: te.min(
                tirx.if_then_else(tirx.all(j >= i, run_end(j)), j.astype("int32"), (n - 1).astype("int32")),
                axis=j,
            ),
            name="sequence_end",
        )
        return te.compute((n,), lambda i: (pos[last[i]] + 1 > orig).astype("int32"), name="rope_long")

    if ends == "runs":
        return op.tensor_expr_op(by_runs, "rope_long", [positions])
    if ends == "segments":
        return op.tensor_expr_op(by_segments, "rope_long", [positions, logit_positions])
    return op.tensor_expr_op({"forward": by_forward, "token": by_token}[ends], "rope_long", [positions])


def rope_table(positions: nn.Tensor, rope_long: nn.Tensor | None, cfg: Phi3Config) -> nn.Tensor:
    """(n, 2, rotary_dim/2) float32: per token the cosines (row 0) and sines (row 1) of its angles, times
    LongRoPE's attention factor. Once per forward for every layer, not per element of every q and k head."""
    half = cfg.rotary_dim // 2
    mscale = float(attention_factor(cfg))
    table = nn.Tensor.from_const(inv_freq_table(cfg))

    def compute(pos: te.Tensor, inv: te.Tensor, long: te.Tensor | None = None) -> te.Tensor:
        def f(i, c, j):
            freq = pos[i].astype("float32") * inv[0 if long is None else long[i], j]
            return tirx.if_then_else(c == 0, tirx.cos(freq), tirx.sin(freq)) * tirx.const(mscale, "float32")

        return te.compute((pos.shape[0], 2, half), f, name="rope_table")

    args = [positions, table] + ([] if rope_long is None else [rope_long])
    return op.tensor_expr_op(compute, "rope_table", args)


def apply_rope_to_qkv(
    qkv: nn.Tensor, rope: nn.Tensor, cfg: Phi3Config, out_dtype: str | None = None
) -> nn.Tensor:
    """qkv (n, nH+2nKV, hd); rope (n, 2, rotary_dim/2) from `rope_table` -> qkv, q and k heads rotated (neox
    halves), in `out_dtype` (default qkv's): a KV cache in another dtype than the activations gets its
    q/k/v from this kernel, not from a cast kernel after it (the same rounding, one pass fewer)."""
    n_rot_heads = cfg.num_attention_heads + cfg.num_key_value_heads  # q and k heads; v passes through
    rot = cfg.rotary_dim
    half = rot // 2
    dtype = out_dtype or qkv.dtype

    def halves(x: te.Tensor, cs: te.Tensor) -> te.Tensor:
        # every dim rotates: (n, heads, 2, half), each element's partner in the other half at the same j,
        # so both loads run along j (the flat form's partner index vectorizes only as a gather)
        n, heads = x.shape[0], x.shape[1]

        def f(i, h, c, j):
            own = x[i, h, c * half + j].astype("float32")
            other = x[i, h, (1 - c) * half + j].astype("float32")
            sign = tirx.if_then_else(c == 0, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
            rotated = (own * cs[i, 0, j] + other * sign * cs[i, 1, j]).astype(dtype)
            return tirx.if_then_else(h < n_rot_heads, rotated, x[i, h, c * half + j].astype(dtype))

        return te.compute((n, heads, 2, half), f, name="apply_rope")

    def compute(x: te.Tensor, cs: te.Tensor) -> te.Tensor:
        def f(i, h, d):
            x_d = x[i, h, d].astype("float32")
            j = tirx.if_then_else(d < half, d, d - half)
            # one in-bounds load for the partner element (a select between two loads would read out of
            # bounds on GPUs, where both sides of a select are evaluated)
            partner_idx = tirx.if_then_else(d < half, d + half, d - half)
            sign = tirx.if_then_else(d < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
            partner = x[i, h, partner_idx].astype("float32") * sign
            rotated = (x_d * cs[i, 0, j] + partner * cs[i, 1, j]).astype(dtype)
            return tirx.if_then_else(tirx.all(h < n_rot_heads, d < rot), rotated, x[i, h, d].astype(dtype))

        return te.compute(x.shape, f, name="apply_rope")

    if rot == qkv.shape[2]:
        return op.reshape(op.tensor_expr_op(halves, "apply_rope", [qkv, rope]), qkv.shape)
    return op.tensor_expr_op(compute, "apply_rope", [qkv, rope])
