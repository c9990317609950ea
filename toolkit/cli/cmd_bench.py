"""`phi3 bench [MODEL]`: prefill/decode tok/s, time to first token, peak RSS, roofline; optionally vs
llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError
from .options import device_choice, quantization_choice


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise click.BadParameter("empty list")
    if min(out) < 1:
        raise click.BadParameter(f"every value must be >= 1, got {min(out)}")
    twice = sorted({v for v in out if out.count(v) > 1})
    if twice:  # it would be measured twice over
        raise click.BadParameter(f"{', '.join(map(str, twice))} listed twice")
    return out


def _thread_counts(ctx, param, value: str) -> list[int]:
    from ..cpu_threads import usable_cpus

    out = _int_list(ctx, param, value)
    if ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT:
        return [t for t in out if t <= usable_cpus()] or [1]  # "1,2" on a one-CPU machine: 1
    if max(out) > usable_cpus():  # TVM would run fewer, and the row would carry the asked count
        raise click.BadParameter(f"{max(out)} is more than the {usable_cpus()} CPU(s) this process may use")
    return out


@click.command()
@click.argument("model", required=False)
@click.option(
    "--device",
    type=device_choice(),
    default="host",
    show_default=True,
    help="Device preset to run our engine on; host:CPU (an LLVM CPU name such as znver3) builds both sides "
    "for that CPU class, to measure its code paths on a machine that has all its features.",
)
@click.option(
    "--threads", default="1,2", show_default=True, callback=_thread_counts, help="Thread counts to test."
)
@click.option(
    "--prompt-lengths",
    default="32,128",
    show_default=True,
    callback=_int_list,
    help="Prompt lengths for prefill; the longest is the headline (and precedes the decode).",
)
@click.option(
    "--context",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="Decode after a prompt of this many tokens (joins --prompt-lengths; the longest is the headline).",
)
@click.option(
    "--kv-cache",
    metavar="DTYPE[,DTYPE]",
    default=None,
    help="KV cache dtype for a CPU preset: float16 or float32, or both comma-separated for one engine each, "
    "interleaved run by run (the first is the headline); default: the preset's own, fp16 on `host`.",
)
@click.option(
    "--decode-tokens",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Tokens decoded after each prompt.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Timed runs per setting (median, min-max).",
)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option(
    "--quantization",
    type=quantization_choice(),
    default=None,
    help="Our weight scheme (default: the engine's default).",
)
@click.option(
    "--vs-llama-cpp",
    is_flag=True,
    help="Also run llama.cpp (built for this CPU, AMX where present; for CPU with --device host:CPU) on the "
    "same model, interleaved.",
)
@click.option(
    "--llama-gguf",
    type=click.Path(exists=True, dir_okay=False),
    help="GGUF for llama.cpp (default: MODEL itself if a GGUF, else a cached Q4_0 export of it).",
)
@click.option(
    "--llama-flash-attn",
    type=click.Choice(["off", "on", "both"]),
    default="both",
    show_default=True,
    help="llama.cpp flash attention (on: faster prefill, slower decode); ratios use the best.",
)
@click.option(
    "--bandwidth-mib",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="Array size for the read-bandwidth measurement (default: 1024, or twice the last-level cache "
    "where that is more).",
)
@click.option(
    "--no-build", is_flag=True, help="Fail instead of building llama-cpp-python when it is missing."
)
@click.option(
    "--roofline-pairs",
    type=click.IntRange(0),
    default=24,
    show_default=True,
    help="Decode steps timed one by one between read-bandwidth probe passes, per backend and thread count "
    "(the roofline fraction; 0: off; CPU presets only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG chart here.")
def command(
    model,
    device,
    threads,
    prompt_lengths,
    context,
    kv_cache,
    decode_tokens,
    repeats,
    warmup,
    quantization,
    vs_llama_cpp,
    llama_gguf,
    llama_flash_attn,
    bandwidth_mib,
    no_build,
    roofline_pairs,
    as_json,
    plot,
) -> None:
    """Benchmark MODEL (default: the embedded default model) on this machine."""
    from ..bench.harness import BenchSettings, default_quantization, format_table, llama_gguf_for, run_bench
    from ..bench.harness import plot as write_plot
    from ..checkpoint import open_model
    from ..hostinfo import uncached_bytes
    from ..outputs import check_output_file, model_input_path

    if plot:  # checked before the (long) run, not when the plot is written at its end
        check_output_file(
            plot, inputs=[model_input_path(model)], magic=b"\x89PNG\r\n\x1a\n", what="a PNG image"
        )
    fa = {"off": [False], "on": [True], "both": [False, True]}[llama_flash_attn]
    settings = BenchSettings(
        threads=threads,
        prompt_lengths=sorted(set(prompt_lengths + ([context] if context else []))),
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        quantization=quantization or default_quantization(),
        device=device,
        kv_cache=kv_cache,
        vs_llama_cpp=vs_llama_cpp,
        llama_flash_attn=fa,
        bandwidth_bytes=bandwidth_mib << 20 if bandwidth_mib else uncached_bytes(1 << 30),
        roofline_pairs=roofline_pairs,
    )
    settings.validate()
    from ..runtime.engine import open_device
    from ..targets import load_preset

    open_device(load_preset(device))  # a device this machine lacks: said now, not after a build
    src = open_model(model)
    settings.check_context(src.config)
    if llama_gguf:  # readable before llama.cpp is built (minutes)
        from ..checkpoint.gguf_source import open_gguf_reader

        open_gguf_reader(Path(llama_gguf))

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    gguf = None
    if vs_llama_cpp:
        from ..bench.llama_cpp import ensure_llama_cpp

        info = ensure_llama_cpp(build=not no_build, log=log, cpu=settings.cpu)
        log(f"llama.cpp: {info}")
        gguf = Path(llama_gguf) if llama_gguf else llama_gguf_for(model, src, log)
    elif llama_gguf:
        raise UserError("--llama-gguf needs --vs-llama-cpp")
    result = run_bench(model, settings, config=src.config, llama_gguf=gguf, log=log)
    if plot:
        log(f"wrote {write_plot(result, plot)}")
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
