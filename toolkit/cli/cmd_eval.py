"""phi3 eval --ppl TEXTFILE: perplexity of the compiled model over a text."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .options import model_argument, open_engine, run_options


@click.command("eval")
@model_argument
@click.option(
    "--ppl", "text_file", required=True, type=click.Path(dir_okay=False), help="Text file to score."
)
@click.option(
    "--context", type=click.IntRange(2), default=512, show_default=True, help="Window length in tokens."
)
@click.option("--stride", type=click.IntRange(1), default=None, help="Window step (default: context/2).")
@click.option(
    "--max-tokens", type=click.IntRange(2), default=None, help="Score only the first N tokens of the text."
)
@click.option(
    "--through",
    type=click.Choice(["prefill", "decode"]),
    default="prefill",
    show_default=True,
    help="Score each window in one forward, or token by token through the decode kernels generation runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@run_options
def command(
    model,
    text_file,
    context,
    stride,
    max_tokens,
    through,
    as_json,
    quantization,
    device,
    threads,
    allow_pickle,
):
    """Perplexity of MODEL over TEXTFILE with fixed sliding windows (default model: SmolLM2-135M)."""
    from ..runtime.engine import CacheOptions
    from ..runtime.perplexity import perplexity

    path = Path(text_file)
    if not path.is_file():
        raise UserError("no such file", path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path) from None
    engine, source = open_engine(
        model,
        quantization=quantization,
        device=device,
        threads=threads,
        allow_pickle=allow_pickle,
        cache=CacheOptions(max_batch_size=1, context_window=context, prefill_chunk=context),
    )
    ids = source.tokenizer().encode(text)
    res = perplexity(engine, ids, context=context, stride=stride, max_tokens=max_tokens, through=through)
    out = {
        "model": str(source.path),
        "quantization": engine.compiled.manifest["quantization"],
        "device": device,
        "through": through,
        **res.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(
            f"perplexity {res.perplexity:.4f} over {res.tokens_scored} tokens "
            f"({res.windows} windows of {context}, stride {res.stride}; {out['quantization']}, {device}, "
            f"through {through})"
        )
