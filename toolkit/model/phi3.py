"""Phi-3 (Phi3ForCausalLM family) in tvm.relax.frontend.nn with TVM's TIR paged KV cache.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.qkv_proj.weight`, ...), so loading weights is
a name lookup; a quantized weight `X.weight` becomes `X.q_weight` + `X.q_scale`.

Exported functions: MLC-LLM's model-library interface (names, argument lists and results as its engine
calls them, cpp/serve/function_table.cc + model.cc at mlc-ai/mlc-llm 79d603f085f50500e9509fa01785ffa7ecfaaa93;
every function but `embed` and the cache factory also takes the packed params last):
  embed(input_ids[n])                                          -> [n, h]
  prefill(input_embed[1, s, h], kv)                            -> (logits of the last token [1, 1, V], kv)
  decode(input_embed[1, 1, h], kv)                             -> ([1, 1, V], kv)
  batch_prefill(input_embeds[1, s, h], logit_positions[b], kv) -> ([1, b, V], kv)  (b sequences concatenated)
  batch_decode(input_embeds[b, 1, h], kv)                      -> ([b, 1, V], kv)  (one token per sequence)
  batch_verify(input_embeds[1, s, h], kv)                      -> ([1, s, V], kv)  (logits of every token)
  create_tir_paged_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, support_sliding_window)
Token positions come from the KV cache (the sequences and lengths given to `kv_state_begin_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from ..config import Phi3Config
from ..errors import UserError
from ..quantization import get_scheme
from ..quantization.tvm_layers import make_embedding, make_linear, take
from .activation import silu_mul
from .kv_kernels import install as _install_kv_kernels
from .rope import apply_rope_to_qkv, longrope_flags, rope_table

# the wheel's GPU attention-merge kernel races on its in-place log-sum-exp (kv_kernels.py)
_install_kv_kernels()


@dataclass(frozen=True)
class GraphOptions:
    """What the compiled graph computes in: quantization scheme and activation dtype."""

    quantization: str = "q0f32"
    dtype: str = "float32"  # activations
    kv_dtype: str | None = None  # the paged KV cache; None = the activation dtype
    # decode takes [1, 1, h] (MLC's own shape): GPU builds, where dlight's GEMV rule needs a static row count;
    # the host keeps a symbolic batch (its batched GEMV schedules, see spec())
    static_decode: bool = False
    # GPU builds: the KV cache rotates q/k (TVM's split kernel, which runs anyway; MLC's own Phi-3 libraries
    # do the same) wherever that is exactly our RoPE (see `cache_rope_exact`): our kernel reads positions
    # from a cache builtin, so it can't join a CUDA graph and cost a launch and a graph break per layer
    cache_rope: bool = False
    # GPU builds: our decode attention kernel replaces TVM's (compile/gpu_attention.py; preset key
    # `decode_attention`)
    gpu_decode_attention: bool = False

    @property
    def cache_dtype(self) -> str:
        return self.kv_dtype or self.dtype

    @property
    def norm_dtype(self) -> str:
        """The stored dtype of the norm weights: the scheme's model dtype, as weights folders hold them, so
        a library computing in fp32 (the host) still loads a q4f16_1 folder unchanged through MLC's
        tensor-cache builtins. Unquantized schemes keep the activation dtype."""
        scheme = get_scheme(self.quantization)
        return scheme.model_dtype if scheme.is_quantized else self.dtype


class RMSNorm(nn.Module):
    """RMS norm whose weight is stored in `weight_dtype` and used in the activation dtype."""

    def __init__(self, dim: int, eps: float, dtype: str, weight_dtype: str) -> None:
        self.eps, self.dtype = eps, dtype
        self.weight = nn.Parameter((dim,), dtype=weight_dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if self.weight.dtype == self.dtype:
            return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)
        # the weight widened inside the norm's own kernel: a separate cast would be a kernel per norm and
        # step (FuseOps leaves it outside the norm), for a value that never changes
        return op.tensor_expr_op(_rms_norm_widened, "rms_norm", [x, self.weight, self.eps])


def _rms_norm_widened(x: te.Tensor, w: te.Tensor, eps: float) -> te.Tensor:
    """RMS norm over the last axis of fp32 `x` with `w` stored in another dtype, in the expression order of
    TVM's `rms_norm` legalization (rsqrt(sum(x^2) / d + eps) * x * w), so the result is the same."""
    d = x.shape[-1]
    k = te.reduce_axis((0, d), name="k")
    sq = te.compute(x.shape[:-1], lambda *i: te.sum(x[(*i, k)] * x[(*i, k)], axis=k), name="rms_sq")

    def out(*i):
        r = te.rsqrt(sq[i[:-1]] / tirx.const(float(int(d)), x.dtype) + tirx.const(eps, x.dtype))
        return r * x[i] * w[i[-1]].astype(x.dtype)

    return te.compute(x.shape, out, name="rms_norm")


