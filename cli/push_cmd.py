"""``mergekit-like push``: upload an output directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from mergekit_like.cli.output import console, err_console, handle_errors, print_json

from mergekit_like.hub import PushResult, push

HELP = """Push a finished output directory to the Hugging Face Hub, in one commit.

Example: mergekit-like push ./merged my-org/my-merge --private

The token comes from --token, HF_TOKEN or `hf auth login`; it is never printed.
"""


def register(app: typer.Typer) -> None:
    app.command("push", help=HELP)(push_command)


def token_option() -> Any:
    return typer.Option(None, "--token", help="Hub token (prefer HF_TOKEN: a command-line token lands in history).")


def warn_if_token_on_command_line(token: str | None) -> None:
    if token:
        err_console.print("warning: --token on the command line lands in your shell history; prefer HF_TOKEN",
                          highlight=False)


def push_and_report(directory: Path, repo_id: str, *, private: bool, revision: str | None,
                    commit_message: str | None, create_pr: bool, token: str | None, quiet: bool) -> PushResult:
    result = push(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                  create_pr=create_pr, token=token, quiet=quiet)  # quiet: no upload progress bars either
    if not quiet:
        where = result.pr_url or result.commit_url or f"{repo_id}@{result.revision}"
        console.print(f"pushed {directory} to {repo_id} ({where})", highlight=False)
    return result


@handle_errors
def push_command(
    directory: Path = typer.Argument(..., help="A finished output directory."),
    repo_id: str = typer.Argument(..., help="ORG/NAME on the Hub."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: str = typer.Option(None, "--revision", help="Branch to push to (created if needed)."),
    commit_message: str = typer.Option(None, "--commit-message", help="Commit message."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    token: str = token_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    result = push_and_report(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                             create_pr=create_pr, token=token, quiet=quiet or as_json)
    if as_json:
        print_json({"repo_id": result.repo_id, "revision": result.revision, "commit_url": result.commit_url,
                    "pr_url": result.pr_url})
