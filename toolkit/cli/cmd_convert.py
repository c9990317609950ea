"""`phi3 convert CHECKPOINT --quantization q4f16_1 -o OUT`: write MLC-LLM-format weights (streaming)."""

from __future__ import annotations

import click

from .options import quantization_choice


@click.command()
@click.argument("checkpoint", required=False)
@click.option(
    "--quantization",
    "-q",
    type=quantization_choice(),
    default=None,
    help="q0f32, q0f16, q4f16_1, q4f32_1 or gguf_<type>[-<embedding type>[-<head type>]] (types q4_0, "
    "q4_1, q8_0, q4_k, q5_k, q6_k; f16 = unquantized), then per-layer exceptions of a mix such as Q4_K_M "
    "(-<qkv|o|gateup|down>_<type>[_l<hex layer mask>]); a trailing _f32 computes in fp32 (f32 = "
    "unquantized), for devices without fp16 such as PoCL. Default: a GGUF whose layers are in those "
    "block types keeps its blocks (e.g. gguf_q4_1-q8_0), anything else q4f16_1.",
)
@click.option(
    "--output",
    "-o",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (written to OUT.tmp-<pid>, renamed when complete).",
)
@click.option(
    "--clip",
    type=click.Choice(["auto", "rtn", "search", "weighted", "gptq"]),
    default="auto",
    show_default=True,
    help="q4 scales and codes (same storage either way): rtn = max|w|/7; search = per-group clipping search "
    "minimising weight error; weighted = that search weighted by activation statistics of a short "
    "calibration text; gptq = GPTQ error feedback from the calibration activations, layer by layer "
    "(lowest perplexity measured; minutes for SmolLM2, far more at Phi-3-mini size); "
    "auto = weighted.",
)
@click.option(
    "--context-window",
    type=click.IntRange(1),
    default=None,
    help="context_window_size (default: the model's).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(1),
    default=None,
    help="prefill_chunk_size (default: min(context, 8192), like MLC).",
)
@click.option(
    "--param-names",
    type=click.Choice(["hf", "mlc"]),
    default="hf",
    show_default=True,
    help="hf: our compiled models' names; mlc: MLC-LLM's names (for MLC-compiled libraries).",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin checkpoints (unsafe).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(
    checkpoint,
    quantization,
    output,
    clip,
    context_window,
    prefill_chunk,
    param_names,
    allow_pickle,
    no_progress,
):
    """Convert CHECKPOINT (HF folder, GGUF; default: the embedded model) to quantized MLC-LLM weights."""
    from .. import api

    if context_window and prefill_chunk and prefill_chunk > context_window:
        raise click.BadParameter(
            f"{prefill_chunk} is larger than --context-window {context_window}", param_hint="--prefill-chunk"
        )
    res = api.convert(
        checkpoint,
        output,
        quantization=quantization,
        allow_pickle=allow_pickle,
        clip=clip,
        progress=not no_progress,
        context_window_size=context_window,
        prefill_chunk_size=prefill_chunk,
        param_names=param_names,
    )
    click.echo(
        f"wrote {res.out_dir}: {res.scheme} (clip {res.clip}), {res.num_tensors} tensors in {res.num_shards} "
        f"shards, {res.param_bytes / 2**20:.1f} MiB, {res.bits_per_param:.2f} bits/param, {res.seconds:.1f} s"
    )
