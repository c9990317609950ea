"""`phi3 verify OUT`: run every kernel of a compiled model through a GPU API on this machine."""

from __future__ import annotations

import json
import sys

import click

from .options import SEED


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the full report as JSON."
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random kernel inputs.")
def command(out_dir: str, json_path: str | None, seed: int) -> None:
    """Verify the kernels in OUT_DIR (written by `phi3 compile`) against the llvm build of the same
    kernels."""
    from ..verify.verify import verify_model

    if json_path:  # the report goes next to, never over, the compiled model
        from ..outputs import check_output_file

        check_output_file(json_path, inputs=[out_dir], magic=b"{", what="a JSON report")
    report = verify_model(out_dir, seed=seed)
    click.echo(f"preset {report.preset} ({report.quantization}), kernels run on: {report.backend}")
    for c in report.checks:
        err = "" if c.error is None else f" err {c.error:.2e} (tol {c.tolerance:.0e})"
        click.echo(f"  {c.status:<8} {c.func}{err}  {c.note}")
    if report.msl_ok is not None:
        click.echo(f"  MSL parse (clang++ with Metal stub header): {'ok' if report.msl_ok else 'FAILED'}")
        if report.msl_diagnostics:
            click.echo(report.msl_diagnostics)
    for r in report.cuda:
        if r.get("error"):
            click.echo(f"  error    nvcc {r['arch']}: {r['error']}")
            continue
        for name in r.get("compiled_kernels", []):
            click.echo(f"  compiled {name}  (nvcc {r['arch']}, compile only)")
        for name in r["missing"]:
            click.echo(f"  missing  {name}  (nvcc {r['arch']}: not in ptxas output)")
        click.echo(f"  nvcc {r['arch']}: {r['compiled']}/{r['kernels']} kernels compiled")
    for note in report.notes:
        click.echo(f"  note: {note}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts().items())) or "no kernel checks"
    click.echo(f"{'OK' if report.ok else 'FAILED'}: {report.verified} kernel(s) verified; {counts}")
    if report.verified == 0:
        click.echo(
            f"error: {out_dir}: nothing was verified (no runnable backend or compiler for "
            f"{report.preset} here)",
            err=True,
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    if not report.ok:
        sys.exit(1)
