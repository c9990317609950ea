"""`phi3 verify-coreml PACKAGE`: run an exported package (numpy interpreter; Core ML too on macOS) against
our reference model and report the error."""

from __future__ import annotations

import sys

import click

from .options import SEED


@click.command()
@click.argument("package")
@click.option("--model", default=None, help="Checkpoint it was exported from: also compare the weights.")
@click.option(
    "--prompt-len", type=click.IntRange(1), default=12, show_default=True, help="Tokens in the prefill call."
)
@click.option(
    "--decode-steps",
    type=click.IntRange(0),
    default=8,
    show_default=True,
    help="Single-token calls after the prefill.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the random token ids.")
def command(package: str, model: str | None, prompt_len: int, decode_steps: int, seed: int) -> None:
    """Check that PACKAGE computes our Phi-3 model (exit status 1 if not)."""
    from ..coreml.verify import verify_package

    report = verify_package(package, model, prompt_len=prompt_len, decode_steps=decode_steps, seed=seed)
    click.echo(report.summary())
    if not report.passed:
        sys.exit(1)
