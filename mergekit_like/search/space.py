"""A search space: a recipe in which some parameter values are ranges.

Anywhere a recipe takes a number (a model's weight, a global density, one point of a
layer gradient, a filter's value) it may instead hold a range::

    {search: uniform, low: 0, high: 1}
    {search: log_uniform, low: 1e-3, high: 1}
    {search: int, low: 1, high: 8}            # optional step
    {search: choice, values: [0.3, 0.5, 0.7]}

Each range is named by where it stands in the recipe (``models[1].parameters.weight``,
``parameters.density[2]``), the name Optuna, ``trials.jsonl`` and the plots use. A
candidate is the recipe with every range replaced by a value. Before any trial, the
recipe is checked with each range at its ends (and each choice's values), so a range on a
parameter the method lacks, or outside what the parameter accepts, is refused up front.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_like.errors import RecipeError, short_repr
from mergekit_like.merge.recipe import MergeRecipe, load_documents, parse_recipe

KINDS = ("uniform", "log_uniform", "int", "choice")
SEARCH_KEY = "search"


@dataclass(frozen=True)
class Range:
    """One searched value: its name (where it stands) and what it may take."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None  # int: the spacing of the values (1 by default)
    values: tuple[Any, ...] = ()  # choice

    def ends(self) -> tuple[Any, ...]:
        """The values whose acceptance proves every value acceptable: the ends, or every choice."""
        return self.values if self.kind == "choice" else (self.low, self.high)

    def grid(self, points: int) -> list[Any]:
        """``points`` values spread over the range (every choice; every int up to ``points`` of them)."""
        if self.kind == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            step = int(self.step or 1)
            every = list(range(int(self.low), int(self.high) + 1, step))
            return every if len(every) <= points else [every[round(i * (len(every) - 1) / (points - 1))]
                                                        for i in range(points)]
        if points == 1:
            return [(self.low + self.high) / 2]
        if self.kind == "log_uniform":
            ratio = math.log(self.high / self.low)
            return [self.low * math.exp(ratio * i / (points - 1)) for i in range(points)]
        return [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]


