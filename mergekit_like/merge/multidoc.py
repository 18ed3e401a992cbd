"""Recipes of several YAML documents (mergekit-multi's form): named merges that later ones use.

Each document is a recipe; a document with ``name: NAME`` makes an intermediate model that
the other documents name as a model (``model: NAME``). The final output is the one unnamed
document (or, when every document is named, the last one in the file). Documents run in
dependency order, each streamed like any merge; every problem (a cycle, a name used but not
defined, an invalid document) is reported before any work.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.errors import RecipeError, short_text
from mergekit_like.hub import is_hub_id
from mergekit_like.io.outputs import OutputSpec, check_output
from mergekit_like.merge.engine import MergeResult, run_merge
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.plan import MergePlan, ModelResolver, planned_merge
from mergekit_like.merge.recipe import MergeRecipe, load_documents, parse_recipe
from mergekit_like.progress import ProgressSink

NAME_KEY = "name"


@dataclass(frozen=True)
class NamedRecipe:
    """One document: its recipe and the name later documents call its output (None: the final one)."""

    name: str | None
    recipe: MergeRecipe
    needs: tuple[str, ...]  # the names of the documents whose outputs it merges


@dataclass(frozen=True)
class RecipeSet:
    """Every document of a recipe file, in the order they run (dependencies first, the final last)."""

    documents: tuple[NamedRecipe, ...]

    @property
    def final(self) -> NamedRecipe:
        return self.documents[-1]

    @property
    def intermediates(self) -> tuple[NamedRecipe, ...]:
        return self.documents[:-1]

    def resolved(self, document: NamedRecipe, paths: Mapping[str, str | Path]) -> MergeRecipe:
        """``document``'s recipe with the names of the intermediates it uses replaced by ``paths``."""
        return document.recipe.with_refs({name: str(paths[name]) for name in document.needs})


def load_recipe_set(path: str | Path) -> RecipeSet:
    """Reads a recipe file of one document or several, every document validated before any work."""
    return parse_documents(load_documents(path), source=path)


def merge_documents(
    recipes: RecipeSet,
    output: str | Path,
    *,
    options: MergeOptions | None = None,
    resolve_model: ModelResolver = Path,
    final_outputs: Callable[[MergePlan], Sequence[OutputSpec]] | None = None,
    keep_intermediates: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], ProgressSink] | None = None,
) -> MergeResult:
    """Runs every document in order; the final one is written to ``output``.

    Intermediates go to ``keep_intermediates/NAME`` when given, else to a temporary directory
    beside ``output`` (same file system: no copy), removed when the run ends, however it ends.
    ``final_outputs`` gives the final output's card and recipe files from its plan;
    ``progress`` makes a progress sink per document (given its name).
    """
    output = Path(output)
    # Every target is checked before the first merge: a run must not merge for hours and then find
    # that its output exists.
    check_output(output, overwrite=overwrite)
    if keep_intermediates is not None:
        for document in recipes.intermediates:
            check_output(Path(keep_intermediates) / str(document.name), overwrite=overwrite)
    if keep_intermediates is None and recipes.intermediates:
        output.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.intermediates-", dir=output.parent))
    else:
        scratch = None
    folder = Path(keep_intermediates) if keep_intermediates is not None else scratch
    paths: dict[str, Path] = {}

    def resolve(ref: str) -> Path:
        return paths[ref] if ref in paths else resolve_model(ref)

    try:
        for document in recipes.intermediates:
            assert document.name is not None and folder is not None
            target = folder / document.name
            with planned_merge(document.recipe, options, resolve_model=resolve) as plan:
                run_merge(plan, target, overwrite=overwrite,
                          progress=progress(document.name) if progress else None)
            paths[document.name] = target
        final = recipes.final
        with planned_merge(final.recipe, options, resolve_model=resolve) as plan:
            specs = final_outputs(plan) if final_outputs is not None else None
            return run_merge(plan, output, outputs=specs, overwrite=overwrite,
                             progress=progress(final.name or output.name) if progress else None)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def parse_documents(documents: list[Any], *, source: str | Path | None = None) -> RecipeSet:
    """Validates the documents of one recipe file and orders them by what they use."""
    problems: list[str] = []
    named: dict[str | None, NamedRecipe] = {}
    order: list[str | None] = []
    for index, data in enumerate(documents, 1):
        where = f"document {index}"
        name = data.get(NAME_KEY) if isinstance(data, Mapping) else None
        if name is not None and not isinstance(name, str):
            problems.append(f"{where}: name must be a string, not {short_text(repr(name))}")
            continue
        if name is not None and not _is_file_name(name):
            # The name is the intermediate's directory: it must stay inside the intermediates' one.
            problems.append(f"{where}: name {short_text(repr(name))} must be a plain directory name "
                            "(no '/', not '.' or '..', not empty)")
            continue
        if name in named:
            problems.append(f"{where}: the name {name!r} is given twice" if name is not None
                            else f"{where}: only one document may be unnamed (the final output)")
            continue
        body = {k: v for k, v in data.items() if k != NAME_KEY} if isinstance(data, Mapping) else data
        try:
            recipe = parse_recipe(body)
        except RecipeError as invalid:
            label = f"{where} ({name}): " if name else f"{where}: " if len(documents) > 1 else ""
            problems += [f"{label}{p}" for p in invalid.problems]
            continue
        named[name] = NamedRecipe(name, recipe, ())
        order.append(name)
    if problems:
        raise RecipeError(problems, source=source)
    names = {n for n in named if n is not None}
    named = {key: dataclasses.replace(doc, needs=tuple(r for r in doc.recipe.referenced_models() if r in names))
             for key, doc in named.items()}
    final = None if None in named else order[-1]
    unused = [n for n in names if n != final and not any(n in d.needs for d in named.values())]
    if unused:
        problems.append(f"named merges {sorted(unused)} are used by no other document; name them as models "
                        "or remove them")
    for doc in named.values():
        for ref in doc.recipe.referenced_models():
            if ref not in names and not Path(ref).exists() and not is_hub_id(ref):
                label = f"document {doc.name!r}" if doc.name else "the final document"
                problems.append(f"{label} names '{ref}', which is neither a named document, a model directory "
                                f"nor a Hub id (named: {', '.join(sorted(names)) or 'none'})")
    ordered = list(_dependency_order(named, final, problems))
    if problems:
        raise RecipeError(problems, source=source)
    return RecipeSet(tuple(named[key] for key in ordered))


def _is_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _dependency_order(
    named: Mapping[str | None, NamedRecipe], final: str | None, problems: list[str],
) -> Iterator[str | None]:
    """Every document the final one needs, each after what it needs (depth first, cycles reported)."""
    done: set[str | None] = set()
    path: list[str | None] = []

    def visit(key: str | None) -> Iterator[str | None]:
        if key in done:
            return
        if key in path:
            cycle = [str(k) for k in path[path.index(key):]] + [str(key)]
            problems.append(f"the named merges use each other in a cycle: {' -> '.join(cycle)}")
            return
        path.append(key)
        for need in named[key].needs:
            yield from visit(need)
        path.pop()
        done.add(key)
        yield key

    yield from visit(final)
