"""Model soups: the uniform soup, and the greedy soup of Wortsman et al. (2022).

Greedy: score every ingredient alone, sort best first, start the soup with the
best, then add each next ingredient only if the uniform soup with it scores
strictly better (by more than ``tolerance``) than the best so far. Each
candidate soup is written to a temporary directory and removed as soon as it
is scored, so the disk holds one candidate at a time, not one per ingredient.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_like.errors import EvaluationError, OutputWriteError, from_os_error
from mergekit_like.io.atomic import pid_alive
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.recipe import MergeRecipe, recipe_from_cli

Evaluator = Callable[[Path], float]


@dataclass
class SoupStep:
    """One line of the greedy soup's log."""

    ingredient: str
    alone: float
    soup_score: float | None  # the soup's score with this ingredient tried (None for the first)
    kept: bool


@dataclass
class GreedySoupResult:
    kept: list[str]
    score: float
    steps: list[SoupStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "kept": self.kept,
            "score": self.score,
            "steps": [vars(s) for s in self.steps],
        }


@dataclass(frozen=True)
class GreedyRule:
    """The greedy soup's rule, for ``soup --greedy`` and ``search --sampler greedy-soup`` alike."""

    lower_is_better: bool = False
    tolerance: float = 0.0

    def ranked(self, alone: Mapping[str, float]) -> list[str]:
        """The ingredients best first by their score alone (ties keep the given order)."""
        sign = -1.0 if self.lower_is_better else 1.0
        return sorted(alone, key=lambda m: -sign * alone[m])

    def improves(self, score: float, best: float) -> bool:
        """Whether a soup scoring ``score`` is kept over the best so far: better by more than the tolerance."""
        sign = -1.0 if self.lower_is_better else 1.0
        return sign * (score - best) > self.tolerance


SCRATCH_PREFIX = "greedy-soup-"


@contextlib.contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    """A directory for the candidate soups, named by this process; removed afterwards.

    A run killed while scoring cannot remove its candidate (a whole model), so each run
    first removes what dead runs left in ``parent``.
    """
    for stale in parent.glob(f"{SCRATCH_PREFIX}*"):
        pid = stale.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise from_os_error(
            exc, OutputWriteError, path=parent, doing="cannot create the greedy soup's scratch directory",
            fix=f"make {parent} writable for this user, or write the output elsewhere",
        ) from exc
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def uniform_soup_recipe(models: Sequence[str], compute_dtype: str | None = None) -> MergeRecipe:
    return recipe_from_cli("uniform_soup", list(models), compute_dtype=compute_dtype)


def command_evaluator(template: str, timeout: float | None = None) -> Evaluator:
    """An evaluator that runs ``template`` with ``{path}`` replaced and reads its last output line."""
    if "{path}" not in template:
        raise EvaluationError("the eval command must contain {path}, where the checkpoint directory goes")

    def evaluate(path: Path) -> float:
        command = template.replace("{path}", shlex.quote(str(path)))
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"eval command timed out after {timeout} s on {path}: {command}") from None
        output = done.stdout + done.stderr
        tail = output.strip().splitlines()[-5:]
        if done.returncode != 0:
            raise EvaluationError(
                f"eval command failed (exit {done.returncode}) on {path}: {command}; last output: "
                + " | ".join(tail), output=output,
            )
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        try:
            score = float(lines[-1].split()[-1])
        except (IndexError, ValueError):
            raise EvaluationError(
                f"eval command printed no number as its last line on {path}: {command}; last output: "
                + (" | ".join(tail) or "(nothing)"), output=output,
            ) from None
        if math.isnan(score):
            raise EvaluationError(f"eval command printed NaN on {path}: {command}", output=output)
        return score

    return evaluate


def greedy_soup(
    models: Sequence[str],
    evaluate: Evaluator,
    *,
    lower_is_better: bool = False,
    tolerance: float = 0.0,
    workdir: str | Path | None = None,
    compute_dtype: str | None = None,
    on_step: Callable[[SoupStep], None] | None = None,
    resolve_model: Callable[[str], Path] = Path,
    keep_soups: str | Path | None = None,
    options: MergeOptions | None = None,
) -> GreedySoupResult:
    """Chooses the ingredients of a greedy soup; returns them with every score seen.

    ``resolve_model`` turns an ingredient reference into a local directory (Hub ids).
    ``keep_soups``: a directory in which to keep every candidate soup (``soup-N``) for
    inspection; without it each candidate is deleted right after it is scored.
    ``options`` say how each candidate soup is merged (see :class:`MergeOptions`).
    """
    if len(set(models)) != len(models):
        raise EvaluationError("an ingredient is listed twice")
    rule = GreedyRule(lower_is_better, tolerance)
    alone = {m: evaluate(resolve_model(m)) for m in models}
    ranked = rule.ranked(alone)
    kept = [ranked[0]]
    best = alone[ranked[0]]
    steps = [SoupStep(ranked[0], best, None, True)]
    if on_step:
        on_step(steps[0])
    with _scratch(Path(workdir) if workdir is not None else Path(tempfile.gettempdir())) as scratch:
        for number, candidate in enumerate(ranked[1:], 1):
            soup_dir = Path(keep_soups or scratch) / f"soup-{number}"
            recipe = uniform_soup_recipe([*kept, candidate], compute_dtype)
            with planned_merge(recipe, options, resolve_model=resolve_model) as plan:
                run_merge(plan, soup_dir)
            score = evaluate(soup_dir)
            if keep_soups is None:
                shutil.rmtree(soup_dir)  # a soup is a whole model: never hold one per ingredient on disk
            better = rule.improves(score, best)
            if better:
                kept.append(candidate)
                best = score
            step = SoupStep(candidate, alone[candidate], score, better)
            steps.append(step)
            if on_step:
                on_step(step)
    return GreedySoupResult(kept, best, steps)
