"""The model card (README.md) and resolved recipe written beside every merge."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_like import __version__
from mergekit_like.adapters import is_adapter_dir, read_adapter_config, split_adapter_ref
from mergekit_like.errors import printable
from mergekit_like.hub import is_hub_id, split_ref
from mergekit_like.io.experts import resolved_expert_layout
from mergekit_like.io.outputs import OutputSpec
from mergekit_like.merge.multidoc import RecipeSet
from mergekit_like.merge.recipe import MergeRecipe, dump_recipe

logger = logging.getLogger(__name__)

RECIPE_FILE = "merge_recipe.yml"
CARD_FILE = "README.md"


def recipe_text(recipe: MergeRecipe, *, paths: Mapping[str, Path] | None = None) -> str:
    """The fully resolved recipe (``merge_recipe.yml``), with the seed and tool version, to rerun the merge.

    Resolved: every method parameter is written (defaults included), local inputs as
    absolute paths (the rerun may start elsewhere), and Hub inputs pinned to the commit
    they were read at, which ``paths`` (ref -> the directory the input was read from, as
    for :func:`merge_card`) gives.
    """
    return dump_recipe(resolved_recipe(recipe, paths), extra={"written by": f"mergekit-like {__version__}"})


def recipe_set_text(recipes: RecipeSet, *, paths: Mapping[str, Path] | None = None) -> str:
    """A multi-document recipe's ``merge_recipe.yml``: every document resolved, the named merges
    still named (a rerun makes them again), in the order they run."""
    names = {d.name for d in recipes.intermediates if d.name is not None}
    documents = [dump_recipe(resolved_recipe(d.recipe, paths, keep=names), name=d.name) for d in recipes.documents]
    return f"# written by: mergekit-like {__version__}\n" + "---\n".join(documents)


def resolved_recipe(
    recipe: MergeRecipe, paths: Mapping[str, Path] | None = None, *, keep: Collection[str] = (),
) -> MergeRecipe:
    """``recipe`` with every default filled in and every input reference (but ``keep``) made reproducible."""
    refs = [ref for ref in recipe.referenced_models() if ref not in keep]
    if recipe.tokenizer is not None:
        refs += [ref for ref in recipe.tokenizer.models() if ref not in refs and ref not in keep]
    recipe = dataclasses.replace(recipe, expert_layout=resolved_expert_layout(recipe.expert_layout))
    return recipe.with_defaults().with_refs({ref: pinned_model_ref(ref, paths) for ref in refs})


def pinned_model_ref(ref: str, paths: Mapping[str, Path] | None = None) -> str:
    """:func:`pinned_ref` of a model, or of each side of ``BASE+ADAPTER``; an adapter named alone is
    written with the base its config named, so a rerun reads the same base."""
    base, adapter = adapter_sides(ref, paths)
    if adapter is None:
        return pinned_ref(ref, paths)
    return f"{pinned_ref(base, paths)}+{pinned_ref(adapter, paths)}"


def adapter_sides(ref: str, paths: Mapping[str, Path] | None = None) -> tuple[str, str | None]:
    """``(base, adapter)`` of ``BASE+ADAPTER`` or of an adapter named alone (its config's base); ``(ref, None)``
    for a model."""
    base, adapter = split_adapter_ref(ref)
    if adapter is not None:
        return base, adapter
    local = (paths or {}).get(ref, Path(ref))
    named_base = read_adapter_config(local).base_model if is_adapter_dir(local) else None
    return (named_base, ref) if named_base else (ref, None)


def pinned_ref(ref: str, paths: Mapping[str, Path] | None = None) -> str:
    """An absolute local path, or a Hub id at its commit (``org/name@sha``) when ``paths`` tells it."""
    if not is_hub_id(ref):
        return os.path.abspath(ref)
    commit = _hub_commit(ref, paths)
    if commit is None:
        logger.info("'%s' is written without a pinned commit; a rerun reads its revision of that time", ref)
        return ref
    return f"{split_ref(ref)[0]}@{commit}"


@dataclass(frozen=True)
class CardContent:
    """What a model card says, whichever command made the model."""

    title: str
    method: str
    paper: str
    description: str
    inputs: Sequence[tuple[str, str]]  # (reference, role such as "base" or "step 1000")
    recipe: Mapping[str, Any]
    has_config: bool
    command: str | None = None
    note: str | None = None
    relation: str = "merge"
    license: str | None = None


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def fenced(content: str, info: str) -> list[str]:
    """A fenced code block holding ``content`` whatever it holds: CommonMark closes a fence only at a
    line of at least as many backticks, so one longer than every run inside stays open to its end."""
    fence = "`" * max(3, _longest_backtick_run(content) + 1)
    return [fence + info, content, fence]


def code_span(text: str) -> str:
    """``text`` as inline code: a span ends at the next run of exactly its own length (backslashes
    escape nothing inside), so it is one longer than every run inside; a space pads a span that
    starts or ends with a backtick, which CommonMark strips again."""
    ticks = "`" * (_longest_backtick_run(text) + 1)
    edge = text[:1] + text[-1:]
    padded = "`" in edge or (edge == "  " and bool(text.strip()))
    return f"{ticks} {text} {ticks}" if padded else f"{ticks}{text}{ticks}"


def render_card(card: CardContent) -> str:
    """The model card (``README.md``): Hub metadata in the front matter, then method, inputs and recipe."""
    from huggingface_hub import ModelCard, ModelCardData  # here: a tenth of a second every command paid

    refs = [ref for ref, _ in card.inputs]
    hub_ids = list(dict.fromkeys(r.split("@")[0] for r in refs if is_hub_id(r)))
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation=card.relation if hub_ids else None,
        tags=["merge", "mergekit-like", card.method],
        library_name="transformers" if card.has_config else None,
        license=card.license,
    )
    lines = [
        f"# {printable(card.title)}",
        "",
        f"This model was made with mergekit-like {__version__} using **{card.method}** "
        f"([reference]({card.paper})): {card.description}",
        "",
        "## Inputs",
        "",
    ]
    for ref, role in card.inputs:
        shown = (f"[{ref}](https://huggingface.co/{ref.split('@')[0]})" if is_hub_id(ref)
                 else f"{code_span(printable(ref))} (local)")
        lines.append(f"- {shown}" + (f" ({printable(role)})" if role else ""))
    if card.note:
        lines += ["", card.note]
    lines += ["", "## Recipe", "", *fenced(yaml.safe_dump(dict(card.recipe), sort_keys=False).rstrip(), "yaml")]
    if card.command:
        # The callers build the command with shlex.join, so it runs as written, newlines in paths included.
        lines += ["", "## Reproduce", "", *fenced(card.command, "bash")]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return str(ModelCard(content))


def merge_card(
    recipe: MergeRecipe,
    *,
    title: str,
    has_config: bool,
    command: str | None = None,
    variant: str | None = None,
    paths: Mapping[str, Path] | None = None,
    note: str | None = None,
) -> str:
    """The card of a merge; ``paths`` (ref -> local directory) adds Hub commits and licenses."""
    method = recipe.method
    inputs = []
    for model in recipe.referenced_models():
        base, adapter = adapter_sides(model, paths)
        role = "base" if model == recipe.base_model else ""
        if adapter is not None:  # listed as the two repositories they are
            inputs.append((base, ", ".join(filter(None, [role, "the adapter's base", _revision_note(base, paths)]))))
            model, role = adapter, "LoRA adapter"
        inputs.append((model, ", ".join(filter(None, [role, _revision_note(model, paths)]))))
    refs = [ref for ref, _ in inputs]
    notes = [f"This output is the sweep value `{variant}`." if variant else None, note]
    return render_card(CardContent(
        title=title + (f" ({variant})" if variant else ""), method=method.name, paper=method.paper,
        description=method.description, inputs=inputs, recipe=recipe.to_dict(), has_config=has_config,
        command=command, note="\n\n".join(n for n in notes if n) or None,
        license=common_license([paths.get(r, Path(r)) if paths else Path(r) for r in refs]),
    ))


def merge_outputs(
    recipe: MergeRecipe,
    labels: Sequence[str | None],
    *,
    title: str,
    has_config: bool,
    paths: Mapping[str, Path] | None = None,
    note: str | None = None,
    files: Mapping[str, str] | None = None,
    recipe_file: str | None = None,
    card: bool = True,
) -> list[OutputSpec]:
    """One output per label, each with its model card (unless not ``card``) and the recipe that reruns
    it (``recipe_file``, by default ``recipe``'s resolved text), plus ``files``."""
    command = f"mergekit-like merge {RECIPE_FILE} OUTPUT"
    recipe_file = recipe_file if recipe_file is not None else recipe_text(recipe, paths=paths)
    return [
        OutputSpec(label, {
            RECIPE_FILE: recipe_file,
            **({CARD_FILE: merge_card(recipe, title=title, has_config=has_config, command=command, variant=label,
                                      paths=paths, note=note)} if card else {}),
            **(files or {}),
        })
        for label in labels
    ]


def _revision_note(ref: str, paths: Mapping[str, Path] | None) -> str:
    commit = _hub_commit(ref, paths)
    return f"commit {commit}" if commit else ""


def _hub_commit(ref: str, paths: Mapping[str, Path] | None) -> str | None:
    # The Hub cache keeps every revision under snapshots/<commit sha>.
    path = paths.get(ref) if paths else None
    if path is None or not is_hub_id(ref) or path.parent.name != "snapshots":
        return None
    return path.name


def common_license(paths: Sequence[Path]) -> str | None:
    """The license every input's model card states, when they all state the same one."""
    from huggingface_hub import ModelCard

    licenses = set()
    for path in paths:
        readme = (path if path.is_dir() else path.parent) / "README.md"
        try:
            licenses.add(ModelCard.load(readme).data.license if readme.is_file() else None)
        except Exception:
            licenses.add(None)
    (only,) = licenses if len(licenses) == 1 else (None,)
    return only if isinstance(only, str) else None
