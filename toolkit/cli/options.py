"""Flags shared by the commands that load and run a model, and the parameter types that check every number
at parse time (before any model is loaded)."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import click

from ..errors import UserError

if TYPE_CHECKING:
    from ..checkpoint import ModelSource

model_argument = click.argument("model", required=False)


class QuantizationName(click.ParamType):
    """A scheme name `get_scheme` knows: the registry's, or a composite gguf_* name."""

    name = "quantization"

    def convert(self, value, param, ctx):
        from ..errors import UserError
        from ..quantization import get_scheme

        try:
            return get_scheme(value).name
        except UserError as e:
            self.fail(str(e), param, ctx)


def quantization_choice() -> click.ParamType:
    return QuantizationName()


class DeviceChoice(click.Choice):
    """A preset name, or `host:CPU` (an LLVM CPU name: the host preset built for that CPU), checked when
    the command line is parsed, before anything loads."""

    def convert(self, value, param, ctx):
        from ..targets import no_presets_reason

        reason = None if self.choices else no_presets_reason()
        if reason:
            self.fail(reason, param, ctx)
        if isinstance(value, str) and ":" in value:
            base = super().convert(value.split(":", 1)[0], param, ctx)
            from ..targets import load_preset

            try:
                load_preset(value)
            except UserError as e:
                self.fail(str(e).split(": ", 1)[-1] if str(e).startswith("--device") else str(e), param, ctx)
            return f"{base}:{value.split(':', 1)[1]}"
        return super().convert(value, param, ctx)


def device_choice() -> click.Choice:
    from ..targets import list_presets

    return DeviceChoice(list_presets())


def open_engine(
    model: str | ModelSource | None,
    *,
    quantization: str | None,
    allow_pickle: bool,
    sample_on: str = "host",
    **kwargs,
):
    """`load_engine` with -q and --sample-on checked first (before any compile); `model` a path, None or a
    source already opened."""
    from ..api import check_device_sampling, check_scheme
    from ..checkpoint import ModelSource, open_model
    from ..runtime.engine import load_engine

    kwargs["device_sampling"] = sample_on == "device"
    check_device_sampling(kwargs.get("device", "host"), kwargs["device_sampling"])
    source = model if isinstance(model, ModelSource) else open_model(model, allow_pickle=allow_pickle)
    check_scheme(source, quantization)
    return load_engine(source, quantization=quantization, allow_pickle=allow_pickle, **kwargs)


DEFAULT_WINDOW = 512  # perplexity window of `phi3 eval` / quant-report --ppl


def eval_window_options(command):
    """--context/--stride/--max-tokens: the perplexity windows of `phi3 eval` (and quant-report --ppl); a
    stride longer than the window (which would skip tokens) is refused before anything is loaded."""

    @functools.wraps(command)
    def f(*args, **kwargs):
        stride, context = kwargs.get("stride"), kwargs.get("context")
        if stride is not None and context is not None and stride > context:
            raise click.BadParameter(f"{stride} is longer than --context {context}", param_hint="'--stride'")
        return command(*args, **kwargs)

    f = click.option(
        "--max-tokens",
        type=click.IntRange(2),
        default=None,
        help="Score only the first N tokens of the text.",
    )(f)
    f = click.option(
        "--stride", type=click.IntRange(1), default=None, help="Window step (default: context/2)."
    )(f)
    f = click.option(
        "--context",
        type=click.IntRange(2),
        default=None,
        help=f"Window length in tokens (default: {DEFAULT_WINDOW}, or the model's positions if fewer).",
    )(f)
    return f


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (Click's range lets nan through: every comparison is
    False)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)  # nan passes every bound check, inf passes an open one
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def positive_int(max: int | None = None) -> click.IntRange:
    return click.IntRange(1, max)


NON_NEGATIVE_INT = click.IntRange(0)
# numpy's Generator takes any non-negative int; 2**63-1 keeps it a C long everywhere
SEED = click.IntRange(0, 2**63 - 1)


def utf8_text(ctx: click.Context, param: click.Parameter, value):
    """Text flags (one value or a repeatable flag's tuple) must be valid UTF-8 (argv bytes that are not UTF-8
    arrive as surrogates)."""
    from ..tokenizer import is_text

    values = value if isinstance(value, tuple) else () if value is None else (value,)
    if not all(is_text(v) for v in values):
        raise click.BadParameter("is not valid UTF-8 text")
    return value


