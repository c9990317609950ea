"""`model_config` of mlc-chat-config.json (MLC's model config for `model_type`) and stored param names.

MLC compiles from `model_config`: its Phi3Config / LlamaConfig read their own keys and keep the rest as
kwargs. We write MLC's keys (values as MLC's config would hold them after its defaults) and, in the same
object, our Phi3Config's fields, so that reading a converted folder gives back the exact config.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from ...config import Phi3Config
from ...errors import UserError

# MLC's default prefill chunk cap (Phi3Config / LlamaConfig __post_init__)
MLC_PREFILL_CHUNK_CAP = 8192
# `mlc_llm gen_config --max-batch-size` default
MLC_MAX_BATCH_SIZE = 128
MODEL_TYPES = ("phi3", "llama")


def model_type_of(cfg: Phi3Config) -> str:
    """MLC's model_type for a checkpoint: its source architecture (a Llama checkpoint is `llama`)."""
    if cfg.source_arch not in MODEL_TYPES:
        raise UserError(f"no MLC-LLM model type for source architecture {cfg.source_arch!r}")
    return cfg.source_arch


def mlc_sliding_window_size(cfg: Phi3Config) -> int:
    """-1 for every model: MLC's engine must never enable the KV cache's rolling window on our libraries.
    Rolling makes the cache's query positions relative to the window, and our graph rotates q/k with those
    positions before the cache; HF's window (`model_config.sliding_window`) is applied inside the host
    attention kernels instead (GPU kernels attend the whole context, as MLC's own Phi-3 libraries do)."""
    del cfg
    return -1


def default_window_sizes(
    cfg: Phi3Config, context_window_size: int | None, prefill_chunk_size: int | None
) -> tuple[int, int]:
    """(context, prefill chunk) as MLC's config defaults them: context = max_position_embeddings, prefill =
    min(context, 8192); a prefill chunk larger than the context is cut back the same way."""
    context = int(context_window_size or cfg.max_position_embeddings)
    if context <= 0:
        raise UserError(f"context window size must be positive, got {context}")
    prefill = int(prefill_chunk_size or 0)
    if prefill < 0:
        raise UserError(f"prefill chunk size must be positive, got {prefill}")
    if prefill == 0 or prefill > context:
        prefill = min(context, MLC_PREFILL_CHUNK_CAP)
    return context, prefill


def _longrope_scaling(cfg: Phi3Config) -> dict[str, Any] | None:
    if cfg.longrope is None:
        return None
    lr = cfg.longrope
    return {  # as MLC's Phi3Config rewrites it: type and rope_type, plus both position limits
        "type": "longrope",
        "short_factor": list(lr.short_factor),
        "long_factor": list(lr.long_factor),
        "rope_type": "longrope",
        "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": lr.original_max_position_embeddings,
    }


