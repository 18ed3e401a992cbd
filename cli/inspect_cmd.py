"""``mergekit-like inspect``: what is in a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from mergekit_like.cli.output import console, handle_errors, human_bytes, human_count, print_json
from rich.markup import escape
from rich.table import Table

from mergekit_like.errors import printable
from mergekit_like.io import open_checkpoint, summarize
from mergekit_like.io.summary import CheckpointSummary

EXAMPLE = "Example: mergekit-like inspect ./my-model --filter layers.0."


def register(app: typer.Typer) -> None:
    app.command("inspect", help=f"List tensors, shapes, dtypes, bytes and shards, with totals.\n\n{EXAMPLE}")(
        inspect
    )


@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint directory, index .json or .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    filter_: str = typer.Option(None, "--filter", help="Only list tensors whose name contains this."),
    totals_only: bool = typer.Option(False, "--totals", help="Print the totals, not the tensor table."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read pytorch_model*.bin pickles (torch.load weights_only=True)."
    ),
) -> None:
    with open_checkpoint(path, allow_pickle=allow_pickle) as checkpoint:
        summary = summarize(checkpoint)
    rows = [t for t in summary.tensors if not filter_ or filter_ in t.name]
    if as_json:
        data = summary.to_dict()
        data["tensors"] = [t for t in data["tensors"] if not filter_ or filter_ in t["name"]]
        if totals_only:
            del data["tensors"]
        print_json(data)
        return
    if not totals_only:
        _print_table(summary, rows)
    _print_totals(summary)


def _print_table(summary: CheckpointSummary, rows: list) -> None:
    multi = len(summary.shards) > 1
    if not console.is_terminal:
        _print_lines(summary, rows, multi)
        return
    table = Table(show_lines=False, header_style="bold")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    if multi:
        table.add_column("shard", justify="right", no_wrap=True)
    shard_number = {name: i for i, name in enumerate(summary.shards, 1)}
    for row in rows:
        cells = [printable(row.name), "x".join(map(str, row.shape)) or "scalar", row.dtype,
                 human_count(row.numel), human_bytes(row.nbytes)]
        table.add_row(*cells, *([str(shard_number[row.shard])] if multi else []))
    console.print(table)


def _print_lines(summary: CheckpointSummary, rows: list, multi: bool) -> None:
    """One tab-separated line per tensor, never wrapped: what ``grep``, ``cut`` and ``sort`` read."""
    shard_number = {name: i for i, name in enumerate(summary.shards, 1)}
    header = ["tensor", "shape", "dtype", "params", "bytes", *(["shard"] if multi else [])]
    lines = ["\t".join(header)]
    for row in rows:
        cells = [printable(row.name), "x".join(map(str, row.shape)) or "scalar", row.dtype, str(row.numel),
                 str(row.nbytes)]
        lines.append("\t".join([*cells, *([str(shard_number[row.shard])] if multi else [])]))
    sys.stdout.write("\n".join(lines) + "\n")


def _print_totals(summary: CheckpointSummary) -> None:
    by_dtype = ", ".join(f"{d} {human_count(n)}" for d, n in summary.dtype_counts.items())
    largest = summary.largest
    console.print(f"[bold]{escape(printable(str(summary.path)))}[/]", markup=True, highlight=False, soft_wrap=True)
    console.print(
        f"  {len(summary.tensors)} tensors, {human_count(summary.num_parameters)} parameters "
        f"({summary.num_parameters:,}), {human_bytes(summary.total_bytes)}",
        highlight=False, soft_wrap=True,
    )
    console.print(
        f"  {len(summary.shards)} shard(s), {summary.format}"
        + (f", index {summary.index}" if summary.index else ""),
        highlight=False, soft_wrap=True,
    )
    if by_dtype:
        console.print(f"  by dtype: {by_dtype}", highlight=False, soft_wrap=True)
    if largest:
        console.print(f"  largest tensor: {printable(largest.name)} ({human_bytes(largest.nbytes)})", highlight=False,
                      soft_wrap=True)
