"""``mergekit-like average``: EMA, power EMA, post-hoc EMA, SWA, LAWA or SFA over a run's checkpoints."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from mergekit_like.cli.output import (
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

from mergekit_like.averaging.offline import AverageOutput, MemoryBound, run_average, trajectory_memory_bound
from mergekit_like.averaging.plan import AverageListing, AveragePlan, AverageSettings, list_average, plan_average
from mergekit_like.averaging.plots import plot_reconstruction
from mergekit_like.averaging.trajectory import TrajectoryPoint
from mergekit_like.card import CardContent, common_license, render_card
from mergekit_like.hub import ModelResolver, model_resolver
from mergekit_like.io.dtypes import parse_dtype
from mergekit_like.plotting import require_matplotlib

HELP = """Average the checkpoints of a training run (one streaming pass).

Examples:

  mergekit-like average runs/exp1 --method ema --decay 0.99,0.999 -o runs/exp1-ema

  mergekit-like average runs/exp1 --method lawa --k 5 --nu 1000 --every-step -o runs/exp1-lawa

  mergekit-like average runs/exp1/checkpoint-3000 --method sfa --anchor runs/exp1/checkpoint-1000 -o out

  mergekit-like average runs/avg/posthoc_ema_0.05_0.1 --method phema --sigma-rel 0.03,0.08,0.15 -o out --plot w.png
