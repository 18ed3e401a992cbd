"""``mergekit-like soup``: uniform or greedy model soups."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from mergekit_like.cli.output import (
    SESSION,
    RichProgress,
    console,
    err_console,
    handle_errors,
    human_bytes,
    print_json,
    size_option,
    warn_nonfinite,
)
from mergekit_like.cli.push_cmd import push_and_report, token_option, warn_if_token_on_command_line
from rich.table import Table

from mergekit_like.card import merge_outputs
from mergekit_like.hub import model_resolver
from mergekit_like.io.outputs import check_output
from mergekit_like.io.sidefiles import has_config
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.soup import GreedySoupResult, SoupStep, command_evaluator, greedy_soup, uniform_soup_recipe

HELP = """Average fine-tuned models into a soup.

Uniform: mergekit-like soup run1 run2 run3 -o soup

Greedy (Wortsman et al.): mergekit-like soup run1 run2 run3 --greedy --eval-cmd 'python eval.py {path}' -o soup
(the command's last output line is the score; higher is better unless --lower-is-better)

The same greedy soup with trials in parallel, on a Ray cluster or resumable:
mergekit-like search --sampler greedy-soup (see its --help).
"""
SCORES_FILE = "soup_scores.json"


def register(app: typer.Typer) -> None:
    app.command("soup", help=HELP)(soup)


@handle_errors
def soup(
    models: list[str] = typer.Argument(..., help="The fine-tuned models (ingredients)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy soup: keep ingredients that improve the score."),
    eval_cmd: str = typer.Option(None, "--eval-cmd", help="Scores a checkpoint: a command with {path}."),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="The score is a loss."),
    tolerance: float = typer.Option(0.0, "--tolerance", min=0.0, help="Keep only improvements larger than this."),
    compute_dtype: str = typer.Option(None, "--compute-dtype", help="Dtype to average in (default float32)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (decimal units)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    check_finite: bool = typer.Option(False, "--check-finite",
                                      help="Refuse ingredients and soups holding NaN or Inf values."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Push the soup to ORG/NAME once complete."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    token: str = token_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    options = MergeOptions(max_shard_size=size_option(shard_size), allocator=SESSION.allocator,
                           check_finite=check_finite)
    # Before any download or evaluation (a greedy soup scores for hours): the output must be writable.
    check_output(output, overwrite=overwrite)
    result: GreedySoupResult | None = None
    ingredients = list(models)
    resolver = model_resolver(token=token, quiet=quiet or as_json)  # Hub ids are fetched into the cache once
    if greedy:
        if not eval_cmd:
            raise typer.BadParameter("--greedy needs --eval-cmd", param_hint="--eval-cmd")
        show = not (quiet or as_json)
        result = greedy_soup(
            models, command_evaluator(eval_cmd), lower_is_better=lower_is_better, tolerance=tolerance,
            workdir=output.absolute().parent, compute_dtype=compute_dtype,
            on_step=_print_step if show else None, resolve_model=resolver, options=options,
        )
        ingredients = result.kept
        if show:
            _print_table(result)
    recipe = uniform_soup_recipe(ingredients, compute_dtype)
    with planned_merge(recipe, options, resolve_model=resolver) as plan:
        paths = {ref: r.path for ref, r in resolver.resolved.items()}
        note = scores = None
        if result is not None:
            scores = {SCORES_FILE: json.dumps(result.to_dict(), indent=2) + "\n"}
            note = (f"Greedy soup: kept {len(result.kept)} of {len(models)} ingredients; score {result.score:g}. "
                    f"Every score is in `{SCORES_FILE}`.")
        outputs = merge_outputs(recipe, [None], title=output.name, has_config=has_config(plan.side_file_dir),
                                paths=paths, note=note, files=scores)
        with RichProgress("soup", enabled=not (quiet or as_json)) as progress:
            merged = run_merge(plan, output, outputs=outputs, overwrite=overwrite, progress=progress)
    warn_nonfinite(merged.outputs)
    if push_to_hub:
        push_and_report(output, push_to_hub, private=private, revision=None, commit_message=None,
                        create_pr=False, token=token, quiet=quiet or as_json)
    if as_json:
        print_json({"output": str(output), "ingredients": ingredients,
                    **({"greedy": result.to_dict()} if result else {})})
    elif not quiet:
        written = merged.outputs[0]
        console.print(f"wrote the soup of {len(ingredients)} model(s), {human_bytes(written.total_bytes)}, "
                      f"to {written.directory}", highlight=False)


def _print_step(step: SoupStep) -> None:
    verdict = "kept" if step.kept else "dropped"
    tried = "" if step.soup_score is None else f", soup with it {step.soup_score:g}"
    err_console.print(f"  {step.ingredient}: alone {step.alone:g}{tried} -> {verdict}", highlight=False)


def _print_table(result: GreedySoupResult) -> None:
    table = Table(title="greedy soup", header_style="bold")
    for column in ("ingredient", "alone", "soup with it", "kept"):
        table.add_column(column)
    for step in result.steps:
        table.add_row(step.ingredient, f"{step.alone:g}",
                      "-" if step.soup_score is None else f"{step.soup_score:g}", "yes" if step.kept else "no")
    console.print(table)

