"""`phi3 package`: static model library + app config (+ bundled weights) for MLC-LLM's iOS/Android apps."""

from __future__ import annotations

from pathlib import Path

import click

MLC_CONFIG_NAME = "mlc-package-config.json"


@click.command()
@click.argument("models", nargs=-1)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"Package config in MLC's {MLC_CONFIG_NAME} shape (default: ./{MLC_CONFIG_NAME} when no MODEL "
    "is given and it exists).",
)
@click.option(
    "--device", type=click.Choice(["iphone", "android"]), default=None, help="Replaces the config's."
)
@click.option(
    "--preset", default=None, help="Device preset to compile for (default: iphone-a16 / android-adreno)."
)
@click.option(
    "--quantization", "-q", default=None, help="Flags mode: default q4f16_1; converted folders keep theirs."
)
@click.option(
    "--model-id", "model_ids", multiple=True, help="Flags mode: one per MODEL (default <name>-<q>-MLC)."
)
@click.option(
    "--model-url", "model_urls", multiple=True, help="Flags mode: one per MODEL, where the app downloads it."
)
@click.option("--context-window", type=int, default=None, help="Flags mode: context_window_size override.")
@click.option("--prefill-chunk", type=int, default=None, help="Flags mode: prefill_chunk_size override.")
@click.option("--estimated-vram-bytes", type=int, default=None, help="Flags mode (default: estimated).")
@click.option(
    "--no-bundle-weight", is_flag=True, help="Flags mode: do not bundle weights (needs --model-url)."
)
@click.option("--output", "-o", default="dist", show_default=True, type=click.Path(file_okay=False))
def command(
    models,
    config,
    device,
    preset,
    quantization,
    model_ids,
    model_urls,
    context_window,
    prefill_chunk,
    estimated_vram_bytes,
    no_bundle_weight,
    output,
):
    """Package MODELs (or the models of --config) for MLC-LLM's iOS/Android apps into OUTPUT.

    Writes OUTPUT/lib/libmodel_<device>.a and OUTPUT/bundle/ (mlc-app-config.json, bundled weights)."""
    from ..errors import UserError
    from ..package import load_spec_file, package, spec_from_flags

    flags_used = [
        name
        for name, value in (
            ("--quantization", quantization),
            ("--model-id", model_ids),
            ("--model-url", model_urls),
            ("--context-window", context_window),
            ("--prefill-chunk", prefill_chunk),
            ("--estimated-vram-bytes", estimated_vram_bytes),
            ("--no-bundle-weight", no_bundle_weight),
        )
        if value
    ]
    if config is None and not models and not flags_used and Path(MLC_CONFIG_NAME).is_file():
        config = MLC_CONFIG_NAME  # MLC's `package` reads this file from the working folder
    if config is not None:
        if models or flags_used:
            what = "MODEL arguments" if models else flags_used[0]
            raise UserError(f"{what}: set per-model values in {config} instead")
        spec = load_spec_file(config, device=device, preset=preset)
    else:
        if device is None:
            raise UserError("--device: required without --config (iphone or android)")
        spec = spec_from_flags(
            list(models) or [None],
            device,
            preset=preset,
            model_ids=list(model_ids),
            model_urls=list(model_urls),
            quantization=quantization,
            context_window_size=context_window,
            prefill_chunk_size=prefill_chunk,
            estimated_vram_bytes=estimated_vram_bytes,
            bundle_weight=not no_bundle_weight,
        )
    result = package(spec, output, log=lambda msg: click.echo(msg, err=True))
    for m in result.manifest["models"]:
        where = "bundled" if m["bundled"] else "downloaded"
        click.echo(f"{m['model_id']}: model_lib {m['model_lib']} ({m['quantization']}, weights {where})")
    click.echo(f"wrote {result.out_dir} ({result.manifest['library']}, bundle/mlc-app-config.json)")
