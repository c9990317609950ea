"""phi3 generate: one prompt, text streamed to stdout (through the Python API)."""

from __future__ import annotations

import sys
import time

import click

from .options import (
    model_argument,
    open_engine,
    prompt_option,
    run_options,
    sample_on_option,
    sampling_changes,
    sampling_options,
    utf8_text,
)


@click.command("generate")
@model_argument
@prompt_option
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option(
    "--system", default=None, callback=utf8_text, help="System message (chat templates that have one)."
)
@click.option("--stats/--no-stats", default=True, help="Print speed statistics to stderr.")
@sampling_options
@sample_on_option
@run_options
def command(
    model, prompt, raw, system, stats, quantization, device, threads, allow_pickle, sample_on, **sampling
):
    """Generate from PROMPT with MODEL (HF folder, .gguf, converted folder; default: SmolLM2-135M)."""
    from ..api import Model

    changes = sampling_changes(sampling)
    engine, source = open_engine(
        model,
        quantization=quantization,
        device=device,
        threads=threads,
        allow_pickle=allow_pickle,
        sample_on=sample_on,
    )
    m = Model(engine, source)
    t0 = time.perf_counter()
    first = None
    gen, steps = m.stream_steps(prompt, raw=raw, system=system, **changes)
    for st in steps:
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(st.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        click.echo(speed_line(len(gen.prompt), len(gen.tokens), t0, first, gen.finish_reason), err=True)


def speed_line(prompt_tokens: int, generated: int, t0: float, first: float | None, reason: str | None) -> str:
    """Prefill speed up to the first token, decode speed after it."""
    end = time.perf_counter()
    first = first or end
    pf = prompt_tokens / (first - t0) if first > t0 else 0.0
    dc = (generated - 1) / (end - first) if generated > 1 and end > first else 0.0
    return (
        f"prompt {prompt_tokens} tok, prefill {pf:.1f} tok/s; generated {generated} tok, "
        f"decode {dc:.1f} tok/s; stop: {reason}"
    )
