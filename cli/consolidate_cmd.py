"""``mergekit-like consolidate``: join the per-rank averages of a sharded (FSDP) run."""

from __future__ import annotations

from pathlib import Path

import typer
from mergekit_like.cli.output import console, handle_errors, human_bytes, print_json, size_option, warn_nonfinite

from mergekit_like.hook.shards import consolidate as join_shards

HELP = """Join the per-rank shards of an average written by the training hook under FSDP.

Example: mergekit-like consolidate runs/avg --average ema_0.999 -o runs/ema
"""


def register(app: typer.Typer) -> None:
    app.command("consolidate", help=HELP)(consolidate)


@handle_errors
def consolidate(
    out_dir: Path = typer.Argument(..., help="The hook's out_dir (it holds shards/manifest.json)."),
    average: str = typer.Option(..., "--average", "-a", help="Which average, e.g. ema_0.999."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory."),
    step: int = typer.Option(None, "--step", help="A saved step (default: latest)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (decimal units)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    check_finite: bool = typer.Option(False, "--check-finite", help="Refuse an output holding NaN or Inf values."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    written = join_shards(out_dir, average, output, step=step, overwrite=overwrite,
                          max_shard_size=size_option(shard_size), check_finite=check_finite)
    warn_nonfinite([written])
    if as_json:
        print_json({"output": str(written.directory), "tensors": written.num_tensors, "bytes": written.total_bytes})
    else:
        console.print(f"wrote {written.num_tensors} tensors, {human_bytes(written.total_bytes)} to "
                      f"{written.directory}", highlight=False)

