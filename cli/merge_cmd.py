"""``mergekit-like merge``: merge checkpoint directories from a recipe or the quick form."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from mergekit_like.cli.output import (
    SESSION,
    RichProgress,
    console,
    handle_errors,
    human_bytes,
    one_output,
    print_json,
    size_option,
    warn_nonfinite,
)
from mergekit_like.cli.push_cmd import push_and_report, token_option, warn_if_token_on_command_line
from rich.markup import escape

from mergekit_like.adapters.combine import merge_as_adapter
from mergekit_like.card import merge_outputs, recipe_set_text
from mergekit_like.errors import RecipeError
from mergekit_like.hub import ModelResolver, model_resolver
from mergekit_like.io.dtypes import parse_dtype
from mergekit_like.io.outputs import OutputSpec
from mergekit_like.io.sidefiles import has_config
from mergekit_like.merge.engine import MergeOptions, MergePlan, planned_merge
from mergekit_like.merge.multidoc import NamedRecipe, RecipeSet, load_recipe_set, merge_documents
from mergekit_like.merge.recipe import MergeRecipe, recipe_from_cli
from mergekit_like.methods import all_methods

HELP = f"""Merge checkpoints into a new, ready-to-load checkpoint.

Recipe form (mergekit's YAML, as mergekit-yaml takes it): mergekit-like merge recipe.yml OUT

A recipe of several YAML documents (mergekit-multi's form) runs every named merge first.

Quick form: mergekit-like merge --method ties --base BASE M1 M2 -p density=0.2 -p weight=0.7,0.3 -o OUT

Methods: {', '.join(all_methods())}.
"""
MERGEKIT = "mergekit-yaml options"
# mergekit-yaml's --out-shard-size counts with K, M and B suffixes (5B: five billion bytes).
_KMB = {"K": 10**3, "M": 10**6, "B": 10**9}


def register(app: typer.Typer) -> None:
    app.command("merge", help=HELP)(merge)


@handle_errors
def merge(
    args: list[str] = typer.Argument(..., help="A recipe .yml and the output directory, or (with --method) "
                                     "the models to merge."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    method: str = typer.Option(None, "--method", "-m", help="Merge method (quick form)."),
    base: str = typer.Option(None, "--base", "-b", help="Base model (quick form)."),
    param: list[str] = typer.Option([], "--param", "-p", help="name=value; per model: weight=0.7,0.3."),
    compute_dtype: str = typer.Option(None, "--compute-dtype", help="Dtype to merge in (default float32)."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="Dtype to write (default: the base's)."),
    seed: int = typer.Option(None, "--seed", "--random-seed", help="Seed for random methods (DARE, DELLA); "
                             "default 0."),
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
    check_finite: bool = typer.Option(False, "--check-finite",
                                      help="Refuse inputs and outputs holding NaN or Inf values."),
    keep_intermediates: Path = typer.Option(
        None, "--keep-intermediates", "--intermediate-dir", "-I",
        help="Multi-document recipes: write the named merges to DIR/NAME and keep them (default: a temporary "
        "directory beside the output, removed afterwards)."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Push the output to ORG/NAME once complete."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    token: str = token_option(),
    pipeline: bool = typer.Option(True, "--pipeline/--no-pipeline",
                                  help="Overlap reading, merging and writing (off: one step at a time, to debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    cuda: bool = typer.Option(False, "--cuda", help="Merge on the GPU (as --device cuda).", rich_help_panel=MERGEKIT),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="Copy the tokenizer files beside the output.", rich_help_panel=MERGEKIT),
    out_shard_size: str = typer.Option(None, "--out-shard-size", help="Largest output shard in bytes, with K, M "
                                       "or B (as mergekit: 5B); same as --shard-size.", rich_help_panel=MERGEKIT),
    allow_crimes: bool = typer.Option(False, "--allow-crimes", help="Merge models whose config.json names "
                                      "different architectures.", rich_help_panel=MERGEKIT),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="Write README.md, the model card.", rich_help_panel=MERGEKIT),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle", help="Accepted; no effect: tensors are always "
                                       "read one at a time.", rich_help_panel=MERGEKIT),
    low_cpu_memory: bool = typer.Option(False, "--low-cpu-memory", help="Accepted; no effect: host memory holds "
                                        "a few tensors at a time anyway.", rich_help_panel=MERGEKIT),
    read_to_gpu: bool = typer.Option(False, "--read-to-gpu", help="Accepted; no effect: on a GPU, tensors go "
                                     "straight from the file to it through pinned buffers.", rich_help_panel=MERGEKIT),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Refused: this tool runs no model "
                                           "code.", rich_help_panel=MERGEKIT),
    as_adapter: str | None = typer.Option(None, "--as-adapter", help="Write an adapter, not a model, from adapters "
                                          "of one base: cat (exact; linear, task_arithmetic) or svd (any method, "
                                          "then cut to --rank)."),
    rank: int | None = typer.Option(None, "--rank", help="The rank of an --as-adapter svd output (default: the "
                                    "adapters' largest)."),
) -> None:
    warn_if_token_on_command_line(token)
    if trust_remote_code:
        raise typer.BadParameter(
            "this tool never runs a model's code: it reads tensors and config.json only, so no model needs "
            "remote code to be merged; leave the option out", param_hint="--trust-remote-code")
    args, target = _split_output(args, output, method, dry_run)
    recipes = _recipes(args, method, base, param, compute_dtype, out_dtype, seed)
    if vocab_mismatch is not None:
        recipes = _each(recipes, lambda r: dataclasses.replace(r, vocab_mismatch=vocab_mismatch))
    options = MergeOptions(
        device="cuda" if cuda and device == "cpu" else device, memory_budget=size_option(memory_budget,
                                                                                          "--memory-budget"),
        max_shard_size=_shard_size(shard_size, out_shard_size), pipeline=pipeline, allocator=SESSION.allocator,
        check_finite=check_finite, allow_pickle=allow_pickle, allow_crimes=allow_crimes,
        copy_tokenizer=copy_tokenizer,
    )
    resolver = model_resolver(allow_pickle=allow_pickle, token=token, quiet=quiet or as_json)  # Hub ids: to the cache
    if dry_run:
        with planned_merge(recipes.final.recipe, options, resolve_model=_dry_run_resolver(recipes, resolver)) as plan:
            _print_plan(plan, as_json)
        return
    assert target is not None
    out = target
    if as_adapter is not None:
        _merge_as_adapter(recipes, out, options, resolver, as_adapter, rank, overwrite=overwrite, quiet=quiet,
                          as_json=as_json, card=write_model_card)
        return

    def final_outputs(plan: MergePlan) -> list[OutputSpec]:
        paths = {ref: r.path for ref, r in resolver.resolved.items()}
        recipe = recipes.final.recipe.with_output_dtype(plan.uniform_out_dtype)
        text = recipe_set_text(recipes, paths=paths) if recipes.intermediates else None
        return merge_outputs(recipe, [v.label for v in plan.variants], title=out.name,
                             has_config=has_config(plan.side_file_dir) or plan.output_config is not None,
                             paths=paths, recipe_file=text, card=write_model_card)

    with contextlib.ExitStack() as bars:
        def progress(name: str) -> RichProgress:
            return bars.enter_context(RichProgress(f"merge {name}" if recipes.intermediates else "merge",
                                                   enabled=not (quiet or as_json)))

        result = merge_documents(recipes, out, options=options, resolve_model=resolver,
                                 final_outputs=final_outputs, keep_intermediates=keep_intermediates,
                                 overwrite=overwrite, progress=progress)
    recipe = recipes.final.recipe
    warn_nonfinite(result.outputs)
    if push_to_hub:
        for written in result.outputs:
            repo = push_to_hub if len(result.outputs) == 1 else f"{push_to_hub}-{written.directory.name}"
            push_and_report(written.directory, repo, private=private, revision=None, commit_message=None,
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


def _split_output(
    args: list[str], output: Path | None, method: str | None, dry_run: bool,
) -> tuple[list[str], Path | None]:
    """The recipe form takes its output as the last argument (as mergekit-yaml) or with -o."""
    if method is not None:
        if output is None and not dry_run:
            raise typer.BadParameter("give the output directory with -o/--output", param_hint="-o")
        return args, output
    if len(args) > 2:
        raise typer.BadParameter(f"give a recipe and the output directory; {len(args) - 2} more argument(s) "
                                 f"given ({', '.join(args[2:])})", param_hint="ARGS")
    positional = Path(args[1]) if len(args) == 2 else None
    if dry_run and positional is None and output is None:
        return args[:1], None
    return args[:1], one_output(positional, output)


def _shard_size(shard_size: str, out_shard_size: str | None) -> int:
    if out_shard_size is None:
        return size_option(shard_size, "--shard-size")
    text = out_shard_size.strip().upper()
    if text[-1:] in _KMB and text[:-1].replace(".", "", 1).isdigit():
        return int(float(text[:-1]) * _KMB[text[-1]])
    return size_option(out_shard_size, "--out-shard-size")


def _recipes(
    args: list[str], method: str | None, base: str | None, params: list[str],
    compute_dtype: str | None, out_dtype: str | None, seed: int | None,
) -> RecipeSet:
    if method is None:
        if len(args) != 1 or not args[0].endswith((".yml", ".yaml")):
            raise RecipeError(["give a recipe .yml and the output directory, or --method with the models to merge"])
        recipes = load_recipe_set(args[0])
        overrides: dict[str, Any] = {}
        if out_dtype:
            overrides["out_dtype"] = parse_dtype(out_dtype)
        if seed is not None:
            overrides["seed"] = seed

        def override(recipe: MergeRecipe) -> MergeRecipe:
            if compute_dtype:
                recipe = recipe.with_compute_dtype(parse_dtype(compute_dtype))
            return dataclasses.replace(recipe, **overrides)

        return _each(recipes, override)
    recipe = recipe_from_cli(method, args, base=base, params=params, compute_dtype=compute_dtype,
                             out_dtype=out_dtype, seed=seed or 0)
    return RecipeSet((NamedRecipe(None, recipe, ()),))


def _each(recipes: RecipeSet, change: Callable[[MergeRecipe], MergeRecipe]) -> RecipeSet:
    return RecipeSet(tuple(dataclasses.replace(d, recipe=change(d.recipe)) for d in recipes.documents))


def _dry_run_resolver(recipes: RecipeSet, resolver: ModelResolver) -> ModelResolver:
    """A dry run plans the final document only; it cannot read intermediates that do not exist yet."""
    if recipes.intermediates:
        names = ", ".join(str(d.name) for d in recipes.intermediates)
        raise RecipeError([f"--dry-run plans one merge; this recipe first makes {names}: run it (with "
                           "--keep-intermediates DIR to keep them), or dry-run each document alone"])
    return resolver


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
    vocabulary = plan.vocabulary_summary()
    if vocabulary is not None:
        data["vocabulary"] = vocabulary
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]{recipe.merge_method}[/] of {len(plan.input_refs)} model(s)"
                  + (f" onto base {escape(recipe.base_model)}" if recipe.base_model else ""), markup=True,
                  highlight=False)
    console.print(f"  {len(plan.tensors)} tensors; reads {human_bytes(plan.read_bytes)}, writes "
                  f"{human_bytes(plan.write_bytes)} in {len(plan.variants)} output(s); computes in "
                  f"{', '.join(data['compute_dtype'])}", highlight=False)
    if vocabulary is not None:
        _print_vocabulary(vocabulary)
    for group in data["parameter_groups"]:
        examples = ", ".join(group["examples"])
        console.print(f"  {group['tensors']:>5} tensors  {group['parameters']}  (e.g. {examples})",
                      highlight=False, soft_wrap=True)


def _print_vocabulary(summary: dict[str, Any]) -> None:
    padding = f" + {summary['padding_rows']} padding rows" if summary["padding_rows"] else ""
    console.print(f"  vocabulary ({escape(str(summary['source']))}): {summary['tokens']} tokens{padding}; "
                  f"{summary['forced']} forced", highlight=False)
    for model, rows in summary["models"].items():
        added = summary["tokens_added_by_model"].get(model, 0)
        console.print(f"    {escape(model)}: {rows['own_rows']} own rows ({rows['moved']} moved), "
                      f"{rows['filled']} filled, adds {added} tokens", highlight=False, soft_wrap=True)
    for why, count in summary["default_rows"].items():
        console.print(f"    {count:>5} rows {escape(why)}", highlight=False)


def _merge_as_adapter(recipes: RecipeSet, out: Path, options: MergeOptions, resolver: ModelResolver, combination: str,
                      rank: int | None, *, overwrite: bool, quiet: bool, as_json: bool, card: bool) -> None:
    if recipes.intermediates:
        raise RecipeError(["--as-adapter merges one document; make the intermediates first"])
    with planned_merge(recipes.final.recipe, options, resolve_model=resolver) as plan:
        paths = {ref: r.path for ref, r in resolver.resolved.items()}
        (spec,) = merge_outputs(plan.recipe, [None], title=out.name, has_config=False, paths=paths, card=card)
        with RichProgress("merge as adapter", enabled=not (quiet or as_json)) as bar:
            result = merge_as_adapter(plan, out, combination=combination, rank=rank, overwrite=overwrite,
                                      progress=bar, files=spec.files)
    summary = {"output": str(result.path), "rank": result.rank, "modules": result.modules,
               "kept_fraction": result.kept_fraction}
    if as_json:
        print_json(summary)
    elif not quiet:
        kept = f"; the cut keeps {result.kept_fraction:.1%} of the merged deltas' norm" if result.kept_fraction else ""
        console.print(f"wrote an adapter of {result.modules} modules (rank {result.rank}) to {result.path}{kept}",
                      highlight=False)
