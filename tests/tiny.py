"""Tiny random Phi3ForCausalLM checkpoints written by transformers' save_pretrained (real names and shapes).

Weights are re-randomised (std 1.5/sqrt(fan_in), norm weights in U(0.5, 1.5)) so that attention is not near
uniform and numerical mistakes show up in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# One entry per family member, shrunk: what matters is the structure (GQA, longrope, partial rotary, ...).
VARIANTS: dict[str, dict] = {
    # Phi-3-mini-4k: MHA with a sliding window (2047 there, 16 here so tests cross it)
    "mini-4k": dict(sliding_window=16),
    # Phi-3-mini-128k / Phi-3.5-mini: longrope; original_max small so decode crosses it in a test
    "mini-128k": dict(
        max_position_embeddings=256,
        original_max_position_embeddings=16,
        rope_scaling="longrope",
    ),
    # Phi-3-medium: GQA
    "medium": dict(num_attention_heads=8, num_key_value_heads=2),
    # Phi-4-mini: GQA, partial rotary 0.75, tied embeddings, longrope
    "phi4-mini": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=128,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        original_max_position_embeddings=16,
        rope_scaling="longrope",
    ),
}


def _longrope_factors(rotary_dim: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = rotary_dim // 2
    return {
        "type": "longrope",
        "short_factor": [float(x) for x in 1.0 + rng.uniform(0, 0.5, n)],
        "long_factor": [float(x) for x in 1.0 + rng.uniform(1, 8, n)],
    }


def hf_config(variant: str, **overrides):
    """A transformers Phi3Config for a tiny variant."""
    from transformers import Phi3Config

    kw = dict(BASE)
    kw.update(VARIANTS[variant])
    kw.update(overrides)
    if kw.get("rope_scaling") == "longrope":
        head_dim = kw["hidden_size"] // kw["num_attention_heads"]
        rot = int(head_dim * kw.get("partial_rotary_factor", 1.0))
        kw["rope_scaling"] = _longrope_factors(rot, seed=7)
    return Phi3Config(**kw)


def make_tiny_checkpoint(
    out: Path,
    variant: str = "mini-4k",
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random checkpoint folder (with a small tokenizer.json) and return it.

    dtype: float32 | float16 | bfloat16."""
    import torch
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(variant, **overrides)
    cfg._attn_implementation = "eager"
    model = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
            else:
                p.uniform_(0.5, 1.5)
        if not cfg.tie_word_embeddings:
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model = model.to(getattr(torch, dtype))
    out = Path(out)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    if tokenizer:
        from tiny_tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(out, cfg.vocab_size)
    return out


def load_hf_model(path: Path):
    """The transformers oracle for a checkpoint folder, fp32, eager attention."""
    import torch
    from transformers import Phi3ForCausalLM

    model = Phi3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
