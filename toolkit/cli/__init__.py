"""The `phi3` command. Each sub-command lives in `toolkit/cli/cmd_<name>.py` and exposes `command`.

Command modules stay thin: they parse flags and call the interface layer. Discovery is by file name so
that adding a command never edits this file.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from .. import __version__
from ..errors import UserError


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [
            m.name[4:].replace("_", "-") for m in pkgutil.iter_modules(__path__) if m.name.startswith("cmd_")
        ]
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        try:
            mod = importlib.import_module(f"{__name__}.cmd_{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.cmd_{name.replace('-', '_')}":
                return None
            raise
        return mod.command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi3")
def main() -> None:
    """Compile, quantize, run and benchmark Phi-3 family models (TVM and Core ML)."""
