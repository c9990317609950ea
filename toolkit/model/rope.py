"""RoPE applied by us, before the paged KV cache, with Hugging Face's semantics.

TVM's KV-cache RoPE cannot be used for LongRoPE: it picks long vs short factors by the length of the current
chunk, while HF picks by position (long iff max(position_ids) + 1 > original_max_position_embeddings), so a
decode that crosses the boundary silently diverges. We rotate q and k inside the fused qkv tensor ourselves
and run the cache with RopeMode.NONE. The factor set is chosen per token by the runtime (`rope_long`),
which knows each sequence's whole prompt, so chunked prefill and batched decode both follow HF.
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


def apply_rope_to_qkv(
    qkv: nn.Tensor, positions: nn.Tensor, rope_long: nn.Tensor, cfg: Phi3Config
) -> nn.Tensor:
    """qkv (n, nH+2nKV, hd); positions, rope_long (n,) int32 -> qkv, q and k heads rotated (neox halves)."""
    n_rot_heads = cfg.num_attention_heads + cfg.num_key_value_heads  # q and k heads; v passes through
    rot = cfg.rotary_dim
    half = rot // 2
    mscale = float(attention_factor(cfg))
    table = nn.Tensor.from_const(inv_freq_table(cfg))
    dtype = qkv.dtype

    def compute(x: te.Tensor, pos: te.Tensor, long: te.Tensor, inv: te.Tensor) -> te.Tensor:
        def f(i, h, d):
            x_d = x[i, h, d].astype("float32")
            j = tirx.if_then_else(d < half, d, d - half)
            freq = pos[i].astype("float32") * inv[long[i], j]
            cos = tirx.cos(freq) * tirx.const(mscale, "float32")
            sin = tirx.sin(freq) * tirx.const(mscale, "float32")
            # one in-bounds load for the partner element (a select between two loads would read out of
            # bounds on GPUs, where both sides of a select are evaluated)
            partner_idx = tirx.if_then_else(d < half, d + half, d - half)
            sign = tirx.if_then_else(d < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
            partner = x[i, h, partner_idx].astype("float32") * sign
            rotated = (x_d * cos + partner * sin).astype(dtype)
            return tirx.if_then_else(tirx.all(h < n_rot_heads, d < rot), rotated, x[i, h, d])

        return te.compute(x.shape, f, name="apply_rope")

    return op.tensor_expr_op(compute, "apply_rope", [qkv, positions, rope_long, table])
