"""The model card (README.md) and resolved recipe written beside every merge."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mergekit_like import __version__
from mergekit_like.recipe import MergeRecipe, dump_recipe

RECIPE_FILE = "merge_recipe.yml"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(ref: str) -> bool:
    """``org/name`` (optionally ``@revision``) that is not a local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


def write_recipe(directory: Path, recipe: MergeRecipe) -> None:
    """Writes the fully resolved recipe, with the seed and tool version, to rerun the merge."""
    text = dump_recipe(recipe, extra={"written by": f"mergekit-like {__version__}"})
    (directory / RECIPE_FILE).write_text(text, encoding="utf-8")


def write_model_card(
    directory: Path,
    recipe: MergeRecipe,
    *,
    title: str,
    has_config: bool,
    command: str | None = None,
    variant: str | None = None,
) -> None:
    """Writes README.md: Hub metadata in the front matter, then method, inputs and recipe."""
    method = recipe.method
    refs = _all_refs(recipe)
    hub_ids = [r.split("@")[0] for r in refs if is_hub_id(r)]
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        tags=["merge", "mergekit-like", method.name],
        library_name="transformers" if has_config else None,
    )
    lines = [
        f"# {title}" + (f" ({variant})" if variant else ""),
        "",
        f"This model was made with mergekit-like {__version__} using the "
        f"**{method.name}** merge method ([reference]({method.paper})): {method.description}",
        "",
        "## Inputs",
        "",
    ]
    for ref in refs:
        role = " (base)" if ref == recipe.base_model else ""
        shown = f"[{ref}](https://huggingface.co/{ref.split('@')[0]})" if is_hub_id(ref) else f"`{ref}` (local)"
        lines.append(f"- {shown}{role}")
    if variant is not None:
        lines += ["", f"This output is the sweep value `{variant}`."]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(), "```"]
    if command:
        lines += ["", "## Reproduce", "", "```bash", command, "```"]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    ModelCard(content).save(directory / "README.md")


def _all_refs(recipe: MergeRecipe) -> Sequence[str]:
    refs = [m.model for m in recipe.models]
    if recipe.base_model and recipe.base_model not in refs:
        refs.append(recipe.base_model)
    return refs
