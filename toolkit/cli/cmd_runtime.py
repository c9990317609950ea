"""`phi3 runtime build|status`: TVM's Vulkan and OpenCL device runtimes as plugins for the installed wheel."""

from __future__ import annotations

import click

BACKEND_NAMES = ("vulkan", "opencl")  # = toolkit.runtime.plugins.BACKENDS, without importing TVM to parse


def _backends(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in BACKEND_NAMES]
    if not names or bad:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}; choose from {','.join(BACKEND_NAMES)}")
    return names


@click.group()
def command() -> None:
    """TVM's own device runtimes (Vulkan, OpenCL) for this TVM wheel, built from a TVM source checkout."""


@command.command()
@click.option(
    "--tvm-source",
    envvar="PHI3_TVM_SOURCE",
    required=True,
    type=click.Path(file_okay=False),
    help="An apache/tvm source checkout (ideally at the wheel's commit); default $PHI3_TVM_SOURCE.",
)
@click.option(
    "--backends",
    default=",".join(BACKEND_NAMES),
    show_default=True,
    callback=_backends,
    help="Comma-separated runtimes to build.",
)
@click.option("--jobs", type=click.IntRange(1, 256), default=None, help="Parallel compiles (default: CPUs).")
def build(tvm_source: str, backends: tuple[str, ...], jobs: int | None) -> None:
    """Build the runtimes into the cache; `phi3 generate --device vulkan|opencl` then runs here."""
    from ..runtime import plugins

    plugins.build_plugins(tvm_source, backends, jobs=jobs, log=click.echo)
    rec = plugins.manifest()
    wheel = next(iter(rec.values()))["wheel"]
    commit = rec[backends[0]]["source_commit"]
    click.echo(
        f"built for apache-tvm {wheel['tvm']} ({wheel['tvm_commit']}), tvm-ffi {wheel['tvm_ffi']} "
        f"from source {'commit ' + commit if commit else 'of unknown commit (not a git checkout)'}"
    )


@command.command()
def status() -> None:
    """Which runtime plugins exist for this TVM wheel, and whether a device answers."""
    from ..errors import UserError
    from ..runtime import plugins

    for line in plugins.describe():
        click.echo(line)
    for b in plugins.available():
        try:
            dev = plugins.require_device(b)
            click.echo(f"{b} device: {dev.device_name}")
        except UserError as e:
            click.echo(f"{b} device: none ({e})")