@dataclass(frozen=True)
class SearchSpace:
    """A recipe (as read from YAML) and the ranges in it."""

    template: Mapping[str, Any]
    ranges: tuple[Range, ...]
    source: str | None = None
    places: Mapping[str, str] = field(default_factory=dict)  # range name -> where it stands in the recipe

    def candidate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe with each range replaced by ``values[range.name]``."""
        missing = [r.name for r in self.ranges if r.name not in values]
        if missing:
            raise KeyError(f"no value for {', '.join(missing)}")
        return _substituted(self.template, {self.places.get(n, n): v for n, v in values.items()}, "")

    def recipe(self, values: Mapping[str, Any]) -> MergeRecipe:
        return parse_recipe(self.candidate(values), source=self.source)


def load_space(path: str | Path) -> SearchSpace:
    """Reads SPACE.yml: one recipe document with ranges; every problem is reported at once."""
    documents = load_documents(path)
    if len(documents) != 1:
        raise RecipeError([f"a search space is one recipe document, not {len(documents)}"], source=str(path))
    return space_from(documents[0], source=str(path))


def space_from(data: Any, *, source: str | None = None) -> SearchSpace:
    """The space of a recipe mapping; refuses bad ranges and ranges the recipe cannot take."""
    if not isinstance(data, Mapping):
        raise RecipeError(["a search space must be a recipe (a mapping)"], source=source)
    problems: list[str] = []
    nodes = list(_range_nodes(data, ""))
    names = _short_names(data, [where for where, _ in nodes])
    ranges = [r for r in (_range(names[where], node, problems) for where, node in nodes) if r is not None]
    if problems:
        raise RecipeError(problems, source=source)
    if not ranges:
        raise RecipeError(["nothing to search: no value is a range ({search: uniform, low: ..., high: ...})"],
                          source=source)
    places = {names[where]: where for where, _ in nodes}
    space = SearchSpace(data, tuple(ranges), source, places)
    _check_candidates(space)
    return space


def _range_nodes(node: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(node, Mapping):
        if SEARCH_KEY in node:
            yield where, node
            return
        for key, value in node.items():
            yield from _range_nodes(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _range_nodes(value, f"{where}[{index}]")


def _short_names(data: Mapping[str, Any], places: Sequence[str]) -> dict[str, str]:
    """Each place's name: a model's value by the model (``ft_a.weight``), others by where they stand.

    ``models[1].parameters.weight`` becomes ``<model's last path part>.weight`` (and a gradient point
    ``ft_a.weight[2]``) when no other range would take the same name.
    """
    listed = data.get("models")
    models: list[Any] = listed if isinstance(listed, list) else []
    short = {}
    for place in places:
        match = re.fullmatch(r"models\[(\d+)\]\.parameters\.(.+)", place)
        entry = models[int(match.group(1))] if match and int(match.group(1)) < len(models) else None
        model = entry.get("model") if isinstance(entry, Mapping) else None
        short[place] = f"{str(model).rstrip('/').rpartition('/')[2]}.{match.group(2)}" if match and isinstance(
            model, str) and model else place
    taken = Counter(short.values())
    return {place: name if taken[name] == 1 else place for place, name in short.items()}


def _range(name: str, node: Mapping[str, Any], problems: list[str]) -> Range | None:
    kind = node.get(SEARCH_KEY)
    allowed = {"choice": {"values"}, "int": {"low", "high", "step"}}.get(str(kind), {"low", "high"})
    extra = sorted(set(node) - allowed - {SEARCH_KEY})
    found = len(problems)
    if kind not in KINDS:
        problems.append(f"{name}: search must be one of {', '.join(KINDS)}, not {short_repr(kind)}")
        return None
    if extra:
        problems.append(f"{name}: a {kind} range takes {', '.join(sorted(allowed))}, not {', '.join(extra)}")
    if kind == "choice":
        values = node.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{name}: a choice needs values: a non-empty list")
            return None
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            problems.append(f"{name}: a choice's values must be numbers, strings, booleans or null (Optuna's "
                            f"categorical values), not {short_repr(values)}")
            return None
        return Range(name, kind, values=tuple(values)) if len(problems) == found else None
    low_value, high_value, step = node.get("low"), node.get("high"), node.get("step")
    if not isinstance(low_value, (int, float)) or not isinstance(high_value, (int, float)) or not (
            _is_number(low_value) and _is_number(high_value)):
        problems.append(f"{name}: low and high must be numbers, not {short_repr(low_value)} and "
                        f"{short_repr(high_value)}")
        return None
    low, high = float(low_value), float(high_value)
    if low > high:
        problems.append(f"{name}: low {low:g} is above high {high:g}")
    if kind == "log_uniform" and low <= 0:
        problems.append(f"{name}: a log_uniform range needs low > 0, not {low:g}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        problems.append(f"{name}: an int range needs whole low and high, not {low:g} and {high:g}")
    if step is not None and not (_is_number(step) and step >= 1 and float(step).is_integer()):
        problems.append(f"{name}: step must be a whole number >= 1, not {short_repr(step)}")
    if len(problems) != found:
        return None
    return Range(name, kind, low, high, None if step is None else float(step))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _substituted(node: Any, values: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, Mapping):
        if SEARCH_KEY in node:
            return values[where]
        return {k: _substituted(v, values, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_substituted(v, values, f"{where}[{i}]") for i, v in enumerate(node)]
    return copy.deepcopy(node)


def _check_candidates(space: SearchSpace) -> None:
    """Every end of every range, the others at their lows, must make a valid recipe."""
    problems: list[str] = []
    for (name, end), values in _end_points(space):
        try:
            space.recipe(values)
        except RecipeError as refused:
            problems += [f"{name} = {short_repr(end)}: {p}" for p in refused.problems]
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), source=space.source)


def _end_points(space: SearchSpace) -> Iterator[tuple[tuple[str, Any], dict[str, Any]]]:
    """((range, end), values) for every end of every range, the other ranges at their lows."""
    base = {r.name: _typed(r, r.ends()[0]) for r in space.ranges}
    for searched in space.ranges:
        for end in searched.ends():
            yield (searched.name, end), {**base, searched.name: _typed(searched, end)}


def referenced_models(space: SearchSpace) -> list[str]:
    """Every model a candidate of ``space`` may read (a range may choose among models)."""
    found: dict[str, None] = {}
    for _, values in _end_points(space):
        found.update(dict.fromkeys(space.recipe(values).referenced_models()))
    return list(found)


def _typed(searched: Range, value: Any) -> Any:
    return int(value) if searched.kind == "int" else value


def suggested(searched: Range, trial: Any) -> Any:
    """``trial``'s value for ``searched`` (an Optuna trial, or anything with its suggest_* methods)."""
    if searched.kind == "choice":
        return trial.suggest_categorical(searched.name, list(searched.values))
    assert searched.low is not None and searched.high is not None
    if searched.kind == "int":
        return trial.suggest_int(searched.name, int(searched.low), int(searched.high), step=int(searched.step or 1))
    return trial.suggest_float(searched.name, searched.low, searched.high, log=searched.kind == "log_uniform")


def grid_space(ranges: Sequence[Range], points: int) -> dict[str, list[Any]]:
    """Optuna's GridSampler search space: each range's grid."""
    return {r.name: r.grid(points) for r in ranges}
