"""phi3 tune: tune the kernels that matter for a device preset with MetaSchedule; keep only measured wins."""

from __future__ import annotations

import click

from .options import FiniteFloat, device_choice, model_argument, quantization_choice


def _parse_tracker(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"expected HOST:PORT with a port in 1..65535, got {value!r}", param_hint="--rpc-tracker"
        )
    return host, int(port)


@click.command("tune")
@model_argument
@click.option(
    "--device",
    type=device_choice(),
    default="host",
    show_default=True,
    help="Device preset (see `phi3 targets`).",
)
@click.option(
    "--quantization", "-q", type=quantization_choice(), default=None, help="Quantization (default q4f16_1)."
)
@click.option(
    "--trials", type=click.IntRange(1), default=64, show_default=True, help="MetaSchedule trials per kernel."
)
@click.option(
    "--kernels",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Tune the K most important kernels (by share of a decode / prefill step).",
)
@click.option("--cost-model", type=click.Choice(["xgb", "random"]), default="xgb", show_default=True)
@click.option(
    "--min-gain",
    type=FiniteFloat(0.0, 10.0),
    default=0.03,
    show_default=True,
    help="Keep a record only if it is at least this fraction faster than the default schedule.",
)
@click.option(
    "--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker (measure on remote devices)."
)
@click.option("--rpc-key", default=None, help="Device key registered at the tracker.")
@click.option(
    "--search",
    type=click.Choice(["both", "knobs", "metaschedule"]),
    default=None,
    help="What to tune: our hand kernels' knobs (host presets), MetaSchedule for the other kernels, or "
    "both (default: both on a host preset, metaschedule elsewhere).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Knobs only, on the 3 kernels that move the most bytes per step (minutes, not tens of minutes).",
)
@click.option(
    "--rounds",
    type=click.IntRange(3, 50),
    default=4,
    show_default=True,
    help="Interleaved timing rounds per knob setting.",
)
@click.option(
    "--schedules-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Root of the records folder (default: the package's toolkit/schedules/).",
)
def command(
    model,
    device,
    quantization,
    trials,
    kernels,
    cost_model,
    min_gain,
    rpc_tracker,
    rpc_key,
    search,
    quick,
    rounds,
    schedules_dir,
):
    """Tune MODEL's kernels for a device preset; records go to schedules/<preset>/, keyed by this device."""
    from ..errors import UserError
    from ..tune.guard import check_local_device, check_records_writable, check_tracker

    tracker = _parse_tracker(rpc_tracker)
    if (tracker is None) != (rpc_key is None):
        raise UserError("--rpc-tracker and --rpc-key go together")
    if tracker is not None:  # seconds, before minutes of extraction and a minute of MetaSchedule retries
        check_tracker(tracker[0], tracker[1], rpc_key)

    from ..checkpoint import open_model
    from ..compile.tuned_records import device_fingerprint, records_dir
    from ..quantization import quantization_for
    from ..targets import load_preset
    from ..tune.tuner import RPCTarget, format_results, tune_model

    rpc = RPCTarget(tracker[0], tracker[1], rpc_key) if tracker else None
    preset = load_preset(device)
    on_host = preset.kind == "llvm" and preset.runs_here and rpc is None
    search = "knobs" if quick else search or ("both" if on_host else "metaschedule")
    if search != "metaschedule" and not on_host:
        raise UserError(f"--search {search}: knob search times kernels here; '{device}' is not this CPU")
    if rpc is None:
        check_local_device(preset)
    if search != "metaschedule":
        from ..compile.knobs import records_folder

        check_records_writable(records_folder(preset, schedules_dir))
    if search != "knobs":
        check_records_writable(records_dir(preset, schedules_dir, device_fingerprint(preset, rpc_key)))
    source = open_model(model)
    quant = quantization_for(source, quantization)
    if search in ("knobs", "both"):
        from ..tune.knob_search import roofline_summary, search_model, write_knob_record

        found = search_model(
            source.config,
            quant,
            preset,
            quick=quick,
            rounds=rounds,
            margin=min_gain,
            progress=click.echo,
            schedules_root=schedules_dir,
        )
        path = write_knob_record(preset, found, schedules_dir)
        kept = sum(r.kept for r in found)
        click.echo(f"knobs: {kept} of {len(found)} kernel(s) beat their default sizes; record: {path}")
        summary = roofline_summary(found)
        if summary:
            click.echo(f"knobs: {summary}")
        if search == "knobs":
            return
    _, results = tune_model(
        source.config,
        quant,
        preset,
        trials,
        kernels=kernels,
        rpc=rpc,
        schedules_root=schedules_dir,
        progress=click.echo,
        cost_model=cost_model,
        min_gain=min_gain,
    )
    click.echo(format_results(results))
    kept = sum(r.kept for r in results)
    click.echo(
        f"{kept} of {len(results)} kernel(s) beat the default schedule; records: "
        f"{records_dir(preset, schedules_dir, device_fingerprint(preset, rpc_key))}"
    )
