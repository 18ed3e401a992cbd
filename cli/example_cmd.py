"""``mergekit-like example``: write the built-in example checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer
from mergekit_like.cli.output import console, handle_errors, print_json

from mergekit_like.example import PRESETS, write_example, write_trajectory
from mergekit_like.io.dtypes import parse_dtype
from mergekit_like.io.sharding import parse_size

EXAMPLE = "Example: mergekit-like example ./example --finetunes 3"


def register(app: typer.Typer) -> None:
    app.command(
        "example",
        help="Write a small Llama-style base model and fine-tunes of it (random, deterministic "
        f"weights) to try the tool on.\n\n{EXAMPLE}",
    )(example)


@handle_errors
def example(
    directory: Path = typer.Argument(..., help="Where to write base/ and finetune-N/."),
    finetunes: int = typer.Option(3, "--finetunes", min=1, help="How many fine-tunes of the base."),
    size: str = typer.Option("tiny", "--size", help=f"Preset: {', '.join(PRESETS)}."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Dtype of the weights."),
    shard_size: str = typer.Option("400KB", "--shard-size", help="Largest shard, e.g. 400KB, 2GB."),
    trajectory: int = typer.Option(0, "--trajectory", min=0,
                                   help="Also write run/checkpoint-100 .. of a pretend training run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing example directories."),
    as_json: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    if size not in PRESETS:
        raise typer.BadParameter(f"unknown size {size!r}; choose from {', '.join(PRESETS)}")
    paths = write_example(
        directory, shape=PRESETS[size], finetunes=finetunes, dtype=parse_dtype(dtype),
        max_shard_size=parse_size(shard_size), overwrite=overwrite,
    )
    if trajectory:
        steps = tuple(100 * (i + 1) for i in range(trajectory))
        paths += write_trajectory(directory / "run", shape=PRESETS[size], steps=steps, dtype=parse_dtype(dtype),
                                  overwrite=overwrite)
    if as_json:
        print_json({"models": [str(p) for p in paths]})
    else:
        for path in paths:
            console.print(f"wrote {path}", highlight=False)
