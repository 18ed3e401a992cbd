"""Running a merge search: Optuna chooses each trial's values, an executor runs the trials.

The study lives in Optuna storage (SQLite in the output directory unless told otherwise),
so a search that is killed resumes with every finished trial kept: trials the killed run
left unfinished are marked failed and asked again with the same values. Trials run one
after another in this process, several at once in threads (``workers``), or as Ray tasks
on a cluster (``ray_address``); the loop that asks Optuna and tells it the scores is the
same for all three (Optuna's ask-and-tell interface). With ``batch``, each task takes that
many trials at once and merges their candidates in one read pass.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_like.errors import OptionsError, SearchError
from mergekit_like.merge.engine import MergeOptions
from mergekit_like.search.executors import Executor, make_executor
from mergekit_like.search.greedy import ingredient_weights, run_greedy_soup
from mergekit_like.search.space import SearchSpace, grid_space, suggested
from mergekit_like.search.trial import Evaluator, TrialOutcome, merge_and_score
from mergekit_like.soup import GreedyRule

logger = logging.getLogger(__name__)

GREEDY_SOUP = "greedy-soup"
SAMPLERS = ("tpe", "cmaes", "random", "grid", GREEDY_SOUP)
DIRECTIONS = ("maximize", "minimize")
STUDY_FILE = "study.db"
TRIALS_FILE = "trials.jsonl"
TRIAL_LOGS = "trials"
STUDY_NAME = "merge-search"
# With no trial scored yet, this many failures stop the search: the evaluator, or the space, is broken.
FAILURES_BEFORE_GIVING_UP = 3
# Candidates in one read pass: each holds one output tensor in memory while the batch merges.
MAX_BATCH = 64
# How long the loop waits for a trial before it looks again (so Ctrl-C is never held up).
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class SearchSettings:
    """How to search; every problem is reported at once on construction."""

    trials: int = 20
    sampler: str = "tpe"
    direction: str = "maximize"
    seed: int = 0
    workers: int = 1  # trials at once on this machine
    ray_address: str | None = None  # "auto" or HOST:PORT: trials as Ray tasks
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: one GPU each on a cluster that has GPUs, else none
    batch: int = 1  # candidates merged together in one read pass (then scored one by one)
    grid_points: int = 5  # grid sampler: values per continuous range
    storage: str | None = None  # an Optuna RDB URL; None: SQLite in the output directory

    def __post_init__(self) -> None:
        problems = []
        if self.trials < 1:
            problems.append(f"--trials must be at least 1, not {self.trials}")
        if self.sampler not in SAMPLERS:
            problems.append(f"--sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.direction not in DIRECTIONS:
            problems.append(f"--direction must be maximize or minimize, not {self.direction!r}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, not {self.workers}")
        if self.ray_address is not None and self.workers != 1:
            problems.append("--workers runs trials on this machine and --ray-address on a cluster: give one")
        if self.cpus_per_trial <= 0 or (self.gpus_per_trial is not None and self.gpus_per_trial < 0):
            problems.append("--cpus-per-trial must be positive and --gpus-per-trial at least 0")
        if not 1 <= self.batch <= MAX_BATCH:
            problems.append(f"--batch must be from 1 to {MAX_BATCH}, not {self.batch}")
        if self.grid_points < 2:
            problems.append(f"--grid-points must be at least 2, not {self.grid_points}")
        if problems:
            raise OptionsError(problems)


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial, as ``trials.jsonl`` holds it."""

    number: int
    values: dict[str, Any]
    score: float | None
    error: str | None
    seconds: float
    best: float | None  # the best score after this trial

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class SearchResult:
    """The finished search: every trial (resumed ones too) and the best."""

    records: list[TrialRecord] = field(default_factory=list)
    best_values: dict[str, Any] | None = None
    best_score: float | None = None
    best_number: int | None = None


