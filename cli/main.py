"""The ``mergekit-like`` application: one module per command, each imported only when its command runs.

Importing a command's module imports torch (seconds on a cold cache), which ``--help`` and
``--version`` do not need: the app lists every command by its name and summary alone, and
imports a command's module once that command is invoked or its own help is asked for.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import typer
from mergekit_like.cli.output import SESSION
from typer.core import TyperCommand, TyperGroup

# The click that Typer builds on: its own copy since Typer 0.2x, the click package before.
from typer.core import _click as click

from mergekit_like import __version__


@dataclass(frozen=True)
class CommandEntry:
    """A command as the top-level help lists it, and where it is defined."""

    module: str  # under mergekit_like.cli; its register(app) adds the command
    summary: str  # the first paragraph of the command's help (tests/test_os_errors.py keeps them equal)


# In the order the help lists them.
COMMANDS: dict[str, CommandEntry] = {
    "merge": CommandEntry("merge_cmd", "Merge checkpoints into a new, ready-to-load checkpoint."),
    "average": CommandEntry("average_cmd", "Average the checkpoints of a training run (one streaming pass)."),
    "soup": CommandEntry("soup_cmd", "Average fine-tuned models into a soup."),
    "search": CommandEntry(
        "search_cmd",
        "Search the values of a recipe for the best score (Optuna), scoring each merge with a command.",
    ),
    "consolidate": CommandEntry(
        "consolidate_cmd", "Join the per-rank shards of an average written by the training hook under FSDP."
    ),
    "push": CommandEntry("push_cmd", "Push a finished output directory to the Hugging Face Hub, in one commit."),
    "verify": CommandEntry(
        "verify_cmd", "Check a checkpoint completely: structure, every tensor, NaN/Inf, and checksums.sha256."
    ),
    "inspect": CommandEntry("inspect_cmd", "List tensors, shapes, dtypes, bytes and shards, with totals."),
    "example": CommandEntry(
        "example_cmd",
        "Write a small Llama-style base model and fine-tunes of it (random, deterministic weights) "
        "to try the tool on.",
    ),
    "convert": CommandEntry(
        "convert_cmd",
        "Copy a checkpoint to sharded safetensors, tensor by tensor: change shard size or float dtype, "
        "or turn pytorch_model*.bin pickles into safetensors.",
    ),
    "extract-lora": CommandEntry(
        "extract_cmd",
        "Write a PEFT LoRA adapter of BASE approximating FINETUNED - BASE: each weight's change cut to low "
        "rank by its truncated SVD, one tensor of each model read at a time. The adapter loads with "
        "peft.PeftModel.from_pretrained(base, OUT), and as BASE+OUT wherever this tool reads a model.",
    ),
}


def _import_module(name: str) -> ModuleType:
    return importlib.import_module(f"mergekit_like.cli.{COMMANDS[name].module}")


def load_command(name: str) -> click.Command:
    """The command ``name`` as its module defines it (importing the module, and with it torch)."""
    module = _import_module(name)
    # The module registers on an app of its own, which Typer turns into that one command, built
    # as it would be under this app (same markup mode, no completion options).
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    module.register(single)
    return typer.main.get_command(single)


def import_invoked_command(args: Sequence[str]) -> None:
    """Imports the module of the command that ``args`` (the command line) invoke, if any.

    For the entry point, which imports it inside its Ctrl-C guard, as it did when every command
    was imported at start-up. The app's own options are all flags, so the first word that is not
    one names the command.
    """
    for arg in args:
        if arg in ("--help", "--version"):
            return  # answered before any command runs
        if not arg.startswith("-"):
            if arg in COMMANDS:
                _import_module(arg)
            return


class LazyCommand(TyperCommand):
    """Stands in for a command in the listing; anything beyond its name and summary loads the real one."""

    def __init__(self, name: str, summary: str) -> None:
        super().__init__(name, help=summary)
        self._loaded: click.Command | None = None

    def load(self) -> click.Command:
        if self._loaded is None:
            self._loaded = load_command(self.name or "")
        return self._loaded

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        return self.load().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        return self.load().invoke(ctx)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return self.load().get_params(ctx)


class LazyGroup(TyperGroup):
    """The app's group: lists every command of :data:`COMMANDS` without importing it."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, entry in COMMANDS.items():
            self.add_command(LazyCommand(name, entry.summary))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, LazyCommand):
            command = command.load()  # invoked, or its own --help asked for
        return name, command, rest


app = typer.Typer(
    name="mergekit-like",
    help="Stream, merge and average sharded safetensors checkpoints with bounded memory.",
    cls=LazyGroup,
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
    # Imported here: it loads the I/O package (torch), which only a command needs.
    from mergekit_like.memory import return_freed_tensors_to_the_os, share_one_malloc_arena

    SESSION.debug = debug
    SESSION.low_memory = low_memory
    share_one_malloc_arena()
    if low_memory:
        # For every command: average and convert stream tensors too. Merges and soups also
        # carry the choice in their MergeOptions (SESSION.allocator).
        return_freed_tensors_to_the_os()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
