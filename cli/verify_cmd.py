"""``mergekit-like verify``: check a checkpoint directory completely."""

from __future__ import annotations

from pathlib import Path

import typer
from mergekit_like.cli.output import console, err_console, handle_errors, human_bytes, print_json
from rich.markup import escape

from mergekit_like.errors import printable
from mergekit_like.io.checksums import CHECKSUMS
from mergekit_like.io.verify import VerifyReport, verify_checkpoint

HELP = (
    f"Check a checkpoint completely: structure, every tensor, NaN/Inf, and {CHECKSUMS}.\n\n"
    "Index and shards consistent, every header valid, every tensor readable, values finite. Every output of "
    f"this tool carries {CHECKSUMS}, the sha256 of every file written there: each listed file must be present "
    "and unchanged, and a file it does not list (an added shard, pickle or .py file) fails, as does a manifest "
    "that is not a regular file. Exit 0 only when all holds.\n\n"
    "Without a manifest the files cannot be verified. That fails with --strict, the default for a directory "
    "that looks like an output of this tool (it holds merge_recipe.yml or a README.md card tagged mergekit-like); "
    "with --no-strict it is reported as 'unverifiable (no manifest)' and only the "
    "tensors are checked. Other checkpoints (a Hub download) have their tensors checked, and are failed for a "
    "missing manifest only with --strict.\n\n"
    "Example: mergekit-like verify ./merged\n"
)
EXIT_PROBLEMS = 1


def register(app: typer.Typer) -> None:
    app.command("verify", help=HELP)(verify)


@handle_errors
def verify(
    path: Path = typer.Argument(..., help="Checkpoint directory or file."),
    check_finite: bool = typer.Option(True, "--check-finite/--no-check-finite", help="Report NaN and Inf values."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pytorch_model*.bin pickles."),
    strict: bool | None = typer.Option(
        None, "--strict/--no-strict", show_default=False,
        help=f"Fail when there is no {CHECKSUMS} (default: only for a directory that looks like an output of "
             "this tool).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable report."),
) -> None:
    report = verify_checkpoint(path, check_finite=check_finite, allow_pickle=allow_pickle, strict=strict)
    if as_json:
        print_json({"path": str(report.path), "ok": report.ok, "tensors": report.tensors,
                    "bytes_read": report.bytes_read, "checksums": report.checksums,
                    "verifiable": report.verifiable, "tool_output": report.tool_output, "strict": report.strict,
                    "unexpected": report.unexpected, "problems": report.problems})
    else:
        for problem in report.problems:
            err_console.print(f"[bold red]problem:[/] {escape(printable(problem))}", markup=True, highlight=False,
                              soft_wrap=True)
        console.print(f"{printable(str(path))}: {_verdict(report)}; {report.tensors} tensors read "
                      f"({human_bytes(report.bytes_read)}), checksums {report.checksums}",
                      highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


def _verdict(report: VerifyReport) -> str:
    if not report.ok:
        return f"{len(report.problems)} problem(s)"
    # An output of this tool without its manifest (under --no-strict): its tensors read, but whether
    # its files are the ones written cannot be told, so it is not called OK.
    return "unverifiable (no manifest)" if report.tool_output and not report.verifiable else "OK"
