"""`phi3 quant-report MODEL -q q4f16_1 -o report.png [--json]`: per-tensor weight reconstruction error,
round-to-nearest vs clipping search, and a PNG plot.

`phi3 quant-report MODEL --ppl TEXT [--schemes a,b:method,...]`: instead, every scheme side by side: bits per
weight and perplexity (`toolkit.runtime.scheme_table`), a table, a bpw-vs-perplexity plot, and --json-file."""

from __future__ import annotations

import json

import click

from ..errors import UserError
from .options import device_choice, eval_window_options, positive_int

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KNOWN_METHODS = ("rtn", "search", "weighted")  # toolkit.convert.quant_report.METHODS, without importing it


def _schemes(ctx: click.Context, param: click.Parameter, value: str | None):
    """Checked at parse time: an unknown scheme must fail before any model is loaded."""
    if value is None:
        return None
    from ..runtime.scheme_table import parse_schemes

    try:
        return parse_schemes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def run_scheme_table(
    model: str | None,
    text_file: str,
    specs,
    *,
    explicit: bool,
    context: int | None,
    stride: int | None,
    max_tokens: int | None,
    device: str,
    threads: int | None,
    allow_pickle: bool,
    as_json: bool,
    plot: str | None,
    json_file: str | None,
    progress: bool,
) -> dict:
    """The scheme table for `phi3 quant-report --ppl` and `phi3 eval --schemes`: outputs and text checked
    first, then convert + score each scheme, print the table (or JSON), write the plot / JSON file."""
    import sys

    from ..checkpoint import open_model
    from ..outputs import check_output_file, model_input_path
    from ..runtime.scheme_table import (
        DEFAULT_SCHEMES,
        format_table,
        parse_schemes,
        plot_table,
        resolve_native,
        scheme_table,
        write_json,
    )
    from .cmd_eval import eval_window, read_text_file, text_ids

    inputs = [model_input_path(model), text_file]
    if plot is not None:
        check_output_file(plot, inputs=inputs, magic=PNG_MAGIC, what="a PNG image")
    if json_file is not None:
        check_output_file(json_file, inputs=inputs, magic=None, what="a JSON report")
    text = read_text_file(text_file)
    source = open_model(model, allow_pickle=allow_pickle)
    specs = resolve_native(specs or parse_schemes(",".join(DEFAULT_SCHEMES)), source, explicit=explicit)
    context = eval_window(source, context, stride)
    ids = text_ids(source, text, text_file)
    log = (lambda m: print(m, file=sys.stderr)) if progress else None
    report = scheme_table(
        source,
        specs,
        ids,
        context=context,
        stride=stride,
        max_tokens=max_tokens,
        device=device,
        threads=threads,
        progress=progress,
        log=log,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if plot is not None:
        plot_table(report, plot)
        if not as_json:
            click.echo(f"plot: {plot}")
    if json_file is not None:
        write_json(report, json_file)
    return report


def _methods(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """Checked at parse time: a typo must not cost the whole report run first."""
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in methods if m not in KNOWN_METHODS]
    if bad or not methods:
        raise click.BadParameter(f"unknown {bad[0]!r}" if bad else "empty", param_hint="--methods")
    return methods


@click.command()
@click.argument("model", required=False)
@click.option("--quantization", "-q", default="q4f16_1", show_default=True, help="q4f16_1 or q4f32_1.")
@click.option(
    "--output",
    "-o",
    "--plot",
    "output",
    default="quant-report.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="PNG plot to write.",
)
@click.option(
    "--methods",
    default="rtn,search,weighted",
    show_default=True,
    callback=_methods,
    help="Comma-separated subset of these.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of a table.")
@click.option(
    "--ppl",
    "text_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Instead of weight errors: convert to each of --schemes and score perplexity over this text.",
)
@click.option(
    "--schemes",
    default=None,
    callback=_schemes,
    help="With --ppl: comma-separated schemes, `q4f16_1:gptq` picks a clip method; a bare q4f16_1 gives "
    "rtn and weighted rows; `native` = a GGUF's own blocks. Default: native (GGUF only), q0f32, q4f16_1, "
    "gguf_q4_0, gguf_q4_1, gguf_q8_0.",
)
@eval_window_options
@click.option(
    "--json-file", type=click.Path(dir_okay=False), default=None, help="With --ppl: write JSON here."
)
@click.option("--device", type=device_choice(), default="host", show_default=True, help="With --ppl.")
@click.option("--threads", type=positive_int(4096), default=None, help="With --ppl: CPU threads.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin checkpoints (unsafe).")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def command(
    ctx,
    model,
    quantization,
    output,
    methods,
    as_json,
    text_file,
    schemes,
    context,
    stride,
    max_tokens,
    json_file,
    device,
    threads,
    allow_pickle,
    no_progress,
):
    """Show how much error 4-bit quantization puts in each weight of MODEL (default: the embedded model);
    with --ppl, the bits per weight and perplexity of every scheme MODEL can take."""
    given = {p for p in ctx.params if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE}
    ppl_only = {"schemes", "context", "stride", "max_tokens", "json_file", "device", "threads"}
    if text_file is None and given & ppl_only:
        flag = "--" + sorted(given & ppl_only)[0].replace("_", "-")
        raise click.UsageError(f"{flag} needs --ppl")
    if text_file is not None:
        if given & {"quantization", "methods"}:
            raise click.UsageError("--ppl compares --schemes; -q/--methods are for the weight-error report")
        run_scheme_table(
            model,
            text_file,
            schemes,
            explicit=schemes is not None,
            context=context,
            stride=stride,
            max_tokens=max_tokens,
            device=device,
            threads=threads,
            allow_pickle=allow_pickle,
            as_json=as_json,
            plot=output,
            json_file=json_file,
            progress=not no_progress,
        )
        return
    from ..checkpoint import open_model
    from ..convert.quant_report import plot_report, weight_error_report
    from ..outputs import check_output_file, model_input_path

    # checked before the (long) run, not when the plot is written at its end
    check_output_file(output, inputs=[model_input_path(model)], magic=PNG_MAGIC, what="a PNG image")
    source = open_model(model, allow_pickle=allow_pickle)
    try:
        report = weight_error_report(source, quantization, methods, progress=not no_progress)
    except ValueError as e:
        raise UserError(str(e)) from None
    plot_report(report, output)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    ms = report["methods"]
    click.echo(f"{'tensor':<48} {'shape':>14} " + " ".join(f"{m:>9}" for m in ms))
    for r in report["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        click.echo(f"{r['name']:<48} {shape:>14} " + " ".join(f"{r[m]:9.5f}" for m in ms))
    click.echo(f"{'total':<48} {'':>14} " + " ".join(f"{report['total'][m]:9.5f}" for m in ms))
    click.echo(f"plot: {output}")
