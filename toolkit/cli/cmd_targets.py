"""`phi3 targets`: list the device presets in targets/."""

from __future__ import annotations

import json

import click

from ..errors import UserError
from ..targets import list_presets, load_preset, no_presets_reason


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON (name, target, output).")
@click.argument("name", required=False)
def command(as_json: bool, name: str | None) -> None:
    """List device presets, or show one preset NAME with the reasons for its numbers."""
    reason = None if name else no_presets_reason()
    if reason:
        raise UserError(reason)
    names = [name] if name else list_presets()
    presets = [load_preset(n) for n in names]
    if as_json:
        rows = [
            {
                "name": p.spec,
                "description": p.description,
                "target": p.target_dict,
                "output": p.output,
                "system_lib": p.system_lib,
                "why": p.why,
            }
            for p in presets
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if name:
        p = presets[0]
        click.echo(f"{p.spec}: {p.description}")
        if p.cpu:  # `host:CPU`: the detection below fills all but the CPU
            lacks = f"no: this CPU lacks {', '.join(p.missing_features)}" if p.missing_features else "yes"
            click.echo(f"  built for CPU {p.cpu}, not this machine's; runs here: {lacks}")
        click.echo(f"  target: {json.dumps(p.target_dict)}")
        click.echo(f"  output: {p.output}{'  (system lib)' if p.system_lib else ''}")
        for key, reason in p.why.items():
            click.echo(f"  why {key}: {reason}")
        return
    width = max(len(p.name) for p in presets)
    for p in presets:
        click.echo(f"{p.name:<{width}}  {p.kind:<7} {p.output:<6} {p.description}")
