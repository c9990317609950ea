"""phi3 generate: one prompt, tokens streamed to stdout."""

from __future__ import annotations

import sys

import click

from .options import model_argument, open_engine, prompt_option, run_options, sampling_options


@click.command("generate")
@model_argument
@prompt_option
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", default=None, help="System message (chat templates that have one).")
@click.option("--stats/--no-stats", default=True, help="Print speed statistics to stderr.")
@sampling_options
@run_options
def command(
    model,
    prompt,
    raw,
    system,
    stats,
    max_tokens,
    temperature,
    top_p,
    seed,
    quantization,
    device,
    threads,
    allow_pickle,
):
    """Generate from PROMPT with MODEL (HF folder, .gguf, converted folder; default: SmolLM2-135M)."""
    from ..runtime.generate import ChatSession
    from ..runtime.sampling import SamplingParams

    engine, source = open_engine(
        model, quantization=quantization, device=device, threads=threads, allow_pickle=allow_pickle
    )
    session = ChatSession(engine, source.tokenizer(), "raw" if raw else source.conv_template, system=system)

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _, st = session.send(prompt, SamplingParams(temperature, top_p, seed), max_tokens, on_text=out)
    sys.stdout.write("\n")
    if stats:
        click.echo(st.summary(), err=True)
