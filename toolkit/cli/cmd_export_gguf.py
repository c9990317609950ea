"""`phi3 export-gguf MODEL -o out.gguf --type q4_0|f16`: a GGUF for llama.cpp and Ollama (phi3 arch)."""

from __future__ import annotations

import sys

import click

from ..checkpoint.gguf_export import QTYPES, export_gguf


@click.command()
@click.argument("model", required=False)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .gguf file to write.",
)
@click.option(
    "--type",
    "qtype",
    type=click.Choice(QTYPES),
    default="q4_0",
    show_default=True,
    help="Storage of 2-D weights; norms and rope factors stay F32.",
)
def command(model: str | None, output: str, qtype: str) -> None:
    """Write MODEL as a GGUF with llama.cpp's `phi3` architecture and the model's tokenizer.

    MODEL is a Hugging Face checkpoint folder, a GGUF file or a converted folder; without it, the default
    model.
    """
    from ..locks import output_lock
    from ..outputs import check_output_file, model_input_path

    # an existing file is replaced only when it is a GGUF, and never when it is the model itself
    check_output_file(output, inputs=[model_input_path(model)], magic=b"GGUF", what="a GGUF file")
    shown = [-1]

    def progress(done: int, total: int, tensor) -> None:
        pct = 100 * done // total
        if pct // 10 != shown[0] // 10:  # one line per 10%
            shown[0] = pct
            click.echo(f"  {pct:3d}%  {done}/{total} tensors ({tensor.name})", err=True)

    # progress lines are for a terminal; a script reading stderr sees only warnings and errors
    with output_lock(output):  # one writer per file; partial files of killed runs are cleared
        result = export_gguf(model, output, qtype=qtype, progress=progress if sys.stderr.isatty() else None)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(
        f"wrote {result.path}: {result.n_tensors} tensors, {result.nbytes:,} bytes ({qtype}, "
        f"tokenizer from {result.vocab_source})"
    )