def _text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A prompt must be non-empty, valid UTF-8 text."""
    if utf8_text(ctx, param, value) is not None and not value.strip():
        raise click.BadParameter("is empty")
    return value


def prompt_option(f):
    return click.option(
        "--prompt", "-p", required=True, callback=_text, help="The prompt text (non-empty, UTF-8)."
    )(f)


def run_options(f):
    """--quantization/--device/--threads/--allow-pickle for commands that run a model."""
    f = click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (unsafe).")(
        f
    )
    f = click.option(
        "--threads", type=positive_int(4096), default=None, help="CPU threads (default: one per core)."
    )(f)
    f = click.option(
        "--device",
        type=device_choice(),
        default="host",
        show_default=True,
        help="Device preset (see `phi3 targets`).",
    )(f)
    f = click.option(
        "--quantization",
        "-q",
        type=quantization_choice(),
        default=None,
        help="q0f32, q0f16, q4f16_1, q4f32_1, gguf_*[_f32] (default: q4f16_1; a GGUF in Q4_0/Q4_1/Q8_0/Q4_K/"
        "Q5_K/Q6_K blocks and converter output keep their own; fp32 schemes for OpenCL without fp16).",
    )(f)
    return f


def sample_on_option(f):
    """--sample-on: where generating commands draw tokens."""
    return click.option(
        "--sample-on",
        type=click.Choice(["host", "device"]),
        default="host",
        show_default=True,
        help="Draw tokens on the host, or on the GPU with the library's sampler (GPU presets; every "
        "sampling option, drawn as the host draws). Only token ids leave the device.",
    )(f)


SAMPLING_FLAGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "logit_bias",
    "seed",
)


def sampling_options(f):
    """Every GenerationOptions knob as a flag; a flag not given keeps the model's default
    (generation_config.json, the embedded model's card, else the toolkit's). Commands take them as
    **sampling -> `sampling_changes`."""
    f = click.option(
        "--logit-bias",
        multiple=True,
        metavar="TOKEN_ID=BIAS",
        help="Add BIAS (-100..100) to a token's logit; repeatable.",
    )(f)
    f = click.option("--stop", multiple=True, callback=utf8_text, help="Stop before this text; repeatable.")(
        f
    )
    f = click.option("--presence-penalty", type=FiniteFloat(-2.0, 2.0), default=None, help="In [-2, 2].")(f)
    f = click.option("--frequency-penalty", type=FiniteFloat(-2.0, 2.0), default=None, help="In [-2, 2].")(f)
    f = click.option(
        "--repetition-penalty", type=FiniteFloat(0.0, min_open=True), default=None, help="> 0; 1 = off."
    )(f)
    f = click.option("--min-p", type=FiniteFloat(0.0, 1.0), default=None, help="In [0, 1]; 0 = off.")(f)
    f = click.option("--top-k", type=NON_NEGATIVE_INT, default=None, help="0 = off.")(f)
    f = click.option("--seed", type=SEED, default=None, help="Sampling seed (reproducible output).")(f)
    f = click.option(
        "--top-p",
        type=FiniteFloat(0.0, 1.0, min_open=True),
        default=None,
        help="Nucleus sampling mass, in (0, 1] (default: the model's, else 0.95; the embedded model's: 0.9).",
    )(f)
    f = click.option(
        "--temperature",
        type=FiniteFloat(0.0),
        default=None,
        help="0 = greedy (default: the model's, else 0.7; the embedded model's: 0.2).",
    )(f)
    f = click.option(
        "--max-tokens", type=positive_int(), default=None, help="Default: the model's, else 256."
    )(f)
    return f


def sampling_changes(kwargs: dict) -> dict:
    """Pop the sampling flags out of a command's kwargs as GenerationOptions changes, checked now (before
    any model is loaded): a bad combination is a usage error (exit code 2)."""
    from ..runtime.options import GenerationOptions, OptionsError

    changes = {k: kwargs.pop(k) for k in SAMPLING_FLAGS}
    changes["stop"] = tuple(changes["stop"]) or None
    bias = {}
    for item in changes["logit_bias"]:
        tid, sep, value = item.partition("=")
        try:
            bias[tid.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not TOKEN_ID=BIAS", param_hint="--logit-bias") from None
        if not sep:
            raise click.BadParameter(f"{item!r} is not TOKEN_ID=BIAS", param_hint="--logit-bias")
    changes["logit_bias"] = bias or None
    try:
        GenerationOptions().replace(**changes)
    except OptionsError as e:
        if e.param is None:
            raise click.UsageError(str(e)) from None
        raise click.BadParameter(str(e), param_hint=f"--{e.param.replace('_', '-')}") from None
    return changes