def mlc_model_config(cfg: Phi3Config, context: int, prefill: int) -> dict[str, Any]:
    """model_config: MLC's config fields for `model_type_of(cfg)` (in MLC's order), then our Phi3Config's."""
    common = dict(
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
        num_key_value_heads=cfg.num_key_value_heads,
        position_embedding_base=cfg.rope_theta,
        context_window_size=context,
        prefill_chunk_size=prefill,
        head_dim=cfg.head_dim,
        tensor_parallel_shards=1,
        max_batch_size=MLC_MAX_BATCH_SIZE,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    mtype = model_type_of(cfg)
    if mtype == "phi3":
        orig = cfg.longrope.original_max_position_embeddings if cfg.longrope else cfg.max_position_embeddings
        keys = (
            "model_type hidden_size vocab_size num_hidden_layers num_attention_heads intermediate_size "
            "rms_norm_eps num_key_value_heads max_position_embeddings position_embedding_base rope_scaling "
            "original_max_position_embeddings context_window_size prefill_chunk_size head_dim "
            "tensor_parallel_shards max_batch_size tie_word_embeddings partial_rotary_factor"
        )
        extra = dict(
            model_type="phi3",
            max_position_embeddings=cfg.max_position_embeddings,
            rope_scaling=_longrope_scaling(cfg),
            original_max_position_embeddings=orig,
            partial_rotary_factor=cfg.partial_rotary_factor,
        )
    else:
        if cfg.longrope is not None or cfg.partial_rotary_factor != 1.0:
            raise UserError("a llama model with longrope or partial rotary has no MLC-LLM LlamaConfig form")
        keys = (
            "hidden_size intermediate_size num_attention_heads num_hidden_layers rms_norm_eps vocab_size "
            "tie_word_embeddings position_embedding_base rope_scaling context_window_size prefill_chunk_size "
            "num_key_value_heads head_dim tensor_parallel_shards pipeline_parallel_stages max_batch_size "
            "disaggregation"
        )
        extra = dict(rope_scaling=None, pipeline_parallel_stages=1, disaggregation=False)
    both = common | extra
    out = {k: both[k] for k in keys.split()}
    for k, v in cfg.to_dict().items():  # ours; MLC keeps unknown keys as kwargs
        out.setdefault(k, v)
    return out


def config_from_model_config(mc: Any, path: Path) -> Phi3Config:
    """Our Phi3Config back from a model_config written by `mlc_model_config`."""
    if not isinstance(mc, dict):
        raise UserError("mlc-chat-config.json has no model_config object", path)
    if "source_arch" not in mc:
        # a folder from MLC-LLM itself: its model_config lacks what we need to run it exactly (LongRoPE's
        # attention factor, the sliding window, every EOS id), so refuse rather than guess
        raise UserError(
            "model_config was not written by phi3-toolkit (MLC-LLM's own folders are not read; convert the "
            "original checkpoint with `phi3 convert`)",
            path,
        )
    known = {f.name for f in fields(Phi3Config)} - {"extra"}
    try:
        return Phi3Config.from_dict({k: v for k, v in mc.items() if k in known})
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"model_config is not a Phi-3 config written by this toolkit ({e})", path) from None


# ---- parameter names -----------------------------------------------------------------------------------
# HF Phi-3 name -> MLC-LLM's Phi-3 param name (phi3_loader.py). MLC's Llama keeps HF's names with q/k/v and
# gate/up fused exactly as we store them, so for model_type llama MLC's names are ours.
_MLC_PHI3_NAMES = [
    (r"^model\.embed_tokens\.", "transformer.embd."),
    (r"^model\.norm\.", "transformer.norm."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln."),
    (r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.", r"transformer.h.\1.mixer.qkv_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.mixer.out_proj."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.post_attention_layernorm."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"transformer.h.\1.mlp."),
]
PARAM_NAME_STYLES = ("hf", "mlc")


def to_mlc_name(name: str) -> str:
    """HF Phi-3 name -> MLC-LLM's Phi-3 name (suffixes .weight/.q_weight/.q_scale kept)."""
    for pat, rep in _MLC_PHI3_NAMES:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return name  # lm_head.* is the same in both


def param_renamer(style: str, model_type: str):
    """Stored name for an HF name: `style` "hf" keeps it; "mlc" gives MLC's name for `model_type`."""
    if style not in PARAM_NAME_STYLES:
        raise UserError(f"unknown param name style {style!r}; known: {', '.join(PARAM_NAME_STYLES)}")
    if style == "mlc" and model_type == "phi3":
        return to_mlc_name
    return lambda n: n


def quantized_param_names(
    name: str, with_min: bool = False, suffixes: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """`X.weight` -> (`X.q_weight`, `X.q_scale`), plus `X.q_min` for a layout with mins (GGUF Q4_1); or
    `X.<suffix>` for each of a layout's `suffixes` (K-quants: q_high, q_sub too)."""
    base = name[: -len(".weight")]
    if suffixes is None:
        suffixes = ("q_weight", "q_scale") + (("q_min",) if with_min else ())
    return tuple(f"{base}.{s}" for s in suffixes)
