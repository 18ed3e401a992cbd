"""The greedy soup as a search strategy: which ingredients to keep, through the search's trials.

The space is a recipe whose ingredients each have a two-valued choice, one value 0 (left
out) and the other its weight when in, typically::

    merge_method: linear
    models:
      - model: run1
        parameters: {weight: {search: choice, values: [0, 1]}}
      ...

The strategy proposes the points of Wortsman et al.'s greedy soup (each ingredient alone,
then, best first, the soup with the next one added) and keeps an ingredient by the same
rule as ``soup --greedy`` (:class:`~mergekit_like.soup.GreedyRule`). The trials run like any
search's (threads, Ray, ``trials.jsonl``, resume): each ingredient alone is scored in
parallel; the additions depend on each other and run one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mergekit_like.errors import RecipeError
from mergekit_like.search.space import Range
from mergekit_like.soup import GreedyRule

# Runs the points (value per range) as trials, or finds them run already; their scores.
RunPoints = Callable[[list[dict[str, Any]]], list[float | None]]


def ingredient_weights(ranges: Sequence[Range]) -> dict[str, tuple[Any, Any]]:
    """Each range's (left out, kept) values; refuses a range that is not a choice of 0 or a weight."""
    found, problems = {}, []
    for searched in ranges:
        zeros = [v for v in searched.values if _is_number(v) and v == 0]
        others = [v for v in searched.values if not (_is_number(v) and v == 0)]
        if searched.kind != "choice" or len(searched.values) != 2 or len(zeros) != 1 or not _is_number(others[0]):
            problems.append(f"{searched.name}: the greedy soup needs every range to be a choice of 0 (left out) and "
                            "the ingredient's weight, such as {search: choice, values: [0, 1]}")
            continue
        found[searched.name] = (zeros[0], others[0])
    if problems:
        raise RecipeError(problems)
    return found


def run_greedy_soup(weights: Mapping[str, tuple[Any, Any]], run: RunPoints, rule: GreedyRule) -> list[str]:
    """The greedy soup's trials, through ``run``; returns the ingredients kept (range names)."""
    names = list(weights)

    def point(kept: set[str]) -> dict[str, Any]:
        return {name: weights[name][1] if name in kept else weights[name][0] for name in names}

    alone = {name: score for name, score in zip(names, run([point({name}) for name in names])) if score is not None}
    if not alone:
        return []
    ranked = rule.ranked(alone)
    kept, best = [ranked[0]], alone[ranked[0]]
    for name in ranked[1:]:
        (score,) = run([point({*kept, name})])
        if score is not None and rule.improves(score, best):
            kept.append(name)
            best = score
    return kept


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
