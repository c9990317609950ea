"""phi3 chat: an interactive multi-turn conversation (the API's Chat: the KV cache is reused across turns).

Lines starting with / are commands, never sent to the model; Ctrl-C stops the current reply and keeps the
conversation (with the reply as far as it got)."""

from __future__ import annotations

import sys
import time

import click

from .. import interrupts
from ..tokenizer import is_text
from .cmd_generate import speed_line
from .options import (
    model_argument,
    open_engine,
    run_options,
    sample_on_option,
    sampling_changes,
    sampling_options,
    utf8_text,
)

HELP = "/help this list, /reset clear the history, /stats speed of the last reply, /exit quit (or Ctrl-D)"


@click.command("chat")
@model_argument
@click.option("--system", default=None, callback=utf8_text, help="System message.")
@click.option("--stats", is_flag=True, help="Print speed statistics after each reply.")
@sampling_options
@sample_on_option
@run_options
def command(model, system, stats, quantization, device, threads, allow_pickle, sample_on, **sampling):
    """Chat with MODEL (default: SmolLM2-135M). Commands: /help, /reset, /stats, /exit (or Ctrl-D)."""
    from ..api import Model
    from ..runtime.generate import PromptTooLongError

    changes = sampling_changes(sampling)
    if sys.stdin is None or sys.stdin.closed:
        return  # nothing can be read (stdin closed, e.g. `phi3 chat <&-`): nothing to answer, before loading
    engine, source = open_engine(
        model,
        quantization=quantization,
        device=device,
        threads=threads,
        allow_pickle=allow_pickle,
        sample_on=sample_on,
    )
    chat = Model(engine, source).chat(system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(
            f"Chatting with {source.path.name} ({engine.compiled.manifest['quantization']}). {HELP}", err=True
        )
    last_stats = "no reply yet"
    while True:
        try:
            line = input(">>> " if interactive else "")
        except UnicodeDecodeError:
            line = None
        except KeyboardInterrupt:
            interrupts.handled()
            click.echo("\n(Ctrl-D or /exit quits)", err=True)
            continue
        except (EOFError, RuntimeError, OSError, ValueError):
            break  # end of input, or stdin went away (closed, lost): a clean exit either way
        if line is None or not is_text(line):  # a surrogateescape stdin (C locale) passes bad bytes on
            click.echo("error: stdin: that line is not valid UTF-8 text; not sent", err=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd = line.split()[0]
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                chat.reset()
                click.echo("(history cleared)", err=True)
            elif cmd == "/stats":
                click.echo(last_stats, err=True)
            else:
                click.echo(HELP if cmd == "/help" else f"unknown command {cmd}; {HELP}", err=True)
            continue
        t0, first = time.perf_counter(), None
        reply = chat.stream(line, **changes)
        try:
            for piece in reply:
                first = first or time.perf_counter()
                sys.stdout.write(piece)
                sys.stdout.flush()
        except PromptTooLongError as e:
            click.echo(f"error: {e}; message dropped (/reset clears the history)", err=True)
            continue
        except KeyboardInterrupt:
            interrupts.handled()
            reply.close()  # the partial reply stays in the conversation
            click.echo(" [stopped]", err=True)
        sys.stdout.write("\n")
        gen = chat.last
        if gen is not None:
            last_stats = speed_line(
                len(gen.prompt), len(gen.tokens), t0, first, gen.finish_reason or "interrupted"
            )
            if stats:
                click.echo(last_stats, err=True)
            if gen.finish_reason == "length" and len(gen.prompt) + len(gen.tokens) > engine.context_window:
                click.echo("note: the context window is full; /reset to start over", err=True)
