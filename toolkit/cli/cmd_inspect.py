"""`phi3 inspect [MODEL]`: what the toolkit sees in a model (config, tensors, tokenizer, chat template)."""

from __future__ import annotations

import json

import click

from ..checkpoint import open_model


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@click.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--tensors", "list_tensors", is_flag=True, help="Also list every tensor with its shape.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin checkpoints (runs code from the file).")
def command(model: str | None, as_json: bool, list_tensors: bool, allow_pickle: bool) -> None:
    """Show the parsed config, tensors, tokenizer and chat template of MODEL.

    MODEL is a Hugging Face checkpoint folder, a GGUF file or a converted folder;
    without it, the default model.
    """
    src = open_model(model, allow_pickle=allow_pickle)
    info = src.summary()
    if list_tensors:
        info["tensor_shapes"] = {n: list(src.tensor_shape(n)) for n in src.tensor_names()}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"model:     {info['path']} ({info['kind']})")
    click.echo(
        f"tensors:   {info['tensors']}, {info['parameters']:,} parameters, "
        f"{_fmt_bytes(info['float32_bytes'])} as float32, {_fmt_bytes(info['file_bytes'])} on disk"
    )
    click.echo(f"template:  {info['chat_template']}")
    tok = info["tokenizer"]
    if isinstance(tok, dict):
        click.echo(
            f"tokenizer: {tok['vocab_size']} tokens, bos {tok['bos_token_id']} (added: {tok['add_bos']}), "
            f"eos {tok['eos_token_ids']}"
        )
    else:
        click.echo(f"tokenizer: {tok}")
    click.echo("config:")
    for k, v in info["config"].items():
        if k == "longrope" and v:
            v = {kk: (f"[{len(vv)} values]" if isinstance(vv, list | tuple) else vv) for kk, vv in v.items()}
        click.echo(f"  {k}: {v}")
    for name, shape in info.get("tensor_shapes", {}).items():
        click.echo(f"  {name} {shape}")
