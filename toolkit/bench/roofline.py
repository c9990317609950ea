"""The decode roofline: every weight is read once per generated token, so tok/s <= bandwidth / weight bytes.
A step also reads the KV cache's keys and values (`kv_bytes_per_step`): small at a short context, a third
of the bytes at 2k tokens of Phi-3-mini; the bench reports the fraction with them beside the weights-only one.

Bandwidth is measured with a read-only TVM kernel over an array much larger than the caches, split over
T cores (`toolkit.read_bandwidth`). Weight bytes come from a config and a storage scheme, or from the tensors
of a GGUF file. The embedding table is not counted (one row is read per token) unless it doubles as the
output layer (tied embeddings), where all of it is read."""

from __future__ import annotations

from pathlib import Path

from ..config import Phi3Config
from ..errors import UserError

# bytes per weight for 2-D weights, by scheme. Ours: 4-bit codes (0.5 B) + one scale per 32 values.
BYTES_PER_WEIGHT = {
    "q4f32_1": 0.5 + 4 / 32,
    "q4f16_1": 0.5 + 2 / 32,
    "q0f32": 4.0,  # ours, unquantized
    "q0f16": 2.0,
    "q4_0": 18 / 32,  # ggml: f16 scale + 16 B of codes per 32
    "q4_1": 20 / 32,  # ggml: f16 scale + f16 min + 16 B
    "q8_0": 34 / 32,
    "f16": 2.0,
    "f32": 4.0,
}
# norm weights: float32, except in our fp16 schemes (stored in the model dtype)
NORM_BYTES = {"q4f16_1": 2, "q0f16": 2}
KV_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def _gguf_scheme_bytes(cfg: Phi3Config, name: str) -> float:
    """Bytes of weights one decode step reads in a gguf_* scheme of ours, tensor by tensor (a mix such as
    Q4_K_M stores some layers' Linears in another type); fp16 norms, and fp16 for an f16 role."""
    from ..quantization import get_scheme

    s = get_scheme(name)

    def per(weight: str) -> float:
        layout = s.layout_for_weight(weight)
        return layout.bits_per_weight(16) / 8 if layout is not None else 2.0

    h, inter = cfg.hidden_size, cfg.intermediate_size
    sizes = {
        "self_attn.qkv_proj": h * cfg.qkv_size,
        "self_attn.o_proj": cfg.num_attention_heads * cfg.head_dim * h,
        "mlp.gate_up_proj": 2 * h * inter,
        "mlp.down_proj": inter * h,
    }
    layers = sum(
        n * per(f"model.layers.{i}.{k}.weight")
        for i in range(cfg.num_hidden_layers)
        for k, n in sizes.items()
    )
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return layers + cfg.vocab_size * h * per(head) + (2 * cfg.num_hidden_layers + 1) * h * 2


def weight_bytes_per_token(cfg: Phi3Config, scheme: str) -> int:
    """Bytes of weights one decode step reads for a Phi-3 config stored in `scheme`."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    layer_2d = h * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * h + 3 * h * cfg.intermediate_size
    if scheme.startswith("gguf_"):
        return int(round(_gguf_scheme_bytes(cfg, scheme)))
    if scheme not in BYTES_PER_WEIGHT:
        raise UserError(f"unknown quantization scheme {scheme!r}; known: {', '.join(BYTES_PER_WEIGHT)}")
    per = BYTES_PER_WEIGHT[scheme]
    total = L * layer_2d * per + (2 * L + 1) * h * NORM_BYTES.get(scheme, 4)
    total += cfg.vocab_size * h * per  # lm_head, or the tied embedding table acting as it
    return int(round(total))


def gguf_weight_bytes_per_token(path: str | Path) -> int:
    """The same count from a GGUF's tensors: all of them except `token_embd` unless there is no `output`."""
    from ..checkpoint.gguf_source import read_gguf

    reader = read_gguf(path)
    # rope factor tables (a few hundred bytes, only one of them used) are left out, as in the formula
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors if not t.name.startswith("rope_factors")}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


def kv_bytes_per_step(cfg: Phi3Config, kv_dtype: str, cached: int) -> int:
    """Bytes of K and V one decode step's attention reads with `cached` tokens already in the cache: every
    key the new token sees (itself included; only the last `sliding_window` where the model has one, as the
    host kernels mask it), in every layer. Padding a kernel reads beyond those keys is not counted."""
    if kv_dtype not in KV_ITEM_BYTES:
        raise UserError(f"unknown KV cache dtype {kv_dtype!r}; known: {', '.join(KV_ITEM_BYTES)}")
    keys = cached + 1
    if cfg.sliding_window:
        keys = min(keys, cfg.sliding_window)
    per_key = 2 * cfg.num_key_value_heads * cfg.head_dim * KV_ITEM_BYTES[kv_dtype]
    return cfg.num_hidden_layers * keys * per_key


def kv_bytes_of_steps(cfg: Phi3Config, kv_dtype: str, prompt: int, steps: int) -> list[int]:
    """`kv_bytes_per_step` of each of `steps` decode steps after a prompt of `prompt` tokens."""
    return [kv_bytes_per_step(cfg, kv_dtype, prompt + i) for i in range(steps)]
