"""One trial: merge a candidate recipe into a scratch directory, score it, remove it.

The same function runs in this process, in a worker thread, or as a Ray task on another
machine, so it takes plain data (the candidate recipe as a mapping) and returns plain data.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergekitLikeError
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe

Evaluator = Callable[[Path], float]


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial gave: a score, or why it has none (with the evaluator's output)."""

    score: float | None
    error: str | None
    seconds: float
    output: str | None = None  # all the evaluator printed, when it failed


def merge_and_score(candidate: Mapping[str, Any], evaluate: Evaluator, scratch: str | Path | None = None,
                    *, number: int = 0, options: MergeOptions | None = None) -> TrialOutcome:
    """Merges ``candidate`` under ``scratch`` (a fresh directory, removed afterwards) and scores it.

    A failure of the merge or of the evaluator is the trial's outcome, never an exception: the
    search goes on and records why.
    """
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"trial-{number}-", dir=scratch))
    try:
        with planned_merge(parse_recipe(candidate), options or MergeOptions()) as plan:
            run_merge(plan, root / "model")
        score = evaluate(root / "model")
        return TrialOutcome(float(score), None, time.perf_counter() - started)
    except MergekitLikeError as failed:
        return TrialOutcome(None, str(failed), time.perf_counter() - started, getattr(failed, "output", None))
    except Exception as failed:  # an evaluator written in Python may raise anything: the trial failed
        return TrialOutcome(None, "".join(traceback.format_exception_only(failed)).strip(),
                            time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
