"""Our own PyTorch Phi-3 decoder, written to be traced and converted to a stateful Core ML ML Program.

Not transformers: every shape decision here is made for the converter.
- The interface is the one swift-transformers' `LanguageModelWithStatefulKVCache` drives (names and call
  pattern in `swift_transformers.py`): input `inputIds` (1, q) int32, input `causalMask` (1, 1, 1 or q,
  past + q + 1) float, output `logits` (1, q, vocab), states `keyCache`/`valueCache` of shape
  (L, 1, nKV, context, head_dim) that the app creates once with `makeState()`.
- swift-transformers passes an all-zero mask one column wider than the keys (prefill: q = prompt length, width
  q + 1; decode: q = 1, width = tokens so far + 1), so the model reads `past = width - 1 - q` from the shapes
  and builds causality and the sliding window itself (HF's rule: a query attends to keys with
  0 <= q - k < sliding_window). The mask's values, if not zero, are added on top (its last column is unused).
  One function serves prefill (q > 1) and decode (q == 1) through RangeDim inputs.
- LongRoPE follows HF per call: the long factors are used for the whole call iff max position + 1 >
  original_max_position_embeddings, and cos/sin are always scaled by attention_factor.
- Module names equal HF's, so a checkpoint's tensors load by name (tied embeddings: no `lm_head.weight`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..config import Phi3Config
from .swift_transformers import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

__all__ = ["CAUSAL_MASK", "INPUT_IDS", "KEY_CACHE", "LOGITS", "VALUE_CACHE", "Phi3ForExport"]


def rope_tables(cfg: Phi3Config, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables, float64, (rows, rotary_dim) with HF's cat(freqs, freqs) layout.

    Plain RoPE: `context` rows. LongRoPE: 2*context rows, short-factor rows first, then long-factor rows;
    the model picks the half per call (see `Phi3ForExport.forward`).
    """
    rot = cfg.rotary_dim
    base = cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    pos = np.arange(context, dtype=np.float64)[:, None]
    if cfg.longrope is None:
        factor_sets, scale = [np.ones(rot // 2)], 1.0
    else:
        lr = cfg.longrope
        factor_sets = [np.asarray(lr.short_factor, np.float64), np.asarray(lr.long_factor, np.float64)]
        scale = lr.attention_factor
    cos, sin = [], []
    for factors in factor_sets:
        freqs = pos / (factors * base)[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos.append(np.cos(emb) * scale)
        sin.append(np.sin(emb) * scale)
    return np.concatenate(cos), np.concatenate(sin)


def causal_mask(past: int, q: int, sliding_window: int | None = None, dtype=np.float32) -> np.ndarray:
    """The attention rule the model applies itself, as an additive (1, 1, q, past + q) mask: 0 where the query
    may attend the key, -inf elsewhere (reference for tests; not the model's input)."""
    qpos = np.arange(past, past + q)[:, None]
    kpos = np.arange(past + q)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= (qpos - kpos) < sliding_window
    return np.where(allowed, 0.0, -np.inf).astype(dtype)[None, None]


def mask_input(past: int, q: int, dtype=np.float32) -> np.ndarray:
    """The `causalMask` input swift-transformers passes for a call of q tokens after `past`: zeros of shape
    (1, 1, 1, past + q + 1)."""
    return np.zeros((1, 1, 1, past + q + 1), dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        # tensors in the model's dtype, not Python floats (see Phi3ForExport on fp32 constants)
        self.register_buffer("eps", torch.tensor(eps, device="cpu"), persistent=False)
        self.register_buffer("one", torch.tensor(1.0, device="cpu"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) computed on x / m, m = max(max|x|, 1): the same value, but x^2 cannot
        # overflow fp16 on the device (|x| > 256 does in real models: SmolLM2's residual stream reaches ~500)
        m = torch.maximum(x.abs().amax(-1, keepdim=True), self.one)
        y = x / m
        var = (y * y).mean(-1, keepdim=True)
        return y * torch.rsqrt(var + self.eps / m / m) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.inter = cfg.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up[..., : self.inter], gate_up[..., self.inter :]
        return self.down_proj(up * torch.nn.functional.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: Phi3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    # HF's rotate_half without its negation, which lives in the sign-folded sin table instead.
    # `half` is a Python constant: shape arithmetic in the graph trips coremltools 9.0 (coremltools#2633)
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class Phi3ForExport(nn.Module):
    """forward(input_ids[1, q] int32, causal_mask[1, 1, 1|q, end + 1]) -> logits[1, q, vocab]; caches updated.

    Scalars are buffers in the model's dtype and the RoPE negation is folded into the sin table, so a model
    built in fp16 converts without coremltools promoting activations (and then each weight, as a full copy)
    to fp32 through fp32 scalar consts. The exporter itself converts the fp32 build (see export.py).
    """

    def __init__(
        self,
        cfg: Phi3Config,
        context: int,
        dtype: torch.dtype = torch.float32,
        weight_device: str = "cpu",
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`weight_device="meta"` allocates no weights (the exporter installs placeholders instead);
        `cache_dtype` (default `dtype`) lets the exporter trace with fp16 caches, the Core ML state type,
        which halves their memory (1.6 GB in fp32 for Phi-3-mini at context 2048)."""
        super().__init__()
        if context < 1:
            raise ValueError("context must be positive")
        self.cfg, self.context = cfg, context
        with torch.device(weight_device):
            self.model = Backbone(cfg)
            if not cfg.tie_word_embeddings:
                self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, context)
        # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated)
        sin[:, : cfg.rotary_dim // 2] *= -1
        self.register_buffer("rope_cos", torch.tensor(cos, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin_signed", torch.tensor(sin, dtype=dtype), persistent=False)
        # positions as an int32 table, sliced with the traced sizes: integer math stays integer in the graph
        self.register_buffer("positions", torch.arange(context, dtype=torch.int32), persistent=False)
        if cfg.longrope is not None:
            orig = cfg.longrope.original_max_position_embeddings
            use_long = (torch.arange(context) >= orig).to(torch.int32)
            self.register_buffer("rope_use_long", use_long, persistent=False)
        self.register_buffer("mask_open", torch.tensor(0.0), persistent=False)
        self.register_buffer("mask_closed", torch.tensor(float("-inf")), persistent=False)
        self.register_buffer("attn_scale", torch.tensor(cfg.head_dim**-0.5), persistent=False)
        kv_shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, context, cfg.head_dim)
        self.register_buffer(KEY_CACHE, torch.zeros(kv_shape, dtype=dtype))
        self.register_buffer(VALUE_CACHE, torch.zeros(kv_shape, dtype=dtype))
        self.to(dtype)  # floating parameters and buffers only; the int32 index tables stay int32
        if cache_dtype is not None:
            self.keyCache.data = self.keyCache.data.to(cache_dtype)
            self.valueCache.data = self.valueCache.data.to(cache_dtype)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return tuple(self.keyCache.shape)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def reset_cache(self) -> None:
        self.keyCache.zero_()
        self.valueCache.zero_()

    def load_tensors(self, tensors: Iterable[tuple[str, np.ndarray]]) -> set[str]:
        """Copy HF-named tensors in one at a time (streaming); returns the names that were loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, value in tensors:
            if name not in params:
                continue
            p = params[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {tuple(p.shape)}")
            p.data.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            loaded.add(name)
        return loaded

    def _rope(self, past, q: int):
        cfg, ctx = self.cfg, self.context
        end = past + q
        if cfg.longrope is None:
            cos, sin = self.rope_cos[past:end], self.rope_sin_signed[past:end]
        else:
            # The long half of the tables is used iff end - 1 >= original_max (HF: max position + 1 > orig).
            # Integer tensors, not Python arithmetic on traced sizes: the converter turns the latter into
            # fp16 math, which cannot hold row numbers above 2048 exactly.
            use_long = self.rope_use_long[end - 1 : end]  # (1,) int32, 0 or 1
            rows = self.positions[past:end] + use_long * ctx
            cos, sin = self.rope_cos[rows], self.rope_sin_signed[rows]
        return cos[None, None], sin[None, None]  # (1, 1, q, rot)

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = self.cfg.rotary_dim
        if rot == self.cfg.head_dim:
            return x * cos + _swap_halves(x, rot // 2) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x_rot = x_rot * cos + _swap_halves(x_rot, rot // 2) * sin
        return torch.cat((x_rot, x_pass), dim=-1)

    def _attention_bias(self, past, end, causal_mask: torch.Tensor) -> torch.Tensor:
        """(q, end) additive bias: causal + sliding window from positions, plus the caller's mask."""
        diff = self.positions[past:end, None] - self.positions[None, :end]  # query pos - key pos, int32
        allowed = diff >= 0
        if self.cfg.sliding_window is not None:
            allowed = allowed & (diff < self.cfg.sliding_window)
        bias = torch.where(allowed, self.mask_open, self.mask_closed)
        return bias + causal_mask[0, 0, :, :end]  # rows: 1 (swift-transformers) or q

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q = input_ids.shape[-1]
        end = causal_mask.shape[-1] - 1  # swift-transformers' width is keys + 1 (see the module docstring)
        past = end - q
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group = nh // nkv
        cos, sin = self._rope(past, q)
        mask = self._attention_bias(past, end, causal_mask)[None, None, None]  # (1, 1, 1, q, end)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qkv = attn.qkv_proj(x)
            xq = qkv[..., : nh * hd].reshape(1, q, nh, hd).transpose(1, 2)
            xk = qkv[..., nh * hd : (nh + nkv) * hd].reshape(1, q, nkv, hd).transpose(1, 2)
            xv = qkv[..., (nh + nkv) * hd :].reshape(1, q, nkv, hd).transpose(1, 2)
            xq = self._apply_rope(xq, cos, sin)
            xk = self._apply_rope(xk, cos, sin)
            self.keyCache[i : i + 1, :, :, past:end, :] = xk[None]
            self.valueCache[i : i + 1, :, :, past:end, :] = xv[None]
            keys = self.keyCache[i, :, :, :end, :]  # (1, nkv, end, hd)
            values = self.valueCache[i, :, :, :end, :]
            if keys.dtype != xq.dtype:  # a static choice: only the exporter's fp16 caches take this branch
                keys, values = keys.to(xq.dtype), values.to(xq.dtype)
            # GQA without repeating K/V: HF's repeat_kv maps query head j to kv head j // group, so grouping
            # the query heads as (nkv, group) lines them up with their kv head.
            xq = xq.reshape(1, nkv, group * q, hd) * self.attn_scale
            scores = torch.matmul(xq, keys.transpose(-1, -2)).reshape(1, nkv, group, q, end) + mask
            probs = torch.softmax(scores, dim=-1).reshape(1, nkv, group * q, end)
            out = torch.matmul(probs, values).reshape(1, nh, q, hd).transpose(1, 2).reshape(1, q, nh * hd)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h)
        return torch.nn.functional.linear(h, self.lm_head_weight())


def generate_logits(model: Phi3ForExport, prompt: list[int], decode_tokens: list[int]) -> list[np.ndarray]:
    """Reference run: prefill `prompt`, then one call per decode token; returns float32 logits per call."""
    dtype = model.keyCache.dtype
    model.reset_cache()
    out = []
    past = 0
    with torch.no_grad():
        for chunk in [prompt] + [[t] for t in decode_tokens]:
            ids = torch.tensor([chunk], dtype=torch.int32)
            mask = torch.from_numpy(mask_input(past, len(chunk))).to(dtype)
            out.append(model(ids, mask).float().numpy()[0])
            past += len(chunk)
    return out
