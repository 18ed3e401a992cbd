"""``mergekit-like average``: EMA, SWA, LAWA or SFA over a run's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from mergekit_like.cli.output import RichProgress, console, handle_errors, human_bytes, print_json
from mergekit_like.cli.push_cmd import push_and_report, token_option, warn_if_token_on_command_line

from mergekit_like.averaging.offline import (
    AverageOutput,
    ema_outputs,
    lawa_outputs,
    peak_states,
    run_average,
    sfa_outputs,
    swa_outputs,
)
from mergekit_like.averaging.trajectory import TrajectoryPoint, discover, from_paths
from mergekit_like.card import CardContent, write_card
from mergekit_like.errors import RecipeError
from mergekit_like.io import open_checkpoint, parse_size
from mergekit_like.io.dtypes import parse_dtype

HELP = """Average the checkpoints of a training run (one streaming pass).

Examples:

  mergekit-like average runs/exp1 --method ema --decay 0.99,0.999 -o runs/exp1-ema

  mergekit-like average runs/exp1 --method lawa --k 5 --nu 1000 --every-step -o runs/exp1-lawa

  mergekit-like average runs/exp1/checkpoint-3000 --method sfa --anchor runs/exp1/checkpoint-1000 -o out
"""

PAPERS = {
    "ema": ("https://arxiv.org/abs/2411.18704", "exponential moving average of the checkpoints, step-aware"),
    "swa": ("https://arxiv.org/abs/1803.05407", "uniform mean of the checkpoints in a step window"),
    "lawa": ("https://arxiv.org/abs/2209.14981", "mean of the latest k checkpoints spaced nu steps apart"),
    "sfa": ("https://arxiv.org/abs/2503.07507", "(1 - beta) theta + beta theta_o: pulled back toward the anchor"),
}


def register(app: typer.Typer) -> None:
    app.command("average", help=HELP)(average)


def _floats(text: str | None, option: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


@handle_errors
def average(
    paths: list[Path] = typer.Argument(..., help="A run directory, or checkpoints listed in training order."),
    method: str = typer.Option(..., "--method", "-m", help="ema, swa, lawa or sfa."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    decay: str = typer.Option(None, "--decay", help="EMA decay per step; several: 0.99,0.999 (one output each)."),
    half_life: str = typer.Option(None, "--half-life", help="EMA half-life in steps instead of --decay."),
    per_checkpoint: bool = typer.Option(False, "--per-checkpoint", help="EMA: each checkpoint counts as one step."),
    start: int = typer.Option(None, "--start", help="SWA: first step of the window."),
    end: int = typer.Option(None, "--end", help="SWA: last step of the window."),
    k: int = typer.Option(5, "--k", min=1, help="LAWA: how many checkpoints to average."),
    nu: int = typer.Option(0, "--nu", min=0, help="LAWA: the least steps between averaged checkpoints."),
    every_step: bool = typer.Option(False, "--every-step", help="LAWA: one output at every checkpoint."),
    beta: float = typer.Option(0.5, "--beta", min=0.0, max=1.0, help="SFA: pull toward the anchor."),
    anchor: Path = typer.Option(None, "--anchor", help="SFA: the checkpoint at the start of the task."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="Dtype to write (default: the checkpoints')."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (decimal units)."),
    list_only: bool = typer.Option(False, "--list", help="Print the checkpoints found, in order, and stop."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Push the output(s) to ORG/NAME once complete."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    token: str = token_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    points = _trajectory(paths, method, anchor)
    outputs = _outputs(points, method, decay, half_life, per_checkpoint, start, end, k, nu, every_step, beta)
    if list_only:
        _print_list(points, outputs, as_json)
        return
    if output is None:
        raise typer.BadParameter("give the output directory with -o/--output", param_hint="-o")
    settings = {"method": method, "checkpoints": [str(p.path) for p in points],
                "steps": [p.step for p in points], **_settings(method, decay, half_life, per_checkpoint,
                                                               start, end, k, nu, every_step, beta)}

    def finalize(directory: Path, index: int) -> None:
        out = outputs[index]
        paper, description = PAPERS[method]
        inputs = [(str(points[i].path), f"step {points[i].step}") for i in out.indices]
        write_card(directory, CardContent(
            title=output.name + (f" ({out.label})" if len(outputs) > 1 else ""), method=method, paper=paper,
            description=description, inputs=inputs, recipe={**settings, "output": out.label},
            has_config=(directory / "config.json").exists(), relation="merge",
        ))

    with RichProgress("average", enabled=not (quiet or as_json)) as progress:
        written = run_average(
            points, outputs, output, out_dtype=parse_dtype(out_dtype) if out_dtype else None,
            overwrite=overwrite, max_shard_size=_size(shard_size), progress=progress, finalize=finalize,
        )
    for w in written if push_to_hub else []:
        target = push_to_hub if len(written) == 1 else f"{push_to_hub}-{w.directory.name}"
        push_and_report(w.directory, target, private=private, revision=None, commit_message=None,
                        create_pr=False, token=token, quiet=quiet or as_json)
    if as_json:
        print_json({"method": method, "outputs": [str(w.directory) for w in written],
                    "checkpoints": len(points)})
    elif not quiet:
        for w in written:
            console.print(f"wrote {w.num_tensors} tensors, {human_bytes(w.total_bytes)} to {w.directory}",
                          highlight=False)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard-size") from None


def _trajectory(paths: list[Path], method: str, anchor: Path | None) -> list[TrajectoryPoint]:
    if method == "sfa":
        if anchor is None:
            raise RecipeError(["sfa needs --anchor: the checkpoint at the start of the task"])
        model = discover(paths[0])[-1] if len(paths) == 1 and _is_run_dir(paths[0]) else from_paths(paths)[-1]
        return [TrajectoryPoint(0, anchor), TrajectoryPoint(1, model.path)]
    if len(paths) == 1 and _is_run_dir(paths[0]):
        return discover(paths[0])
    return from_paths(paths)


def _is_run_dir(path: Path) -> bool:
    """A directory that is not itself a checkpoint."""
    return path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin"))


def _outputs(points: list[TrajectoryPoint], method: str, decay: str | None, half_life: str | None,
             per_checkpoint: bool, start: int | None, end: int | None, k: int, nu: int, every_step: bool,
             beta: float) -> list[AverageOutput]:
    if method == "ema":
        decays, half_lives = _floats(decay, "--decay"), _floats(half_life, "--half-life")
        if not decays and not half_lives:
            raise RecipeError(["ema needs --decay or --half-life"])
        bad = [d for d in decays if not 0 <= d < 1] + [h for h in half_lives if h <= 0]
        if bad:
            raise RecipeError([f"decays must lie in [0, 1) and half-lives be positive; got {bad}"])
        return ema_outputs(points, decays, half_lives, per_checkpoint)
    if method == "swa":
        return swa_outputs(points, start, end)
    if method == "lawa":
        return lawa_outputs(points, k, nu, every_step)
    if method == "sfa":
        return sfa_outputs(beta)
    raise RecipeError([f"unknown averaging method {method!r} (known: ema, swa, lawa, sfa)"])


def _settings(method: str, decay: str | None, half_life: str | None, per_checkpoint: bool,
              start: int | None, end: int | None, k: int, nu: int, every_step: bool, beta: float
              ) -> dict[str, Any]:
    by_method: dict[str, dict[str, Any]] = {
        "ema": {"decay": decay, "half_life": half_life, "per_checkpoint": per_checkpoint},
        "swa": {"start": start, "end": end},
        "lawa": {"k": k, "nu": nu, "every_step": every_step},
        "sfa": {"beta": beta},
    }
    chosen = by_method[method]
    return {key: value for key, value in chosen.items() if value is not None}


def _print_list(points: list[TrajectoryPoint], outputs: list[AverageOutput], as_json: bool) -> None:
    with open_checkpoint(points[-1].path) as newest:
        largest = max((e.numel for e in newest.entries()), default=0)
    bound = (peak_states(outputs) + 1) * largest * 4
    if as_json:
        print_json({"checkpoints": [{"step": p.step, "path": str(p.path)} for p in points],
                    "outputs": [{"label": o.label, "steps": [points[i].step for i in o.indices]} for o in outputs],
                    "memory_bound_bytes": bound})
        return
    for point in points:
        console.print(f"{point.step:>10}  {point.path}", highlight=False)
    for out in outputs:
        steps = ", ".join(str(points[i].step) for i in out.indices)
        console.print(f"output {out.label or '.'}: steps {steps}", highlight=False, soft_wrap=True)
    console.print(f"memory bound: {peak_states(outputs)} float32 state(s) + 1 read tensor of the largest "
                  f"({human_bytes(bound)})", highlight=False)