"""

PAPERS = {
    "ema": ("https://arxiv.org/abs/2411.18704", "exponential moving average of the checkpoints, step-aware"),
    "power_ema": ("https://arxiv.org/abs/2312.02696", "EDM2's power-function EMA of the checkpoints (relative width)"),
    "phema": ("https://arxiv.org/abs/2312.02696", "EDM2's post-hoc EMA: the stored profiles' least-squares "
                                                  "combination nearest the chosen width"),
    "swa": ("https://arxiv.org/abs/1803.05407", "uniform mean of the checkpoints in a step window"),
    "lawa": ("https://arxiv.org/abs/2209.14981", "mean of the latest k checkpoints spaced nu steps apart"),
    "sfa": ("https://arxiv.org/abs/2503.07507", "(1 - beta) theta + beta theta_o: pulled back toward the anchor"),
}


def register(app: typer.Typer) -> None:
    app.command("average", help=HELP)(average)


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


@handle_errors
def average(
    paths: list[str] = typer.Argument(
        ..., help="A run directory, or checkpoints listed in training order; local paths or ORG/NAME[@REV]."),
    method: str = typer.Option(..., "--method", "-m", help="ema, power_ema, phema, swa, lawa or sfa."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    decay: str = typer.Option(None, "--decay", help="EMA decay per step; several: 0.99,0.999 (one output each)."),
    half_life: str = typer.Option(None, "--half-life", help="EMA half-life in steps instead of --decay."),
    per_checkpoint: bool = typer.Option(False, "--per-checkpoint", help="EMA: each checkpoint counts as one step."),
    warmup: str = typer.Option(None, "--warmup", help="EMA: inv_gamma, decay 1 - (1 + n/inv_gamma)^-power."),
    inv_gamma: float = typer.Option(1.0, "--inv-gamma", help="EMA warm-up: its time scale in steps."),
    power: float = typer.Option(2 / 3, "--power", help="EMA warm-up: its exponent."),
    min_decay: float = typer.Option(0.0, "--min-decay", help="EMA warm-up: the smallest decay."),
    sigma_rel: str = typer.Option(None, "--sigma-rel", help="power_ema, phema: relative widths, e.g. 0.05,0.1."),
    plot: Path = typer.Option(None, "--plot", help="phema: draw the snapshots' weights over training (PNG)."),
    start: int = typer.Option(None, "--start", help="SWA: first step of the window; EMA, LAWA: first step averaged."),
    end: int = typer.Option(None, "--end", help="SWA: last step of the window."),
    k: int = typer.Option(5, "--k", min=1, help="LAWA: how many checkpoints to average."),
    nu: int = typer.Option(0, "--nu", min=0, help="LAWA: the least steps between averaged checkpoints."),
    every_step: bool = typer.Option(False, "--every-step", help="LAWA: one output at every checkpoint."),
    beta: float = typer.Option(0.5, "--beta", min=0.0, max=1.0, help="SFA: pull toward the anchor."),
    anchor: str = typer.Option(None, "--anchor", help="SFA: the checkpoint at the start of the task (or ORG/NAME)."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="Dtype to write (default: the checkpoints')."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (decimal units)."),
    check_finite: bool = typer.Option(False, "--check-finite",
                                      help="Refuse checkpoints and outputs holding NaN or Inf values."),
    list_only: bool = typer.Option(False, "--list", help="Print the checkpoints found, in order, and stop."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Push the output(s) to ORG/NAME once complete."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    token: str = token_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    resolver = model_resolver(token=token, quiet=quiet or as_json)  # Hub ids: fetched into the cache once
    settings = AverageSettings(
        method, decays=_floats(decay, "--decay"), half_lives=_floats(half_life, "--half-life"),
        per_checkpoint=per_checkpoint, start=start, end=end, k=k, nu=nu, every_step=every_step, beta=beta,
        warmup=warmup, inv_gamma=inv_gamma, power=power, min_decay=min_decay,
        sigma_rels=_floats(sigma_rel, "--sigma-rel"),
    )
    if list_only:
        listing = list_average(paths, settings, anchor=anchor, resolve_model=resolver)
        _warn(listing.warnings)
        _print_list(listing, as_json)
        return
    if plot is not None:
        if method != "phema":
            raise typer.BadParameter("--plot draws post-hoc EMA weights: it goes with --method phema",
                                     param_hint="--plot")
        require_matplotlib()  # before any work
    plan = plan_average(paths, settings, anchor=anchor, resolve_model=resolver)
    _warn(plan.warnings)
    if output is None:
        raise typer.BadParameter("give the output directory with -o/--output", param_hint="-o")
    max_shard_size = size_option(shard_size)
    cards = _cards(plan, output.name, _command(paths, settings, anchor, out_dtype), resolver)

    def announce(bound: MemoryBound) -> None:
        if not (quiet or as_json):
            err_console.print(f"memory bound: {human_bytes(bound.bytes)} ({bound.describe()})", highlight=False)

    with RichProgress("average", enabled=not (quiet or as_json)) as progress:
        written = run_average(
            plan.points, plan.outputs, output, out_dtype=parse_dtype(out_dtype) if out_dtype else None,
            overwrite=overwrite, max_shard_size=max_shard_size, progress=progress, files=cards,
            check_finite=check_finite, announce=announce,
        )
    warn_nonfinite(written)
    if plot is not None:
        plot_reconstruction(plan.points, plan.outputs, plot)
    for w in written if push_to_hub else []:
        target = push_to_hub if len(written) == 1 else f"{push_to_hub}-{w.directory.name}"
        push_and_report(w.directory, target, private=private, revision=None, commit_message=None,
                        create_pr=False, token=token, quiet=quiet or as_json)
    if as_json:
        print_json({"method": method, "outputs": [str(w.directory) for w in written],
                    "checkpoints": len(plan.points), "reconstruction": _reconstructions(plan)})
    elif not quiet:
        for w in written:
            console.print(f"wrote {w.num_tensors} tensors, {human_bytes(w.total_bytes)} to {w.directory}",
                          highlight=False)
        for out in plan.outputs:
            if out.reconstruction is not None:
                console.print(f"{out.label}: relative profile error {out.reconstruction.error:.2%} from "
                              f"{len(out.reconstruction.weights)} stored snapshots", highlight=False)


def _reconstruction_note(output: AverageOutput) -> dict[str, object]:
    found = output.reconstruction
    return {} if found is None else {"reconstructed_at_step": found.step, "reconstruction_error": found.error}


def _reconstructions(plan: AveragePlan) -> dict[str, dict[str, object]]:
    """Post-hoc EMA outputs: each one's snapshot weights (oldest first) and profile error."""
    return {str(o.label): {"error": o.reconstruction.error, "step": o.reconstruction.step,
                           "weights": list(o.reconstruction.weights)}
            for o in plan.outputs if o.reconstruction is not None}


