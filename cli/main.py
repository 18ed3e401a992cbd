"""The ``mergekit-like`` application: one module per command, registered here."""

from __future__ import annotations

import logging

import typer
from mergekit_like.cli import (
    average_cmd,
    consolidate_cmd,
    convert_cmd,
    example_cmd,
    extract_cmd,
    inspect_cmd,
    merge_cmd,
    push_cmd,
    search_cmd,
    soup_cmd,
    verify_cmd,
)
from mergekit_like.cli.output import SESSION

from mergekit_like import __version__
from mergekit_like.memory import return_freed_tensors_to_the_os, share_one_malloc_arena

app = typer.Typer(
    name="mergekit-like",
    help="Stream, merge and average sharded safetensors checkpoints with bounded memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mergekit-like {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    low_memory: bool = typer.Option(
        False, "--low-memory",
        help="Return freed tensors to the OS at once, element-wise merges included: lower peak RSS, slower.",
    ),
) -> None:
    SESSION.debug = debug
    SESSION.low_memory = low_memory
    share_one_malloc_arena()
    if low_memory:
        # For every command: average and convert stream tensors too. Merges and soups also
        # carry the choice in their MergeOptions (SESSION.allocator).
        return_freed_tensors_to_the_os()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


merge_cmd.register(app)
average_cmd.register(app)
soup_cmd.register(app)
search_cmd.register(app)
consolidate_cmd.register(app)
push_cmd.register(app)
verify_cmd.register(app)
inspect_cmd.register(app)
example_cmd.register(app)
convert_cmd.register(app)
extract_cmd.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
