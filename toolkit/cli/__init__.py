"""The `phi3` command. Each sub-command lives in `toolkit/cli/cmd_<name>.py` and exposes `command`.

Command modules stay thin: they parse flags and call the interface layer. Discovery is by file name so
that adding a command never edits this file.
"""

from __future__ import annotations

import errno
import importlib
import pkgutil

import click

from .. import __version__, interrupts
from ..errors import UserError
from ..interrupts import interrupted


def one_line(text: str) -> str:
    """Messages go to stderr as exactly one line (scripts and the fuzz suite rely on it)."""
    return " ".join(str(text).split())


class OneLineError(click.ClickException):
    """Shown as `error: <message>`; usage errors keep Click's exit code 2, everything else exits 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _one_line_usage(e: click.UsageError) -> OneLineError:
    # Click prints usage + hint + message (3+ lines); the message alone names the flag
    return OneLineError(e.format_message(), e.exit_code)


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

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _one_line_usage(e) from None

    def invoke(self, ctx: click.Context):
        from ..tvm_compat import tvm_without_torch

        tvm_without_torch()  # a command that imports TVM starts faster without torch (tvm_compat.py)
        try:
            with interrupts.watching():
                result = super().invoke(ctx)
                if interrupts.fired():  # a KeyboardInterrupt that some library call swallowed
                    raise KeyboardInterrupt
            return result
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _one_line_usage(e) from None
        except UserError as e:
            raise OneLineError(str(e)) from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise
            # disk full, permission denied, ...: the file and the reason, not a traceback
            from ..paths import cache_note

            where = f"{e.filename}: " if e.filename else ""
            raise OneLineError(f"{where}{e.strerror or e}{cache_note(e.filename)}") from None
        except (Exception, KeyboardInterrupt) as e:
            if interrupted(e):  # Ctrl-C, also when TVM hands it back as another error
                raise OneLineError("interrupted", exit_code=130) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi3")
def main() -> None:
    """Compile, quantize, run and benchmark Phi-3 family models (TVM and Core ML)."""


def run() -> None:
    """The `phi3` program: `main`, then a Ctrl-C during the process's own exit is one line and exit 130
    (`interrupts.exiting`). Not in `main` itself: a test that invokes it in-process keeps its own Ctrl-C."""
    try:
        main(prog_name="phi3")
    except SystemExit as e:
        if e.code == 130:  # only an interrupted command exits 130
            interrupts.quiet_teardown()  # "error: interrupted" stays the last line
        raise
    finally:
        interrupts.exiting()
