"""``mergekit-like convert``: reshard, recast or de-pickle a checkpoint, streaming."""

from __future__ import annotations

from pathlib import Path

import typer
from mergekit_like.cli.output import (
    RichProgress,
    console,
    handle_errors,
    human_bytes,
    one_output,
    print_json,
    size_option,
    warn_nonfinite,
)

from mergekit_like.io import convert_checkpoint
from mergekit_like.io.dtypes import parse_dtype

EXAMPLE = "Example: mergekit-like convert ./pytorch-model ./model-st --allow-pickle --shard-size 2GB"


def register(app: typer.Typer) -> None:
    app.command(
        "convert",
        help="Copy a checkpoint to sharded safetensors, tensor by tensor: change shard size or "
        f"float dtype, or turn pytorch_model*.bin pickles into safetensors.\n\n{EXAMPLE}",
    )(convert)


@handle_errors
def convert(
    source: Path = typer.Argument(..., help="Checkpoint directory or weights file."),
    output_arg: Path = typer.Argument(None, metavar="[OUTPUT]", help="Output directory (or give -o)."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    dtype: str = typer.Option(None, "--dtype", help="Cast floating tensors to this dtype."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest shard (decimal units, as HF)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read pytorch_model*.bin pickles (torch.load weights_only=True)."
    ),
    check_finite: bool = typer.Option(False, "--check-finite", help="Refuse an output holding NaN or Inf values."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    output = one_output(output_arg, output)
    max_shard = size_option(shard_size)
    with RichProgress("convert", enabled=not (quiet or as_json)) as progress:
        written = convert_checkpoint(
            source, output, dtype=parse_dtype(dtype) if dtype else None, max_shard_size=max_shard,
            overwrite=overwrite, allow_pickle=allow_pickle, progress=progress, check_finite=check_finite,
        )
    warn_nonfinite([written])
    if as_json:
        print_json({"output": str(written.directory), "shards": list(written.shards),
                    "index": written.index, "total_bytes": written.total_bytes,
                    "num_tensors": written.num_tensors})
    elif not quiet:
        console.print(
            f"wrote {written.num_tensors} tensors, {human_bytes(written.total_bytes)} in "
            f"{len(written.shards)} shard(s) to {written.directory}", highlight=False,
        )