def _linear(
    in_f: int, out_f: int, opts: GraphOptions, name: str, out_dtype: str | None = None, role: str = "linear"
) -> nn.Module:
    """A Linear whose Hugging Face weight is `name`.weight (a gguf mix stores some layers in another type)."""
    return make_linear(
        in_f, out_f, opts.quantization, opts.dtype, out_dtype=out_dtype, role=role, name=f"{name}.weight"
    )


class Phi3Attention(nn.Module):
    def __init__(self, cfg: Phi3Config, opts: GraphOptions, prefix: str) -> None:
        self.cfg, self.dtype, self.cache_dtype = cfg, opts.dtype, opts.cache_dtype
        self.qkv_proj = _linear(cfg.hidden_size, cfg.qkv_size, opts, f"{prefix}.qkv_proj")
        self.o_proj = _linear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, opts, f"{prefix}.o_proj"
        )

    def forward(self, x: nn.Tensor, rope, kv: PagedKVCache, layer: int):
        c = self.cfg
        b, s, _ = x.shape
        n_heads = c.num_attention_heads + 2 * c.num_key_value_heads
        if rope is None:  # the cache rotates q/k
            qkv = op.reshape(self.qkv_proj(x), (b, s, n_heads, c.head_dim))
        else:  # the rope kernel writes q/k/v in the cache's dtype
            qkv = op.reshape(self.qkv_proj(x), (b * s, n_heads, c.head_dim))  # (n, nH+2nKV, hd)
            qkv = apply_rope_to_qkv(qkv, rope, c, out_dtype=self.cache_dtype)
            qkv = op.reshape(qkv, (b, s, n_heads, c.head_dim))
        if qkv.dtype != self.cache_dtype:  # the cache's kernels take q/k/v/o in its dtype (fp32 inside)
            qkv = qkv.astype(self.cache_dtype)
        o = kv.attention_with_fused_qkv(layer, qkv, c.num_attention_heads, sm_scale=c.head_dim**-0.5)
        if self.cache_dtype != self.dtype:
            o = o.astype(self.dtype)
        return self.o_proj(op.reshape(o, (b, s, c.num_attention_heads * c.head_dim)))


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Phi3Config, opts: GraphOptions, prefix: str) -> None:
        self.gate_up_proj = _linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, opts, f"{prefix}.gate_up_proj"
        )
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, opts, f"{prefix}.down_proj")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))  # HF: first half is the gate


