"""Trials: merge candidate recipes into a scratch directory, score each, remove them.

The same function runs in this process, in a worker thread, or as a Ray task on another
machine, so it takes plain data (the candidate recipes as mappings) and returns plain data.
Several candidates given at once are merged in one read pass (see
:mod:`mergekit_like.merge.batch`) and scored one after another.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergekitLikeError
from mergekit_like.merge.batch import batched_plan
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe

Evaluator = Callable[[Path], float]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial gave: a score, or why it has none (with the evaluator's output)."""

    score: float | None
    error: str | None
    seconds: float  # its share of the merge (a batch's pass split evenly) and its evaluation
    output: str | None = None  # all the evaluator printed, when it failed


def merge_and_score(candidates: Sequence[Mapping[str, Any]], evaluate: Evaluator, scratch: str | Path | None = None,
                    *, numbers: Sequence[int] = (), options: MergeOptions | None = None) -> list[TrialOutcome]:
    """Merges ``candidates`` under ``scratch`` (a fresh directory, removed afterwards) and scores each.

    ``numbers`` name the trials (their directories); several candidates share one read pass.
    A failure of the merge or of the evaluator is the trial's outcome, never an exception: the
    search goes on and records why. Each candidate is removed as soon as it is scored.
    """
    numbers = list(numbers) or list(range(len(candidates)))
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"trial-{numbers[0]}-", dir=scratch))
    try:
        try:
            paths = _merge_together(candidates, [f"trial_{n}" for n in numbers], root, options or MergeOptions())
        except Exception as failed:
            if len(candidates) > 1:
                # One candidate that cannot merge, or candidates that cannot share a pass, must not fail
                # the others: each is merged alone (its own failure is then its own).
                logger.warning("a batch of %d candidates could not merge together (%s); merging each alone",
                               len(candidates), failed)
                return [outcome for candidate, number in zip(candidates, numbers)
                        for outcome in merge_and_score([candidate], evaluate, scratch, numbers=[number],
                                                       options=options)]
            return [_failed(failed, time.perf_counter() - started)]
        share = (time.perf_counter() - started) / len(candidates)
        return [_scored(path, evaluate, share) for path in paths]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _merge_together(candidates: Sequence[Mapping[str, Any]], labels: list[str], root: Path,
                    options: MergeOptions) -> list[Path]:
    """Every candidate merged in one pass; the directories, in the candidates' order."""
    with ExitStack() as stack:
        plans = [stack.enter_context(planned_merge(parse_recipe(c), options)) for c in candidates]
        if len(plans) == 1:
            run_merge(plans[0], root / labels[0])
            return [root / labels[0]]
        run_merge(batched_plan(plans, labels), root / "batch")
        return [root / "batch" / label for label in labels]


def _scored(path: Path, evaluate: Evaluator, merge_seconds: float) -> TrialOutcome:
    started = time.perf_counter()
    try:
        score = evaluate(path)
        return TrialOutcome(float(score), None, merge_seconds + time.perf_counter() - started)
    except Exception as failed:
        return _failed(failed, merge_seconds + time.perf_counter() - started)
    finally:
        shutil.rmtree(path, ignore_errors=True)  # a candidate is a whole model: never keep one scored


def _failed(failed: Exception, seconds: float) -> TrialOutcome:
    if isinstance(failed, MergekitLikeError):
        return TrialOutcome(None, str(failed), seconds, getattr(failed, "output", None))
    # An evaluator written in Python may raise anything: the trial failed.
    return TrialOutcome(None, "".join(traceback.format_exception_only(failed)).strip(), seconds)
