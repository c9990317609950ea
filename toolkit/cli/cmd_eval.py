"""phi3 eval --ppl TEXTFILE: perplexity of the compiled model over a text."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .options import DEFAULT_WINDOW, eval_window_options, model_argument, open_engine, run_options


def eval_window(source, context: int | None, stride: int | None) -> int:
    """The --context window for this model, before an engine is built: DEFAULT_WINDOW, or the model's
    positions if it has fewer; one asked for must fit them."""
    limit = source.config.max_position_embeddings
    if context is None:
        context = min(DEFAULT_WINDOW, limit)
        if stride is not None and stride > context:  # given both, the flags were checked at parse time
            raise click.BadParameter(
                f"{stride} is longer than the window, {context}", param_hint="'--stride'"
            )
    elif context > limit:
        raise click.BadParameter(
            f"{context} is longer than the model's {limit} positions", param_hint="'--context'"
        )
    return context


def text_ids(source, text: str, text_file: str) -> list[int]:
    """The text's token ids, or a one-line UserError when there are fewer than the 2 a score needs."""
    ids = source.tokenizer().encode(text)
    if len(ids) < 2:
        raise UserError("has fewer than 2 tokens: nothing to score", text_file)
    return ids


def read_text_file(text_file: str) -> str:
    """The --ppl text, or one-line UserError."""
    path = Path(text_file)
    if not path.is_file():
        raise UserError("not a regular file" if path.exists() else "no such file", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path) from None
    except OSError as e:
        raise UserError(f"cannot be read ({e.strerror or e})", path) from None


def _schemes(ctx, param, value):
    from .cmd_quant_report import _schemes as parse

    return parse(ctx, param, value)


@click.command("eval")
@model_argument
@click.option(
    "--ppl", "text_file", required=True, type=click.Path(dir_okay=False), help="Text file to score."
)
@eval_window_options
@click.option(
    "--through",
    type=click.Choice(["prefill", "decode"]),
    default="prefill",
    show_default=True,
    help="Score each window in one forward, or token by token through the decode kernels generation runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--schemes",
    default=None,
    callback=_schemes,
    help="Compare schemes instead (as `phi3 quant-report --ppl`): convert to each, one table of bits per "
    "weight and perplexity. E.g. q0f32,q4f16_1:rtn,gguf_q4_0,native.",
)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="With --schemes: PNG plot.")
@click.option("--json-file", type=click.Path(dir_okay=False), default=None, help="With --schemes: JSON.")
@run_options
@click.pass_context
def command(
    ctx,
    model,
    text_file,
    context,
    stride,
    max_tokens,
    through,
    as_json,
    schemes,
    plot,
    json_file,
    quantization,
    device,
    threads,
    allow_pickle,
):
    """Perplexity of MODEL over TEXTFILE with fixed sliding windows (default model: SmolLM2-135M)."""
    from ..runtime.engine import CacheOptions
    from ..runtime.perplexity import perplexity

    if schemes is None and (plot or json_file):
        raise click.UsageError("--plot/--json-file need --schemes")
    if schemes is not None:
        if quantization is not None or through != "prefill":
            raise click.UsageError("--schemes compares schemes through prefill; drop -q/--through")
        from .cmd_quant_report import run_scheme_table

        run_scheme_table(
            model,
            text_file,
            schemes,
            explicit=True,
            context=context,
            stride=stride,
            max_tokens=max_tokens,
            device=device,
            threads=threads,
            allow_pickle=allow_pickle,
            as_json=as_json,
            plot=plot,
            json_file=json_file,
            progress=False,
        )
        return
    from ..checkpoint import open_model

    text = read_text_file(text_file)
    source = open_model(model, allow_pickle=allow_pickle)
    context = eval_window(source, context, stride)  # both before a compile
    ids = text_ids(source, text, text_file)
    engine, source = open_engine(
        source,
        quantization=quantization,
        device=device,
        threads=threads,
        allow_pickle=allow_pickle,
        cache=CacheOptions(max_batch_size=1, context_window=context, prefill_chunk=context),
    )
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
