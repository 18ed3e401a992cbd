"""``mergekit-like merge``: merge checkpoint directories from a recipe or the quick form."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from mergekit_like.cli.output import SESSION, RichProgress, console, handle_errors, human_bytes, print_json, size_option
from mergekit_like.cli.push_cmd import push_and_report, token_option, warn_if_token_on_command_line
from rich.markup import escape

from mergekit_like.card import merge_outputs
from mergekit_like.errors import RecipeError
from mergekit_like.hub import model_resolver
from mergekit_like.io.dtypes import parse_dtype
from mergekit_like.io.sidefiles import has_config
from mergekit_like.merge.engine import MergeOptions, MergePlan, planned_merge, run_merge
from mergekit_like.merge.recipe import MergeRecipe, load_recipe, recipe_from_cli
from mergekit_like.methods import all_methods

HELP = f"""Merge checkpoints into a new, ready-to-load checkpoint.

Recipe form (mergekit's YAML): mergekit-like merge recipe.yml -o OUT

Quick form: mergekit-like merge --method ties --base BASE M1 M2 -p density=0.2 -p weight=0.7,0.3 -o OUT

Methods: {', '.join(all_methods())}.
"""


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP)(merge)


@handle_errors
def merge(
    args: list[str] = typer.Argument(..., help="A recipe .yml, or (with --method) the models to merge."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    method: str = typer.Option(None, "--method", "-m", help="Merge method (quick form)."),
    base: str = typer.Option(None, "--base", "-b", help="Base model (quick form)."),
    param: list[str] = typer.Option([], "--param", "-p", help="name=value; per model: weight=0.7,0.3."),
    compute_dtype: str = typer.Option(None, "--compute-dtype", help="Dtype to merge in (default float32)."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="Dtype to write (default: the base's)."),
    seed: int = typer.Option(None, "--seed", help="Seed for random methods (DARE); default 0."),
    vocab_mismatch: str = typer.Option(
        None, "--vocab-mismatch",
        help="Embedding/head row counts differ: 'error' (default) or 'base' (keep the base's vocabulary: "
        "missing rows come from the base, extra rows are dropped).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (decimal units)."),
    memory_budget: str = typer.Option(
        "256MiB", "--memory-budget",
        help="Tensor bytes in flight for element-wise methods (row blocks, read-ahead); whole-tensor "
        "methods (ties, slerp, model_stock) hold each tensor whole.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop; reads no tensor data."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pytorch_model*.bin pickles."),
    check_finite: bool = typer.Option(False, "--check-finite", help="Refuse inputs holding NaN or Inf values."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Push the output to ORG/NAME once complete."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    token: str = token_option(),
    pipeline: bool = typer.Option(True, "--pipeline/--no-pipeline",
                                  help="Overlap reading, merging and writing (off: one step at a time, to debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    recipe = _recipe(args, method, base, param, compute_dtype, out_dtype, seed)
    if vocab_mismatch is not None:
        recipe = dataclasses.replace(recipe, vocab_mismatch=vocab_mismatch)
    if output is None and not dry_run:
        raise typer.BadParameter("give the output directory with -o/--output", param_hint="-o")
    options = MergeOptions(
        device=device, memory_budget=size_option(memory_budget, "--memory-budget"),
        max_shard_size=size_option(shard_size, "--shard-size"), pipeline=pipeline, allocator=SESSION.allocator,
        check_finite=check_finite, allow_pickle=allow_pickle,
    )
    resolver = model_resolver(allow_pickle=allow_pickle, token=token, quiet=quiet or as_json)  # Hub ids: to the cache
    with planned_merge(recipe, options, resolve_model=resolver) as plan:
        if dry_run:
            _print_plan(plan, as_json)
            return
        outputs = merge_outputs(recipe, [v.label for v in plan.variants], title=output.name,
                                has_config=has_config(plan.side_file_dir),
                                paths={ref: r.path for ref, r in resolver.resolved.items()})
        with RichProgress("merge", enabled=not (quiet or as_json)) as progress:
            result = run_merge(plan, output, outputs=outputs, overwrite=overwrite, progress=progress)
    if push_to_hub:
        for written in result.outputs:
            target = push_to_hub if len(result.outputs) == 1 else f"{push_to_hub}-{written.directory.name}"
            push_and_report(written.directory, target, private=private, revision=None, commit_message=None,
                            create_pr=False, token=token, quiet=quiet or as_json)
    summary = {
        "method": recipe.merge_method,
        "outputs": [str(o.directory) for o in result.outputs],
        "tensors": result.outputs[0].num_tensors,
        "read_bytes": result.read_bytes,
        "write_bytes": result.write_bytes,
    }
    if result.peak_gpu_bytes is not None:
        summary["peak_gpu_bytes"] = result.peak_gpu_bytes
    if as_json:
        print_json(summary)
    elif not quiet:
        for written in result.outputs:
            console.print(f"wrote {written.num_tensors} tensors, {human_bytes(written.total_bytes)} "
                          f"in {len(written.shards)} shard(s) to {written.directory}", highlight=False)
        if result.peak_gpu_bytes is not None:
            console.print(f"peak GPU memory: {human_bytes(result.peak_gpu_bytes)}", highlight=False)


def _recipe(
    args: list[str], method: str | None, base: str | None, params: list[str],
    compute_dtype: str | None, out_dtype: str | None, seed: int | None,
) -> MergeRecipe:
    if method is None:
        if len(args) != 1 or not args[0].endswith((".yml", ".yaml")):
            raise RecipeError(["give a recipe .yml, or --method with the models to merge"])
        recipe = load_recipe(args[0])
        if compute_dtype:
            recipe = recipe.with_compute_dtype(parse_dtype(compute_dtype))
        overrides: dict[str, Any] = {}
        if out_dtype:
            overrides["out_dtype"] = parse_dtype(out_dtype)
        if seed is not None:
            overrides["seed"] = seed
        return dataclasses.replace(recipe, **overrides)
    return recipe_from_cli(method, args, base=base, params=params, compute_dtype=compute_dtype,
                           out_dtype=out_dtype, seed=seed or 0)



def _print_plan(plan: MergePlan, as_json: bool) -> None:
    recipe = plan.recipe
    data: dict[str, Any] = {
        "method": recipe.merge_method,
        "base_model": recipe.base_model,
        "models": plan.input_refs,
        "compute_dtype": sorted({str(t.compute_dtype).removeprefix("torch.") for t in plan.tensors}),
        "outputs": [v.label or "." for v in plan.variants],
        "tensors": len(plan.tensors),
        "read_bytes": plan.read_bytes,
        "write_bytes": plan.write_bytes,
        "parameter_groups": plan.parameter_groups(),
    }
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{recipe.merge_method}[/] of {len(plan.input_refs)} model(s)"
                  + (f" onto base {escape(recipe.base_model)}" if recipe.base_model else ""), markup=True,
                  highlight=False)
    console.print(f"  {len(plan.tensors)} tensors; reads {human_bytes(plan.read_bytes)}, writes "
                  f"{human_bytes(plan.write_bytes)} in {len(plan.variants)} output(s); computes in "
                  f"{', '.join(data['compute_dtype'])}", highlight=False)
    for group in data["parameter_groups"]:
        examples = ", ".join(group["examples"])
        console.print(f"  {group['tensors']:>5} tensors  {group['parameters']}  (e.g. {examples})",
                      highlight=False, soft_wrap=True)
