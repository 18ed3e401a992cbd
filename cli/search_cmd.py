"""``mergekit-like search``: find a recipe's best values (Optuna), trials here, in threads or on Ray."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import typer
from mergekit_like.cli.output import SESSION, console, err_console, handle_errors, print_json
from rich.table import Table

from mergekit_like.errors import OutputExistsError
from mergekit_like.io.outputs import refuse_output_among_inputs
from mergekit_like.merge.engine import MergeOptions
from mergekit_like.plotting import require_matplotlib
from mergekit_like.search.results import PLOT_FILE, plot_search, write_best
from mergekit_like.search.runner import GREEDY_SOUP, SearchResult, SearchSettings, TrialRecord, run_search
from mergekit_like.search.space import load_space, referenced_models
from mergekit_like.soup import command_evaluator

HELP = """Search the values of a recipe for the best score (Optuna), scoring each merge with a command.

SPACE.yml is a recipe in which any value may be a range:
{search: uniform, low: 0, high: 1}, {search: log_uniform, low: 1e-3, high: 1},
{search: int, low: 1, high: 8}, {search: choice, values: [0.3, 0.5]}.

  mergekit-like search space.yml --eval-cmd 'python eval.py {path}' --trials 40 -o runs/search

  mergekit-like search space.yml --eval-cmd '...' --trials 200 --ray-address auto --gpus-per-trial 1 -o out

A greedy soup (Wortsman et al.) of the recipe's models, each weight {search: choice, values: [0, 1]}:

  mergekit-like search soup_space.yml --sampler greedy-soup --eval-cmd '...' --workers 4 -o out

The eval command's last output line is the score. OUT holds study.db (resume with --resume),
trials.jsonl, trials/ (the output of failed trials), best/ (the best merge) and search.png.
"""


def register(app: typer.Typer) -> None:
    app.command("search", help=HELP)(search)


@handle_errors
def search(
    space_file: Path = typer.Argument(..., help="The recipe with ranges (SPACE.yml)."),
    output: Path = typer.Option(..., "--output", "-o", help="The search's directory."),
    eval_cmd: str = typer.Option(..., "--eval-cmd", help="Scores a merge: a command with {path}."),
    trials: int = typer.Option(20, "--trials", "-n", help="Trials in all (a resumed search's count)."),
    sampler: str = typer.Option("tpe", "--sampler",
                                help="tpe, cmaes, random, grid or greedy-soup (--trials then unused)."),
    direction: str = typer.Option("maximize", "--direction", help="maximize or minimize the score."),
    seed: int = typer.Option(0, "--seed", help="The sampler's seed."),
    workers: int = typer.Option(1, "--workers", help="Trials at once on this machine."),
    ray_address: str = typer.Option(None, "--ray-address", help="Run trials on a Ray cluster: auto or HOST:PORT."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="Ray: CPUs each trial asks for."),
    gpus_per_trial: float = typer.Option(None, "--gpus-per-trial",
                                         help="Ray: GPUs each trial asks for (default: 1 where the cluster has GPUs)."),
    device: str = typer.Option("auto", "--device", help="Where each trial merges: cpu, cuda, cuda:N or auto."),
    batch: int = typer.Option(1, "--batch", help="Candidates merged in one read pass, then scored in turn "
                              "(saves reads; best for linear, task_arithmetic, wise_ft)."),
    grid_points: int = typer.Option(5, "--grid-points", help="Grid sampler: values per continuous range."),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (default: SQLite in OUT)."),
    eval_timeout: float = typer.Option(3600.0, "--eval-timeout", help="Seconds one evaluation may take."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search in OUT, keeping its trials."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh, removing OUT first."),
    plot: bool = typer.Option(None, "--plot/--no-plot",
                              help="Draw OUT/search.png (needs matplotlib; default: when it is installed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress table."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    if device == "cpu" and gpus_per_trial is None:
        gpus_per_trial = 0.0  # trials that merge on the CPU hold no GPU of the cluster
    settings = SearchSettings(trials=trials, sampler=sampler, direction=direction, seed=seed, workers=workers,
                              ray_address=ray_address, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                              batch=batch, grid_points=grid_points, storage=storage)
    space = load_space(space_file)  # every range checked against the method before anything starts
    evaluate = command_evaluator(eval_cmd, timeout=eval_timeout)
    if plot:
        require_matplotlib()  # asked for: refused before any trial when it cannot be drawn
    elif plot is None:
        plot = importlib.util.find_spec("matplotlib") is not None
    _prepare(output, resume=resume, overwrite=overwrite, inputs=referenced_models(space))
    show = not (quiet or as_json)
    options = MergeOptions(allocator=SESSION.allocator, device=device)
    if show:
        count = (f"{2 * len(space.ranges) - 1} trials at most" if settings.sampler == GREEDY_SOUP
                 else f"{settings.trials} trials")
        err_console.print(f"searching {', '.join(r.name for r in space.ranges)}: {count}, "
                          f"{settings.sampler}, {settings.direction}", highlight=False)
    result = run_search(space, evaluate, output, settings, resume=resume, options=options,
                        on_trial=_print_trial if show else None)
    best = write_best(space, result, output, settings, options=options) if result.best_values is not None else None
    if plot:
        plot_search(result.records, [r.name for r in space.ranges], output / PLOT_FILE, settings.direction)
    if as_json:
        print_json({"best_trial": result.best_number, "best_score": result.best_score,
                    "best_values": result.best_values, "best": str(best) if best else None,
                    "trials": [r.__dict__ for r in result.records]})
    elif not quiet:
        _print_summary(result, best)


def _prepare(output: Path, *, resume: bool, overwrite: bool, inputs: list[str]) -> None:
    if resume and overwrite:
        raise typer.BadParameter("--resume keeps OUT's trials and --overwrite removes them: give one",
                                 param_hint="--resume")
    # Before anything is removed: OUT must not be, or hold, a model the search merges.
    refuse_output_among_inputs(output, {ref: Path(ref) for ref in inputs if Path(ref).exists()})
    if output.exists() and not resume:
        if not overwrite:
            raise OutputExistsError("already exists", path=output,
                                    fix="pass --resume to continue its search, or --overwrite to start afresh")
        shutil.rmtree(output)


def _print_trial(record: TrialRecord) -> None:
    values = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.values.items())
    score = "failed" if record.score is None else f"{record.score:.6g}"
    best = "-" if record.best is None else f"{record.best:.6g}"
    err_console.print(f"trial {record.number:>4}  {values}  score {score}  best {best}  ({record.seconds:.1f} s)",
                      highlight=False, soft_wrap=True)


def _print_summary(result: SearchResult, best: Path | None) -> None:
    table = Table(title="merge search", header_style="bold")
    for column in ("trials", "scored", "best trial", "best score", "values"):
        table.add_column(column)
    scored = sum(r.score is not None for r in result.records)
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (result.best_values or {}).items())
    table.add_row(str(len(result.records)), str(scored), str(result.best_number), f"{result.best_score:.6g}"
                  if result.best_score is not None else "-", values or "-")
    console.print(table)
    if best is not None:
        console.print(f"wrote the best merge to {best}", highlight=False)
