"""``mergekit-like verify``: check a checkpoint directory completely."""

from __future__ import annotations

from pathlib import Path

import typer
from mergekit_like.cli.output import console, err_console, handle_errors, human_bytes, print_json
from rich.markup import escape

from mergekit_like.errors import printable
from mergekit_like.io.verify import verify_checkpoint

HELP = """Check a checkpoint completely: structure, every tensor, NaN/Inf, checksums.sha256.

Index and shards consistent, every header valid, every tensor readable, values finite, and
shards matching checksums.sha256 when present. Exit 0 only when all holds.

Example: mergekit-like verify ./merged
"""
EXIT_PROBLEMS = 1


def register(app: typer.Typer) -> None:
    app.command("verify", help=HELP)(verify)


@handle_errors
def verify(
    path: Path = typer.Argument(..., help="Checkpoint directory or file."),
    check_finite: bool = typer.Option(True, "--check-finite/--no-check-finite", help="Report NaN and Inf values."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pytorch_model*.bin pickles."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    report = verify_checkpoint(path, check_finite=check_finite, allow_pickle=allow_pickle)
    if as_json:
        print_json({"path": str(report.path), "ok": report.ok, "tensors": report.tensors,
                    "bytes_read": report.bytes_read, "checksums": report.checksums, "problems": report.problems})
    else:
        for problem in report.problems:
            err_console.print(f"[bold red]problem:[/] {escape(printable(problem))}", markup=True, highlight=False,
                              soft_wrap=True)
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        console.print(f"{path}: {verdict}; {report.tensors} tensors read ({human_bytes(report.bytes_read)}), "
                      f"checksums {report.checksums}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)