def run_search(
    space: SearchSpace,
    evaluate: Evaluator,
    output: str | Path,
    settings: SearchSettings,
    *,
    resume: bool = False,
    options: MergeOptions | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> SearchResult:
    """Runs ``settings.trials`` trials in all (those of a resumed study count) and returns them with the best."""
    optuna = _optuna()
    weights = ingredient_weights(space.ranges) if settings.sampler == GREEDY_SOUP else None
    out = Path(output)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    study = _study(optuna, space, out, settings, resume)
    records = _previous_records(out) if resume else []
    # The greedy soup asks for the points it still needs itself: a cut-short trial is not asked again.
    cut_short = _requeue_unfinished(optuna, study, ask_again=weights is None)
    if weights is not None:
        _drop_waiting(optuna, study)
    with make_executor(settings) as executor:
        def run_trials(budget: int) -> None:
            _loop(optuna, study, space, evaluate, executor, budget, out, records, options, on_trial, settings)

        if weights is not None:
            rule = GreedyRule(lower_is_better=settings.direction == "minimize")
            run_greedy_soup(weights, lambda points: _scores_of(points, study, records, run_trials), rule)
        else:
            finished = sum(1 for t in study.trials if t.state.is_finished()) - cut_short
            run_trials(_trial_budget(space, settings) - finished)
    result = SearchResult(records)
    scored = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if scored:
        best = study.best_trial
        result.best_values, result.best_score, result.best_number = dict(best.params), best.value, best.number
    return result


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search prints its own table
    return optuna


def _study(optuna: Any, space: SearchSpace, out: Path, settings: SearchSettings, resume: bool) -> Any:
    storage = settings.storage or f"sqlite:///{(out / STUDY_FILE).absolute()}"
    names = [r.name for r in space.ranges]
    if resume:
        if settings.storage is None and not (out / STUDY_FILE).is_file():
            raise SearchError(f"--resume: {out} holds no {STUDY_FILE}; start the search without --resume")
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=_sampler(optuna, space,
                                                                                              settings))
        except KeyError:
            raise SearchError(f"--resume: the storage {storage} holds no study {STUDY_NAME!r}") from None
        if study.user_attrs.get("ranges") != names or study.direction.name.lower() != settings.direction:
            raise SearchError(f"--resume: the study in {storage} searched {study.user_attrs.get('ranges')} "
                              f"({study.direction.name.lower()}), not {names} ({settings.direction}): resume "
                              "it with the same space and direction")
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=settings.direction,
                                sampler=_sampler(optuna, space, settings), load_if_exists=False)
    study.set_user_attr("ranges", names)
    if settings.sampler == "grid":
        _enqueue_grid(study, space, settings)
    return study


def _sampler(optuna: Any, space: SearchSpace, settings: SearchSettings) -> Any:
    samplers = optuna.samplers
    if settings.sampler == "tpe":
        return samplers.TPESampler(seed=settings.seed)
    if settings.sampler == "cmaes":
        # CMA-ES samples continuous values together; choices go to an independent sampler (Optuna warns).
        return samplers.CmaEsSampler(seed=settings.seed, warn_independent_sampling=False)
    if settings.sampler == "random":
        return samplers.RandomSampler(seed=settings.seed)
    # The grid: every point is enqueued when the study is made (see _enqueue_grid); Optuna's GridSampler
    # stops the study from inside tell(), which only its own optimize loop allows. The greedy soup
    # enqueues each point it needs (see mergekit_like.search.greedy).
    return samplers.RandomSampler(seed=settings.seed)


def _enqueue_grid(study: Any, space: SearchSpace, settings: SearchSettings) -> None:
    """Every point of the grid, in a seeded random order, as trials to ask first."""
    grid = grid_space(space.ranges, settings.grid_points)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(settings.seed).shuffle(points)
    for point in points[:settings.trials]:
        study.enqueue_trial(point)


def _trial_budget(space: SearchSpace, settings: SearchSettings) -> int:
    """The trials to run in all: the grid has as many points as it has, however many were asked for."""
    if settings.sampler != "grid":
        return settings.trials
    size = 1
    for values in grid_space(space.ranges, settings.grid_points).values():
        size *= len(values)
    return min(settings.trials, size)


def _requeue_unfinished(optuna: Any, study: Any, *, ask_again: bool = True) -> int:
    """Trials a killed run left running are marked failed and (``ask_again``) asked again with the same values.

    Returns how many: they do not count against the trial budget (their new runs do).
    """
    unfinished = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for trial in unfinished:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if ask_again:
            study.enqueue_trial(dict(trial.params), skip_if_exists=False)
    return len(unfinished)


def _drop_waiting(optuna: Any, study: Any) -> None:
    """Trials a killed run enqueued and never started are dropped (told failed): the greedy soup
    enqueues what it still needs itself, and a leftover would be asked in place of its next point."""
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    for _ in waiting:
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)


