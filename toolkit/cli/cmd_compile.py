"""phi3 compile: build the model library for a device preset (no weights needed)."""

from __future__ import annotations

import click

from .options import device_choice, model_argument, quantization_choice


@click.command("compile")
@model_argument
@click.option(
    "--device",
    type=device_choice(),
    default="host",
    show_default=True,
    help="Device preset (see `phi3 targets`).",
)
@click.option(
    "--quantization",
    "-q",
    type=quantization_choice(),
    default=None,
    help="Quantization (default q4f16_1; converted folders keep theirs).",
)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="CUDA presets: capture decode / verify as CUDA graphs (one replay per layer run, not per kernel).",
)
def command(model, device, quantization, output, cuda_graph):
    """Compile MODEL's graph for a device preset into OUTPUT (library + manifest.json)."""
    from .. import api

    compiled = api.compile(model, output, device=device, quantization=quantization, cuda_graph=cuda_graph)
    m = compiled.manifest
    click.echo(f"{compiled.library} ({m['preset']}, {m['quantization']}, {m['compile_seconds']} s)")