def _warn(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True)


def _cards(plan: AveragePlan, title: str, command: str, resolver: ModelResolver) -> list[dict[str, str]]:
    """Each output's model card (README.md), written beside its weights."""
    method = plan.settings.method
    paper, description = PAPERS[method]
    points = plan.points
    recipe = {"method": method, "checkpoints": [_recipe_reference(p.path, resolver) for p in points],
              "steps": [p.step for p in points], **plan.settings.options()}
    license_ = common_license([p.path for p in points])
    several = len(plan.outputs) > 1
    return [{"README.md": render_card(CardContent(
        title=title + (f" ({out.label})" if several else ""), method=method, paper=paper,
        description=description, inputs=[_card_input(points[i], resolver) for i in out.indices],
        recipe={**recipe, "output": out.label, **_reconstruction_note(out)}, has_config=plan.has_config,
        command=command, relation="merge",
        license=license_,
    ))} for out in plan.outputs]



def _card_input(point: TrajectoryPoint, resolver: ModelResolver) -> tuple[str, str]:
    """(reference, role) for the card: Hub inputs by repo id and commit, local ones by path."""
    ref, folder, commit = _hub_reference(point.path, resolver)
    role = f"step {point.step}" + (f", folder {folder}" if folder else "")
    return ref, role + (f", commit {commit}" if commit else "")


def _recipe_reference(path: Path, resolver: ModelResolver) -> str:
    ref, folder, _ = _hub_reference(path, resolver)
    return f"{ref}/{folder}" if folder else ref


def _hub_reference(path: Path, resolver: ModelResolver) -> tuple[str, str | None, str | None]:
    """(what the user typed, the folder inside that Hub repo, its commit), or (path, None, None).

    A checkpoint inside a downloaded training run is named by the repo and its folder there,
    never by its path in the local cache, which holds the user's home and means nothing elsewhere.
    """
    for ref, resolved in resolver.resolved.items():
        if resolved.repo_id is None:
            continue
        if resolved.path == path:
            return ref, None, resolved.commit
        if path.is_relative_to(resolved.path):
            return ref, path.relative_to(resolved.path).as_posix(), resolved.commit
    return str(path), None, None


def _command(paths: list[str], settings: AverageSettings, anchor: str | None, out_dtype: str | None) -> str:
    """The command line that reproduces this run; never the token (it is not a setting)."""
    words = ["mergekit-like", "average", *paths, "--method", settings.method]
    for key, value in settings.options().items():
        option = "--" + key.replace("_", "-")
        if value is True:
            words.append(option)
        elif value is not False:
            words += [option, str(value)]
    if anchor is not None:
        words += ["--anchor", anchor]
    if out_dtype is not None:
        words += ["--out-dtype", out_dtype]
    return shlex.join([*words, "-o", "OUTPUT"])


def _print_list(listing: AverageListing, as_json: bool) -> None:
    points, outputs = listing.points, listing.outputs
    bound = trajectory_memory_bound(points, outputs) if outputs else None
    if as_json:
        print_json({"checkpoints": [{"step": p.step, "path": str(p.path)} for p in points],
                    "outputs": [{"label": o.label, "steps": [points[i].step for i in o.indices]} for o in outputs],
                    "memory_bound_bytes": bound.bytes if bound else None, "outputs_not_shown": listing.unshown})
        return
    for point in points:
        console.print(f"{point.step:>10}  {point.path}", highlight=False, soft_wrap=True)
    if listing.unshown:
        console.print(f"outputs not shown: {listing.unshown}", highlight=False, soft_wrap=True)
    for out in outputs:
        steps = ", ".join(str(points[i].step) for i in out.indices)
        console.print(f"output {out.label or '.'}: steps {steps}", highlight=False, soft_wrap=True)
    if bound is not None:
        console.print(f"memory bound: {human_bytes(bound.bytes)} ({bound.describe()})", highlight=False,
                      soft_wrap=True)