class Phi3DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config, opts: GraphOptions, index: int) -> None:
        norm = (cfg.hidden_size, cfg.rms_norm_eps, opts.dtype, opts.norm_dtype)
        self.input_layernorm = RMSNorm(*norm)
        self.self_attn = Phi3Attention(cfg, opts, f"model.layers.{index}.self_attn")
        self.post_attention_layernorm = RMSNorm(*norm)
        self.mlp = Phi3MLP(cfg, opts, f"model.layers.{index}.mlp")

    def forward(self, x, rope, kv: PagedKVCache, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg: Phi3Config, opts: GraphOptions) -> None:
        scheme = get_scheme(opts.quantization)
        if scheme.max_layer() >= cfg.num_hidden_layers:  # a gguf mix naming layers this model lacks
            raise UserError(
                f"quantization {scheme.name} names layer {scheme.max_layer()}; the model has "
                f"{cfg.num_hidden_layers} layers"
            )
        self.embed_tokens = make_embedding(cfg.vocab_size, cfg.hidden_size, opts.quantization, opts.dtype)
        self.layers = nn.ModuleList([Phi3DecoderLayer(cfg, opts, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.dtype, opts.norm_dtype)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, cfg: Phi3Config, opts: GraphOptions, target: Target) -> None:
        self.cfg, self.opts, self.target = cfg, opts, target
        self.rope_in_cache = opts.cache_rope and cache_rope_exact(cfg)
        self.model = Phi3Model(cfg, opts)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(
                cfg.hidden_size, cfg.vocab_size, opts, "lm_head", out_dtype="float32", role="head"
            )

    def _body(self, x: nn.Tensor, kv: PagedKVCache, ends: str, logit_positions: nn.Tensor | None = None):
        b, s, _ = x.shape
        rope = None
        if not self.rope_in_cache:
            positions = kv.get_query_positions(b * s)
            rope = rope_table(positions, longrope_flags(positions, self.cfg, ends, logit_positions), self.cfg)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, kv, i)
        return self.model.norm(x)

    def _logits(self, x: nn.Tensor) -> nn.Tensor:
        # logits leave the graph in fp32 whatever the activation dtype (sampling and perplexity need it)
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.lm_head_forward(x, out_dtype="float32")
        return self.lm_head(x)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        h = self._body(input_embed, paged_kv_cache, "forward")

        def last_token(x: te.Tensor) -> te.Tensor:  # (1, s, d) -> (1, 1, d): only that row reaches lm_head
            return te.compute((1, 1, x.shape[2]), lambda i, j, k: x[i, x.shape[1] - 1, k], name="last_token")

        return self._logits(op.tensor_expr_op(last_token, "last_token", [h])), paged_kv_cache

    def decode(self, input_embed: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_embed, paged_kv_cache, "token")), paged_kv_cache

    def batch_prefill(self, input_embeds: nn.Tensor, logit_positions: nn.Tensor, paged_kv_cache):
        h = self._body(input_embeds, paged_kv_cache, "segments", logit_positions)
        return self._logits(take(h, logit_positions, axis=1)), paged_kv_cache

    def batch_decode(self, input_embeds: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_embeds, paged_kv_cache, "token")), paged_kv_cache

    def batch_verify(self, input_embeds: nn.Tensor, paged_kv_cache: PagedKVCache):
        # tokens of several sequences, boundaries unknown to the graph: a run of consecutive positions is one
        return self._logits(self._body(input_embeds, paged_kv_cache, "runs")), paged_kv_cache

    def create_tir_paged_kv_cache(
        self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window
    ) -> PagedKVCache:
        c = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL if self.rope_in_cache else RopeMode.NONE,  # else ours (rope.py)
            rope_scale=1,
            rope_theta=int(c.rope_theta),
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.rotary_dim,
            enable_disaggregation=False,
            dtype=self.opts.cache_dtype,
            target=self.target,
            # only read by the sliding-window prefill kernel's mask: row r of a chunk sees W - r - 1 cached
            # keys, so every query sees exactly W keys like HF's 0 <= q - k < W
            layer_sliding_window_size=attention_window(c),
        )

    def spec(self) -> nn.spec.ModuleSpec:
        h, dt = self.cfg.hidden_size, self.opts.dtype
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        kv = nn.spec.Object(object_type=PagedKVCache)

        def embeds(shape: list) -> dict:
            return {"input_embeds": nn.spec.Tensor(shape, dt), "paged_kv_cache": kv, **packed}

        return nn.spec.ModuleSpec.from_raw(
            {
                "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **packed},
                "prefill": {
                    "input_embed": nn.spec.Tensor([1, "seq_len", h], dt),
                    "paged_kv_cache": kv,
                    **packed,
                },
                # MLC calls it with [1, 1, h]; a symbolic batch keeps the host's batched GEMV schedules, which
                # the static-shape kernels miss (3.5x slower per token, SmolLM2, 1 thread)
                "decode": {
                    "input_embed": nn.spec.Tensor([1 if self.opts.static_decode else "batch_size", 1, h], dt),
                    "paged_kv_cache": kv,
                    **packed,
                },
                "batch_prefill": {
                    "input_embeds": nn.spec.Tensor([1, "seq_len", h], dt),
                    "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                    "paged_kv_cache": kv,
                    **packed,
                },
                "batch_decode": embeds(["batch_size", 1, h]),
                "batch_verify": embeds([1, "seq_len", h]),
                "create_tir_paged_kv_cache": {
                    "max_batch_size": int,
                    "max_total_seq_len": int,
                    "prefill_chunk_size": int,
                    "page_size": int,
                    "support_sliding_window": int,
                    "$": {"param_mode": "none", "effect_mode": "none"},
                },
            },
            self,
        )


def cache_rope_exact(cfg: Phi3Config) -> bool:
    """Whether the KV cache's own RoPE computes ours: one factor set (no LongRoPE, so no per-sequence choice
    and no attention factor), every dimension rotated, and an integral theta (the cache takes it as an
    int). The cache's query positions are absolute: its sliding window is never enabled
    (engine.KV_SLIDING_WINDOW_SUPPORT)."""
    return cfg.longrope is None and cfg.rotary_dim == cfg.head_dim and float(cfg.rope_theta).is_integer()


def attention_window(cfg: Phi3Config) -> int:
    """The window the KV cache's sliding-window prefill kernel masks with (TVM needs one even without)."""
    return cfg.sliding_window or 1024


def export_phi3(cfg: Phi3Config, opts: GraphOptions, target: Target):
    """-> (IRModule, [(param name, nn.Parameter)]) for the graph, as TVM's frontend exports it (the compile
    pipeline's target passes come after: compile/pipeline.export_model)."""
    model = Phi3ForCausalLM(cfg, opts, target)
    return model.export_tvm(spec=model.spec())
