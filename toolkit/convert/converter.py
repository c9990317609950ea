"""`phi3 convert`: checkpoint -> MLC-LLM weight folder (shards + tensor-cache.json + mlc-chat-config.json +
tokenizer), one tensor at a time.

Output folder:
  params_shard_*.bin, tensor-cache.json   weights (toolkit/convert/tensor_cache.py), HF Phi-3 names; a q4
                                          weight `X.weight` becomes `X.q_weight` (uint32) + `X.q_scale`
  mlc-chat-config.json                    model/config metadata in MLC's field names
  tokenizer.json, tokenizer_config.json   from the source's tokenizer
Everything is written into `<out>.tmp-<pid>` and renamed to `<out>` at the end, so a folder named `<out>` is
always complete. A rerun discards temp folders left by a dead (interrupted) run instead of resuming from them.

Memory: one source tensor (float32) + its quantized form + one pending shard (32 MiB); quantization works in
row blocks, so its temporaries are small.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Phi3Config
from ..errors import UserError
from ..locks import output_lock
from ..outputs import check_output_dir
from ..quantization import QuantScheme, get_scheme
from ..quantization import group_quant as gq
from .tensor_cache import CACHE_JSON, SHARD_PREFIX, TensorCacheWriter

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

CHAT_CONFIG = "mlc-chat-config.json"
MLC_CHAT_CONFIG_VERSION = "0.1.0"
# rtn: scale = max|w|/7; search: per-group clipping search (squared error); weighted: the same search with
# each input channel weighted by E[x^2] from a numpy forward over a short calibration text.
CLIP_METHODS = ("auto", "rtn", "search", "weighted")
# "auto" = weighted. Measured on SmolLM2-135M (q4f16_1, tinyshakespeare, 2040 tokens in 256-token windows,
# numpy reference forward): perplexity fp32 57.04, rtn 82.67, search 87.71 (lower weight error, WORSE
# perplexity), weighted 76.24.
AUTO_CLIP = "weighted"
DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class ConvertResult:
    out_dir: Path
    scheme: str
    clip: str
    num_tensors: int
    num_shards: int
    param_bytes: int
    bits_per_param: float
    seconds: float


# HF Phi-3 name -> MLC-LLM's Phi-3 param name (phi3_loader.py); `--param-names mlc` writes these so that a
# model library compiled by MLC-LLM finds its weights. Suffixes (.weight/.q_weight/.q_scale) are kept.
_MLC_NAMES = [
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
    for pat, rep in _MLC_NAMES:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return name  # lm_head.* is the same in both


def quantized_param_names(name: str) -> tuple[str, str]:
    """`X.weight` -> (`X.q_weight`, `X.q_scale`)."""
    base = name[: -len(".weight")]
    return f"{base}.q_weight", f"{base}.q_scale"


def should_quantize(name: str, shape: tuple[int, ...], scheme: QuantScheme) -> bool:
    """2-D Linear/embedding weights are quantized (per the scheme's embedding/final-fc flags), norms not."""
    if not scheme.is_quantized or len(shape) != 2 or not name.endswith(".weight"):
        return False
    if name == "model.embed_tokens.weight":
        return scheme.quantize_embedding
    if name == "lm_head.weight":
        return scheme.quantize_final_fc
    return True


def _check_values(name: str, arr: np.ndarray, scheme: QuantScheme, path: Path) -> None:
    """NaN/inf weights, or weights beyond fp16 for an fp16 scheme, would become garbage codes: refuse them."""
    big = float(np.abs(arr).max(initial=0.0))
    if not np.isfinite(big):
        raise UserError(f"tensor {name} contains NaN or inf values", path)
    if scheme.model_dtype == "float16" and big > 65504:
        raise UserError(f"tensor {name} has magnitude {big:g}, beyond float16; use q0f32 or q4f32_1", path)


def converted_tensors(
    source: ModelSource,
    scheme: QuantScheme,
    clip: str,
    progress=None,
    act_stats: dict[str, np.ndarray] | None = None,
):
    """Yield (param name, array) in the output format, one source tensor at a time."""
    from ..quantization.clip_search import search_scales

    for name, arr in source.iter_tensors():
        _check_values(name, arr, scheme, source.path)
        if should_quantize(name, arr.shape, scheme):
            scales = None
            if clip in ("search", "weighted"):
                act = None if act_stats is None else act_stats.get(name)
                scales = search_scales(arr, scheme, act_sq=None if act is None else act.astype(np.float32))
            q_weight, q_scale = gq.quantize(arr, scheme, scales=scales)
            qw_name, qs_name = quantized_param_names(name)
            yield qw_name, q_weight
            yield qs_name, q_scale
        else:
            yield name, arr.astype(scheme.model_dtype)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(name, refresh=False)
        del arr


def chat_config(
    source: ModelSource,
    scheme: QuantScheme,
    clip: str,
    tokenizer_files: list[str],
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
) -> dict[str, Any]:
    """mlc-chat-config.json content (MLC field names; `model_config` = our Phi3Config + MLC/HF-style keys)."""
    cfg = source.config
    context = int(context_window_size or cfg.max_position_embeddings)
    prefill = int(prefill_chunk_size or min(context, DEFAULT_PREFILL_CHUNK))
    sliding = int(cfg.sliding_window) if cfg.sliding_window else -1
    model_config = cfg.to_dict()
    model_config.update(
        {
            "model_type": "phi3",
            "position_embedding_base": cfg.rope_theta,
            "rope_scaling": None
            if cfg.longrope is None
            else {
                "type": "longrope",
                "short_factor": list(cfg.longrope.short_factor),
                "long_factor": list(cfg.longrope.long_factor),
            },
            "original_max_position_embeddings": (
                cfg.longrope.original_max_position_embeddings if cfg.longrope else cfg.max_position_embeddings
            ),
            "context_window_size": context,
            "prefill_chunk_size": prefill,
            "tensor_parallel_shards": 1,
            "max_batch_size": 1,
        }
    )
    eos = list(cfg.eos_token_ids)
    return {
        "version": MLC_CHAT_CONFIG_VERSION,
        "model_type": "phi3",
        "quantization": scheme.name,
        "model_config": model_config,
        "vocab_size": cfg.vocab_size,
        "context_window_size": context,
        "sliding_window_size": sliding,
        "prefill_chunk_size": prefill,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": tokenizer_files,
        "conv_template": source.conv_template,
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "model_task": "chat",
        # ours, ignored by MLC: how the weights were made
        "toolkit": {"clip": clip, "source": str(source.path), "source_kind": source.kind},
    }


def config_from_chat_config(chat: dict[str, Any], path: Path) -> Phi3Config:
    """Phi3Config back from an mlc-chat-config.json written by `chat_config`."""
    mc = chat.get("model_config")
    if not isinstance(mc, dict):
        raise UserError("mlc-chat-config.json has no model_config object", path)
    known = {f.name for f in fields(Phi3Config)} - {"extra"}
    try:
        return Phi3Config.from_dict({k: v for k, v in mc.items() if k in known})
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"model_config is not a Phi-3 config written by this toolkit ({e})", path) from None


