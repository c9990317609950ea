"""Flags shared by the commands that load and run a model."""

from __future__ import annotations

import click

model_argument = click.argument("model", required=False)


def run_options(f):
    """--quantization/--device/--threads/--allow-pickle for commands that run a model."""
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (unsafe).")(
        f
    )
    f = click.option("--threads", type=int, default=None, help="CPU threads (default: one per core).")(f)
    f = click.option(
        "--device", default="host", show_default=True, help="Device preset (see `phi3 targets`)."
    )(f)
    f = click.option(
        "--quantization",
        "-q",
        default=None,
        help="q0f32, q0f16, q4f16_1, q4f32_1 (default: q4f16_1; converter output keeps its own).",
    )(f)
    return f


def sampling_options(f):
    f = click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output).")(f)
    f = click.option("--top-p", type=float, default=0.95, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.7, show_default=True, help="0 = greedy.")(f)
    f = click.option("--max-tokens", type=int, default=256, show_default=True)(f)
    return f
