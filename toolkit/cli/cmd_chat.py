"""phi3 chat: an interactive multi-turn conversation; the KV cache is reused across turns."""

from __future__ import annotations

import sys

import click

from .options import model_argument, open_engine, run_options, sampling_options


@click.command("chat")
@model_argument
@click.option("--system", default=None, help="System message.")
@click.option("--stats", is_flag=True, help="Print speed statistics after each reply.")
@sampling_options
@run_options
def command(
    model, system, stats, max_tokens, temperature, top_p, seed, quantization, device, threads, allow_pickle
):
    """Chat with MODEL (default: SmolLM2-135M). Commands: /reset, /exit (or Ctrl-D)."""
    from ..runtime.generate import ChatSession, PromptTooLongError
    from ..runtime.sampling import SamplingParams

    if sys.stdin is None or sys.stdin.closed:
        return  # nothing can be read (stdin closed, e.g. `phi3 chat <&-`): nothing to answer, before loading
    engine, source = open_engine(
        model, quantization=quantization, device=device, threads=threads, allow_pickle=allow_pickle
    )
    tok = source.tokenizer()
    sampling = SamplingParams(temperature, top_p, seed)

    def new_session() -> ChatSession:
        return ChatSession(engine, tok, source.conv_template, system=system)

    session = new_session()
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(
            f"Chatting with {source.path.name} ({engine.compiled.manifest['quantization']}). "
            "/reset clears the history, /exit quits.",
            err=True,
        )
    while True:
        try:
            line = input(">>> " if interactive else "")
        except UnicodeDecodeError:
            click.echo("error: stdin: that line is not valid UTF-8 text; not sent", err=True)
            continue
        except (EOFError, RuntimeError, OSError, ValueError):
            break  # end of input, or stdin went away (closed, lost): a clean exit either way
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            if session.seq is not None:
                engine.remove_sequence(session.seq)
            session = new_session()
            continue

        def out(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        try:
            _, st = session.send(line, sampling, max_tokens, on_text=out)
        except PromptTooLongError as e:
            click.echo(f"error: {e}; message dropped (/reset clears the history)", err=True)
            continue
        sys.stdout.write("\n")
        if st.stop_reason == "context window full":
            click.echo("note: the context window is full; /reset to start over", err=True)
        if stats:
            click.echo(st.summary(), err=True)