# what a conversion writes: anything else in an earlier conversion's folder is the user's, so we refuse
CONVERT_OWNED = (f"{SHARD_PREFIX}_*.bin", CACHE_JSON, "tokenizer*", ".*.tmp")


def check_convert_output(out_dir: str | Path, inputs=()) -> Path:
    """Refuse an output that overlaps an input or holds anything but an earlier conversion."""
    return check_output_dir(
        out_dir, inputs=inputs, marker=CHAT_CONFIG, owned=CONVERT_OWNED, what="a `phi3 convert` output"
    )


def _check_out_dir(out_dir: Path, source: ModelSource) -> None:
    check_convert_output(out_dir, inputs=[source.path])


def convert(
    source: ModelSource | str | Path | None,
    scheme: QuantScheme | str,
    out_dir: str | Path,
    clip: str = "auto",
    progress: bool = True,
    shard_cap: int | None = None,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    param_names: str = "hf",
) -> ConvertResult:
    """Convert a checkpoint (a ModelSource, or a path for `toolkit.checkpoint.open_model`) into `out_dir`.

    `param_names`: "hf" (our compiled models) or "mlc" (MLC-LLM's Phi-3 names, for MLC-compiled libraries).
    """
    if clip not in CLIP_METHODS:
        raise UserError(f"unknown clip method {clip!r}; known: {', '.join(CLIP_METHODS)}")
    if param_names not in PARAM_NAME_STYLES:
        raise UserError(f"unknown param name style {param_names!r}; known: {', '.join(PARAM_NAME_STYLES)}")
    rename = to_mlc_name if param_names == "mlc" else (lambda n: n)
    if source is None or isinstance(source, (str, Path)):
        from ..checkpoint import open_model

        source = open_model(source)
    scheme = get_scheme(scheme)
    clip_used = (AUTO_CLIP if clip == "auto" else clip) if scheme.is_quantized else "none"
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, source)
    with output_lock(out_dir):  # one writer at a time; it also clears temp folders of dead runs
        _check_out_dir(out_dir, source)  # what the writer before us left must still be ours to replace
        return _convert_locked(
            source,
            scheme,
            out_dir,
            clip,
            clip_used,
            progress,
            shard_cap,
            context_window_size,
            prefill_chunk_size,
            param_names,
            rename,
        )