def _scores_of(points: list[dict[str, Any]], study: Any, records: list[TrialRecord],
               run_trials: Callable[[int], None]) -> list[float | None]:
    """The scores of ``points``: those not scored before (a resumed search's) run now, as enqueued trials.

    A point that failed in a killed run is run again (it may have failed for the kill's sake).
    """
    missing = [p for p in points if (seen := _record_of(p, records)) is None or seen.score is None]
    for point in missing:
        study.enqueue_trial(point, skip_if_exists=False)
    if missing:
        run_trials(len(missing))
    found = [_record_of(p, records) for p in points]
    return [r.score if r is not None else None for r in found]


def _record_of(point: dict[str, Any], records: list[TrialRecord]) -> TrialRecord | None:
    return next((r for r in reversed(records) if r.values == point), None)


def _loop(optuna: Any, study: Any, space: SearchSpace, evaluate: Evaluator, executor: Executor, budget: int,
          out: Path, records: list[TrialRecord], options: MergeOptions | None,
          on_trial: Callable[[TrialRecord], None] | None, settings: SearchSettings) -> None:
    pending: dict[Future[list[TrialOutcome]], list[tuple[int, dict[str, Any]]]] = {}
    launched = 0
    while launched < budget or pending:
        while launched < budget and len(pending) < executor.concurrency:
            batch = []
            for _ in range(min(settings.batch, budget - launched)):
                trial = study.ask()
                batch.append((trial.number, {r.name: suggested(r, trial) for r in space.ranges}))
            future = executor.submit(merge_and_score, [space.candidate(values) for _, values in batch], evaluate,
                                     numbers=[number for number, _ in batch], options=options)
            pending[future] = batch
            launched += len(batch)
        # The oldest trial is told first, and the free slot refilled before the next is told: the
        # asks and tells then come in one order whatever order the workers finish in, so a seeded
        # search is repeatable on threads or a cluster. A slow trial keeps the ones after it untold
        # (their workers idle) for as long as it is slower than they are.
        oldest = next(iter(pending))
        done, _ = wait([oldest], timeout=POLL_SECONDS)
        if not done:
            continue
        batch = pending.pop(oldest)
        for (number, values), outcome in zip(batch, _outcomes(oldest, len(batch))):
            best = records[-1].best if records else None
            record = _tell(optuna, study, number, values, outcome, out, best)
            records.append(record)
            _append_record(out, record)
            if on_trial is not None:
                on_trial(record)
        _give_up_if_nothing_scores(records, settings)


def _outcomes(future: Future[list[TrialOutcome]], count: int) -> list[TrialOutcome]:
    try:
        return future.result()
    except Exception as lost:  # a Ray worker that died, a task that could not be sent: its trials failed
        return [TrialOutcome(None, f"the trial did not come back: {type(lost).__name__}: {lost}", 0.0)] * count


def _tell(optuna: Any, study: Any, number: int, values: dict[str, Any], outcome: TrialOutcome,
          out: Path, best: float | None) -> TrialRecord:
    """Tells the study; the record's best is ``best`` (the previous record's) with this score taken in."""
    if outcome.score is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        _save_failure(out, number, outcome)
    else:
        study.tell(number, outcome.score)
        better = max if study.direction.name.lower() == "maximize" else min
        best = outcome.score if best is None else better(best, outcome.score)
    return TrialRecord(number, values, outcome.score, outcome.error, round(outcome.seconds, 3), best)


def _save_failure(out: Path, number: int, outcome: TrialOutcome) -> None:
    logs = out / TRIAL_LOGS
    logs.mkdir(exist_ok=True)
    text = f"{outcome.error}\n\n{outcome.output or ''}"
    (logs / f"trial_{number}.log").write_text(text, encoding="utf-8")


def _append_record(out: Path, record: TrialRecord) -> None:
    with open(out / TRIALS_FILE, "a", encoding="utf-8") as file:
        file.write(record.to_json() + "\n")
        file.flush()
        os.fsync(file.fileno())


def _previous_records(out: Path) -> list[TrialRecord]:
    path = out / TRIALS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(TrialRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a line cut short by the kill: its trial is asked again
    return records


def _give_up_if_nothing_scores(records: list[TrialRecord], settings: SearchSettings) -> None:
    failures = [r for r in records if r.score is None]
    if any(r.score is not None for r in records) or len(failures) < min(FAILURES_BEFORE_GIVING_UP, settings.trials):
        return
    raise SearchError(f"the first {len(failures)} trials all failed; the first: {failures[0].error} "
                      f"(each one's output is in {TRIAL_LOGS}/)")

