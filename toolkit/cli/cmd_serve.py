"""phi3 serve: an OpenAI-compatible HTTP server (continuous batching on the paged KV cache)."""

from __future__ import annotations

import click

from .options import model_argument, positive_int, run_options, sample_on_option

NON_NEGATIVE = click.IntRange(0)
DEFAULT_PREFILL_CHUNK = 256


@click.command("serve")
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-sequences",
    type=positive_int(1024),
    default=8,
    show_default=True,
    help="Requests generating at once (the decode batch).",
)
@click.option(
    "--max-queue",
    type=NON_NEGATIVE,
    default=64,
    show_default=True,
    help="Requests waiting for a slot; beyond it the client gets HTTP 429.",
)
@click.option(
    "--context-window",
    type=positive_int(),
    default=4096,
    show_default=True,
    help="Tokens per sequence (prompt + reply); longer prompts get HTTP 400.",
)
@click.option(
    "--prefill-chunk",
    type=positive_int(),
    default=None,
    help="Prompt tokens per prefill forward and per scheduler step (default: 256, or the context window if "
    "smaller); running streams decode between the chunks of a long prompt.",
)
@click.option(
    "--api-key",
    default=None,
    envvar="PHI3_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1/ (env PHI3_API_KEY).",
)
@sample_on_option
@run_options
def command(
    model,
    host,
    port,
    max_sequences,
    max_queue,
    context_window,
    prefill_chunk,
    api_key,
    quantization,
    device,
    threads,
    allow_pickle,
    sample_on,
):
    """Serve MODEL (default: SmolLM2-135M) on /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from ..api import load
    from ..serve.server import listen_socket, serve_forever

    if prefill_chunk is None:
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, context_window)
    elif prefill_chunk > context_window:
        raise click.BadParameter(
            f"{prefill_chunk} is larger than --context-window {context_window}", param_hint="--prefill-chunk"
        )
    sock = listen_socket(host, port)  # the address is ours before minutes of loading
    port = sock.getsockname()[1]  # --port 0: the one the system gave
    try:
        m = load(
            model,
            device=device,
            quantization=quantization,
            threads=threads,
            context_window=context_window,
            max_batch_size=max_sequences,
            prefill_chunk=prefill_chunk,
            allow_pickle=allow_pickle,
            device_sampling=sample_on == "device",
        )
    except BaseException:
        sock.close()
        raise
    click.echo(f"serving {m.name} on http://{host}:{port}/v1 (up to {max_sequences} sequences)", err=True)
    serve_forever(m, sock=sock, max_sequences=max_sequences, max_queue=max_queue, api_key=api_key)