def _convert_locked(
    source,
    scheme,
    out_dir,
    clip,
    clip_used,
    progress,
    shard_cap,
    context_window_size,
    prefill_chunk_size,
    param_names,
    rename,
) -> ConvertResult:
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        names = source.tensor_names()
        act_stats = None
        if clip_used == "weighted":
            from ..quantization.calibration import (
                MIN_CALIBRATION_TOKENS,
                activation_stats,
                calibration_tokens,
            )

            tokens = calibration_tokens(source)
            if len(tokens) >= MIN_CALIBRATION_TOKENS:
                act_stats = activation_stats(source, tokens)
            elif clip == "auto":  # e.g. a GGUF with a placeholder vocabulary: nothing to calibrate on
                print(
                    f"{source.path}: its tokenizer gives {len(tokens)} tokens of the calibration text; "
                    "quantizing with round-to-nearest scales instead",
                    file=sys.stderr,
                )
                clip_used = "rtn"
            else:
                raise UserError(
                    f"{source.path}: its tokenizer gives only {len(tokens)} tokens of the calibration text "
                    f"(need {MIN_CALIBRATION_TOKENS}); use --clip rtn or search"
                )
        writer = TensorCacheWriter(tmp, **({"shard_cap": shard_cap} if shard_cap else {}))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(names), unit="tensor", desc=f"convert {scheme.name}", dynamic_ncols=True)
        try:
            for pname, arr in converted_tensors(source, scheme, clip_used, bar, act_stats):
                writer.add(rename(pname), arr)
        finally:
            if bar is not None:
                bar.close()
        cache = writer.finish(num_original_params=source.num_params())
        source.tokenizer().save(tmp)
        tok_files = sorted(p.name for p in tmp.iterdir() if p.name.startswith("tokenizer"))
        chat = chat_config(source, scheme, clip_used, tok_files, context_window_size, prefill_chunk_size)
        chat["toolkit"]["param_names"] = param_names
        (tmp / CHAT_CONFIG).write_text(json.dumps(chat, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(
        out_dir=out_dir,
        scheme=scheme.name,
        clip=clip_used,
        num_tensors=cache["metadata"]["ParamSize"],
        num_shards=len(cache["records"]),
        param_bytes=cache["metadata"]["ParamBytes"],
        bits_per_param=cache["metadata"]["BitsPerParam"],
        seconds=time.perf_counter() - t0,
    )


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to `out_dir`, replacing an older conversion (checked: ours)."""
    if out_dir.exists():
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


__all__ = [
    "CHAT_CONFIG",
    "CACHE_JSON",
    "ConvertResult",
    "chat_config",
    "convert",
    "config_from_chat_config",
    "quantized_param_names",
    "should_quantize",
]
