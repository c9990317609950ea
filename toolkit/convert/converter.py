"""`phi3 convert`: checkpoint -> MLC-LLM weight folder (shards + tensor-cache.json + mlc-chat-config.json +
tokenizer), one tensor at a time.

Output folder (MLC-LLM's format, toolkit/checkpoint/mlc_format/), what MLC's convert_weight + gen_config make:
  params_shard_*.bin, tensor-cache.json   weights, HF Phi-3 names (or MLC's, `param_names="mlc"`); a q4
                                          weight `X.weight` becomes `X.q_weight` (uint32) + `X.q_scale`
  mlc-chat-config.json                    MLC's chat config (gen_config.py)
  tokenizer.json, tokenizer_config.json,  the checkpoint's files, byte for byte; a GGUF gets a tokenizer.json
  generation_config.json, ...             built from its metadata
Everything is written into `<out>.tmp-<pid>` and renamed to `<out>` at the end, so a folder named `<out>` is
always complete. A rerun discards temp folders left by a dead (interrupted) run instead of resuming from them.

Memory: two source tensors (float32: the one being quantized and the next, read meanwhile, `read_ahead.py`) +
its quantized form + one pending shard (32 MiB); quantization works in row blocks, so its temporaries are
small. The weighted clip search holds a decoder layer instead (the one its calibration forward has just run
through) plus the next layer's tensor of the role being quantized, read meanwhile.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..checkpoint.mlc_format import (
    CACHE_JSON,
    CHAT_CONFIG,
    PARAM_NAME_STYLES,
    TOKENIZER_FILES,
    TensorCacheWriter,
    model_type_of,
    param_renamer,
    quantized_param_names,
    to_mlc_name,
    write_chat_config,
)
from ..checkpoint.mlc_format.tensor_cache import SHARD_PREFIX
from ..errors import UserError
from ..locks import output_lock
from ..outputs import check_output_dir
from ..quantization import QuantScheme, get_scheme
from ..quantization import group_quant as gq
from .gen_config import gen_chat_config, write_tokenizer_files
from .read_ahead import read_ahead

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

# rtn: scale = max|w|/7; search: per-group clipping search (squared error); weighted: the same search with
# each input channel weighted by E[x^2] from a numpy forward over a short calibration text; gptq: GPTQ error
# feedback on the decoder Linears and the lm_head (weighted-search scales), layer by layer (gptq_stream.py).
CLIP_METHODS = ("auto", "rtn", "search", "weighted", "gptq")
# the methods that run the calibration forward
CALIBRATED = ("weighted", "gptq")
# "auto" = weighted (with too few calibration tokens it falls back to rtn). gptq has the lowest perplexity
# but stays opt-in: at Phi-3-mini width it peaks at 1.48 GiB RSS (1-2 layer checkpoints, 2026-12-03; was
# 2.06, before that 5.1 GB), and takes ~30 s a layer (~16 min for 32, extrapolated). Measured on SmolLM2-135M
# (q4f16_1, tinyshakespeare, 2040 tokens in 256-token windows, numpy reference forward), from the Q4_1
# GGUF: fp32 57.04, rtn 82.67, search 87.71 (lower weight error, WORSE perplexity), weighted 76.24; from a
# bf16 copy of it (examples/make_smollm2_bf16.py): fp 57.07, rtn 82.81, weighted 76.43, gptq 68.16 (one
# draw of 67.8-71.9, see gptq_stream; `phi3 eval --device host`: 57.07, 82.85, 76.55, 68.80), i.e. 43-46%
# of rtn's rise, against 75% for weighted.
AUTO_CLIP = "weighted"


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
    # by row blocks: np.abs of a whole 32064 x 3072 embedding would be a 394 MB temporary
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(1, -1)
    big = max(
        (float(np.abs(rows[r0 : r0 + 256]).max(initial=0.0)) for r0 in range(0, rows.shape[0], 256)),
        default=0.0,
    )
    if not np.isfinite(big):
        raise UserError(f"tensor {name} contains NaN or inf values", path)
    if scheme.model_dtype == "float16" and big > 65504:
        raise UserError(f"tensor {name} has magnitude {big:g}, beyond float16; use q0f32 or q4f32_1", path)


def gguf_scheme_tensors(source: ModelSource, scheme: QuantScheme, progress=None):
    """Yield (param name, array) for a gguf scheme, one source tensor at a time: a GGUF tensor already in its
    role's block type is repacked bit for bit (`gguf_blocks.from_blocks`); any other 2-D weight of a
    quantized role is quantized from float with llama.cpp's reference quantizer (`gguf.quants`); the rest
    (norms, roles the scheme keeps plain) is stored in the model dtype."""
    from ..quantization import gguf_blocks

    raw_rows = getattr(source, "raw_rows", None)  # only a GGUF source has blocks to keep
    requantized = []
    for name in source.tensor_names():
        shape = source.tensor_shape(name)
        block = scheme.weight_block_type(name) if len(shape) == 2 and name.endswith(".weight") else None
        raw = raw_rows(name) if block is not None and raw_rows is not None else None
        if raw is not None and gguf_blocks.block_type_of(raw[0]) == block:
            arrays = gguf_blocks.from_blocks(raw[1], block)
        else:
            ((_, arr),) = source.iter_tensors([name])
            _check_values(name, arr, scheme, source.path)
            if block is None:
                arrays = None
                yield name, arr.astype(scheme.model_dtype)
            else:
                if raw is not None:
                    requantized.append(f"{name} ({raw[0]})")
                try:
                    arrays = gguf_blocks.quantize(arr, block)
                except ValueError as e:
                    raise UserError(f"tensor {name}: {e}", source.path) from None
            del arr
        if arrays is not None:
            suffixes = scheme.layout_for_weight(name).suffixes
            arrays = gguf_blocks.stored(arrays, scheme.scale_dtype)
            yield from zip(quantized_param_names(name, suffixes=suffixes), arrays)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(name, refresh=False)
    if requantized:
        print(
            f"{source.path}: {len(requantized)} tensors re-quantized into {scheme.name} from another GGUF "
            f"type (first: {requantized[0]})",
            file=sys.stderr,
        )


def converted_tensors(
    source: ModelSource,
    scheme: QuantScheme,
    clip: str,
    progress=None,
    calib_tokens: list[int] | None = None,
):
    """Yield (param name, array) in the output format, one source tensor at a time (for gptq: one layer).
    `calib_tokens` (weighted, gptq): the calibration text's ids; the forward over them runs as the tensors
    stream (`calibration.tensors_with_stats`), so the checkpoint is read once."""
    from ..quantization.clip_search import search_scales

    if scheme.kind == "gguf":
        yield from gguf_scheme_tensors(source, scheme, progress)
        return
    if clip == "gptq":
        from .gptq_stream import gptq_tensors

        yield from gptq_tensors(
            source,
            scheme,
            calib_tokens,
            check=lambda name, arr: _check_values(name, arr, scheme, source.path),
            should_quantize=lambda name, shape: should_quantize(name, shape, scheme),
            progress=progress,
        )
        return
    if clip == "weighted":
        from .calibration import tensors_with_stats

        items = tensors_with_stats(source, calib_tokens)
    else:
        items = ((name, arr, None) for name, arr in read_ahead(source.iter_tensors()))
    for name, arr, act in items:
        _check_values(name, arr, scheme, source.path)
        if should_quantize(name, arr.shape, scheme):
            scales = None
            if clip in ("search", "weighted"):
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


# what a conversion writes: anything else in an earlier conversion's folder is the user's, so we refuse
CONVERT_OWNED = (f"{SHARD_PREFIX}_*.bin", CACHE_JSON, *TOKENIZER_FILES, ".*.tmp", "*.tmp")


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

    `param_names`: "hf" (our compiled models) or "mlc" (MLC-LLM's names for the model type, for
    MLC-compiled libraries; a Llama checkpoint's are ours already).
    `context_window_size` / `prefill_chunk_size`: mlc-chat-config values (default: MLC's, see mlc_format).
    """
    if clip not in CLIP_METHODS:
        raise UserError(f"unknown clip method {clip!r}; known: {', '.join(CLIP_METHODS)}")
    if source is None or isinstance(source, (str, Path)):
        from ..checkpoint import open_model

        source = open_model(source)
    rename = param_renamer(param_names, model_type_of(source.config))
    scheme = get_scheme(scheme)
    # clip methods choose MLC group scales; a gguf scheme keeps (or quantizes with) llama.cpp's
    if clip != "auto" and not (scheme.kind == "group" and scheme.is_quantized):
        raise UserError(f"--clip {clip}: {scheme.name} has no q4 group scales to choose; drop --clip")
    clip_used = (AUTO_CLIP if clip == "auto" else clip) if scheme.kind == "group" else "none"
    positions = source.config.max_position_embeddings
    if context_window_size is not None and context_window_size > positions:
        raise UserError(
            f"--context-window {context_window_size}: longer than the model's {positions} positions"
        )
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
        tokens = None
        if clip_used in CALIBRATED:
            from .calibration import MIN_CALIBRATION_TOKENS, calibration_tokens

            if clip_used == "gptq":
                from .gptq_stream import gptq_calibration_tokens

                tokens = gptq_calibration_tokens(source)
            else:
                tokens = calibration_tokens(source)
            if len(tokens) < MIN_CALIBRATION_TOKENS:
                if clip != "auto":
                    raise UserError(
                        f"{source.path}: its tokenizer gives only {len(tokens)} tokens of the calibration "
                        f"text (need {MIN_CALIBRATION_TOKENS}); use --clip rtn or search"
                    )
                # e.g. a GGUF with a placeholder vocabulary: nothing to calibrate on
                print(
                    f"{source.path}: its tokenizer gives {len(tokens)} tokens of the calibration text; "
                    "quantizing with round-to-nearest scales instead",
                    file=sys.stderr,
                )
                clip_used = "rtn"
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(names), unit="tensor", desc=f"convert {scheme.name}", dynamic_ncols=True)
        # leaving the block waits for the shard writer's thread: nothing writes into `tmp` once it is removed
        with TensorCacheWriter(tmp, **({"shard_cap": shard_cap} if shard_cap else {})) as writer:
            try:
                for pname, arr in converted_tensors(source, scheme, clip_used, bar, tokens):
                    writer.add(rename(pname), arr)
            finally:
                if bar is not None:
                    bar.close()
            cache = writer.finish(num_original_params=source.num_params())
        tok_files = write_tokenizer_files(source, tmp)
        chat = gen_chat_config(
            source,
            scheme,
            tmp,
            tok_files,
            context_window_size=context_window_size,
            prefill_chunk_size=prefill_chunk_size,
            toolkit_info={
                "clip": clip_used,
                "source": str(source.path),
                "source_kind": source.kind,
                "param_names": param_names,
            },
        )
        write_chat_config(chat, tmp)
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
    "PARAM_NAME_STYLES",
    "ConvertResult",
    "convert",
    "quantized_param_names",
    "should_quantize",
    "to_mlc_name",
]
