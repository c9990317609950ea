"""`phi3 quant-report MODEL -q q4f16_1 -o report.png [--json]`: per-tensor weight reconstruction error,
round-to-nearest vs clipping search, and a PNG plot."""

from __future__ import annotations

import json

import click

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KNOWN_METHODS = ("rtn", "search", "weighted")  # toolkit.convert.quant_report.METHODS, without importing it


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
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin checkpoints (unsafe).")
@click.option("--no-progress", is_flag=True)
def command(model, quantization, output, methods, as_json, allow_pickle, no_progress):
    """Show how much error 4-bit quantization puts in each weight of MODEL (default: the embedded model)."""
    from ..checkpoint import open_model
    from ..convert.quant_report import plot_report, weight_error_report
    from ..errors import UserError
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
