"""`phi3 export-coreml MODEL -o NAME.mlpackage`: a stateful Core ML ML Program (iOS 18) for iPhone apps."""

from __future__ import annotations

from pathlib import Path

import click

from ..coreml import DEFAULT_CONTEXT, MAX_CONTEXT, WEIGHT_MODES
from ..errors import UserError

# written by toolkit/coreml/model_folder.py into every tokenizer_config.json it writes: marks the folder's
# tokenizer/config files as an earlier export of ours, which a new export may replace
OUR_MARK = "toolkit_eos_token_ids"


def check_sibling_files(output: Path) -> None:
    """The tokenizer/config files go next to the package: never over another model's files."""
    import json

    from ..coreml.swift_transformers import TOKENIZER_FILES

    folder = output.parent
    if (folder / "mlc-chat-config.json").exists():  # a converted folder: its tokenizer files are its own
        raise UserError("a `phi3 convert` output; put the package in another folder", folder)
    present = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not present:
        return
    try:
        ours = OUR_MARK in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise UserError(
            f"{present[0]} there is not from an earlier export and would be overwritten by the tokenizer "
            "files written next to the package; use another folder or --no-tokenizer-files",
            folder / present[0],
        )


@click.command()
@click.argument("model", required=False)
@click.option("-o", "--output", required=True, help="Package to write, NAME.mlpackage.")
@click.option(
    "--context",
    type=click.IntRange(1, MAX_CONTEXT),
    default=None,
    help=f"KV-cache length (prompt + generated tokens). Default: {DEFAULT_CONTEXT} or the model's maximum.",
)
@click.option(
    "--weights",
    type=click.Choice(WEIGHT_MODES),
    default="int4",
    show_default=True,
    help="int4: per-block 32 along the input axis; int8: per output channel; fp16: unquantized.",
)
@click.option(
    "--no-tokenizer-files",
    is_flag=True,
    help="Do not write tokenizer.json, tokenizer_config.json and config.json next to the package.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    model: str | None, output: str, context: int | None, weights: str, no_tokenizer_files: bool, quiet: bool
) -> None:
    """Export MODEL (HF folder, GGUF, converted folder; default: the embedded model) to Core ML, laid out for
    swift-transformers' LanguageModel (see examples/ios-coreml)."""
    from ..coreml.export import export_coreml
    from ..locks import output_lock
    from ..outputs import check_output_dir, model_input_path

    # an .mlpackage is a folder: replace only an earlier package (Manifest.json + Data/), never the input
    check_output_dir(
        output,
        inputs=[model_input_path(model)],
        marker="Manifest.json",
        owned=("Data",),
        what="a Core ML package",
    )
    if not no_tokenizer_files:
        check_sibling_files(Path(output).expanduser())
    with output_lock(output):  # one writer per package; temp folders of killed runs are cleared
        result = export_coreml(
            model,
            output,
            context=context,
            weights=weights,
            progress=not quiet,
            tokenizer_files=not no_tokenizer_files,
        )
    click.echo(
        f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, weights {result.weights}, "
        f"context {result.context}) in {result.seconds:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_seconds.items())
        + ")"
    )
    if result.files:
        click.echo("tokenizer files: " + ", ".join(str(f) for f in result.files))
