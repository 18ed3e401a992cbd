"""Planning `mergekit-like average`: the checkpoints, the outputs and their settings, checked up front.

:func:`plan_average` checks every setting of the method at once, finds the
checkpoints (a run directory, or checkpoints listed in training order; for SFA the
anchor and the model) and decides each output, before any tensor is read;
:func:`~mergekit_like.averaging.offline.run_average` then writes them.
:func:`list_average` does the same for a listing, where missing or wrong settings
leave the outputs unshown instead of failing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.averaging.ema import EMA
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.averaging.offline import (
    AverageOutput,
    ema_outputs,
    lawa_outputs,
    phema_outputs,
    power_ema_outputs,
    sfa_outputs,
    swa_outputs,
)
from mergekit_like.averaging.posthoc import WARN_ERROR, find_snapshots
from mergekit_like.averaging.power_ema import PowerEMA
from mergekit_like.averaging.sfa import AnchorPull
from mergekit_like.averaging.swa import SWA
from mergekit_like.averaging.trajectory import TrajectoryPoint, checkpoints_in, from_paths
from mergekit_like.errors import RecipeError
from mergekit_like.io.layout import resolve
from mergekit_like.io.sidefiles import has_config

# Turns what the user typed (a path, or a Hub id) into a local path.
ModelResolver = Callable[[str], Path]

# The options each method reads, by the names of AverageSettings.options().
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "ema": ("decay", "half_life", "per_checkpoint", "warmup", "inv_gamma", "power", "min_decay", "start"),
    "power_ema": ("sigma_rel",),
    "phema": ("sigma_rel",),
    "swa": ("start", "end"),
    "lawa": ("k", "nu", "every_step", "start"),
    "sfa": ("beta",),
}
# Options that only mean something beside another: the warm-up's shape without a warm-up is not shown.
WARMUP_OPTIONS = ("inv_gamma", "power", "min_decay")


@dataclass(frozen=True)
class AverageSettings:
    """One averaging method and its options; the options of other methods are ignored."""

    method: str
    decays: tuple[float, ...] = ()  # EMA: one output per decay, and one per half-life (in steps)
    half_lives: tuple[float, ...] = ()
    per_checkpoint: bool = False  # EMA: every checkpoint counts as one step, whatever the gap
    warmup: str | None = None  # EMA: "inv_gamma", the decay's warm-up (with inv_gamma, power, min_decay)
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0
    sigma_rels: tuple[float, ...] = ()  # power_ema and phema: one output per relative width
    start: int | None = None  # SWA's window; EMA's and LAWA's first step; None leaves that end open
    end: int | None = None
    k: int = 5  # LAWA: how many checkpoints; the command's default
    nu: int = 0  # LAWA: the least steps between them; 0 takes the last k however close
    every_step: bool = False  # LAWA: one output at every checkpoint, the curve over training
    beta: float = 0.5  # SFA's pull toward the anchor; no published default was found

    def problems(self) -> list[str]:
        """Every problem of these settings (none: they can be run)."""
        checks: dict[str, Callable[[], list[str]]] = {
            "ema": self._ema_problems, "swa": self._swa_problems, "lawa": self._lawa_problems,
            "sfa": self._sfa_problems, "power_ema": self._power_problems, "phema": self._power_problems,
        }
        if self.method not in checks:
            return [f"unknown averaging method {self.method!r} (known: {', '.join(METHOD_OPTIONS)})"]
        return checks[self.method]()

    # Each average's rules live in its class: a setting is checked by making the average,
    # so the command, the hook and resume refuse exactly the same values.
    def _ema_problems(self) -> list[str]:
        problems = [] if self.decays or self.half_lives else ["ema needs --decay or --half-life"]
        for decay in self.decays:
            problems += _refusal(functools.partial(EMA, decay, **self._warmup()))
        for half_life in self.half_lives:
            problems += _refusal(functools.partial(EMA, half_life=half_life, **self._warmup()))
        return list(dict.fromkeys(problems))

    def _warmup(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "inv_gamma": self.inv_gamma, "power": self.power, "min_decay": self.min_decay}

    def _power_problems(self) -> list[str]:
        problems = [] if self.sigma_rels else [f"{self.method} needs --sigma-rel"]
        for sigma_rel in self.sigma_rels:
            problems += _refusal(functools.partial(PowerEMA, sigma_rel))
        return problems

    def _swa_problems(self) -> list[str]:
        return _refusal(lambda: SWA(self.start, self.end))

    def _lawa_problems(self) -> list[str]:
        return _refusal(lambda: LAWA(self.k, self.nu, start_step=self.start))

    def _sfa_problems(self) -> list[str]:
        return _refusal(lambda: AnchorPull(self.beta))

    def options(self) -> dict[str, Any]:
        """The options the method reads, those not given left out: for the model card and the command line."""
        values: dict[str, Any] = {
            "decay": _number_list(self.decays), "half_life": _number_list(self.half_lives),
            "per_checkpoint": self.per_checkpoint, "start": self.start, "end": self.end, "k": self.k,
            "nu": self.nu, "every_step": self.every_step, "beta": self.beta, "warmup": self.warmup,
            "inv_gamma": self.inv_gamma, "power": self.power, "min_decay": self.min_decay,
            "sigma_rel": _number_list(self.sigma_rels),
        }
        shown = [k for k in METHOD_OPTIONS[self.method] if self.warmup is not None or k not in WARMUP_OPTIONS]
        return {key: values[key] for key in shown if values[key] is not None}

    def outputs(self, points: Sequence[TrajectoryPoint]) -> list[AverageOutput]:
        """The outputs over ``points``; :class:`RecipeError` when SWA's window holds none of them."""
        if self.method == "ema":
            return ema_outputs(points, self.decays, self.half_lives, self.per_checkpoint, start=self.start,
                               **self._warmup())
        if self.method == "power_ema":
            return power_ema_outputs(points, self.sigma_rels)
        if self.method == "phema":
            return phema_outputs(points, self.sigma_rels)
        if self.method == "swa":
            return swa_outputs(points, self.start, self.end)
        if self.method == "lawa":
            return lawa_outputs(points, self.k, self.nu, self.every_step, start=self.start)
        return sfa_outputs(self.beta)


def _refusal(make: Callable[[], object]) -> list[str]:
    """What the average's own constructor says against a setting, as a problem (or none)."""
    try:
        make()
    except ValueError as refused:
        return [str(refused)]
    return []


def _number_list(values: Sequence[float]) -> str | None:
    """'0.99,0.999' as it would be typed: the shortest text that reads back as each value."""
    if not values:
        return None
    return ",".join(f"{v:g}" if float(f"{v:g}") == v else repr(v) for v in values)


@dataclass(frozen=True)
class AveragePlan:
    """What `average` writes: from which checkpoints, which outputs, and whether a config goes beside them."""

    settings: AverageSettings
    points: tuple[TrajectoryPoint, ...]
    outputs: tuple[AverageOutput, ...]
    # Whether the newest checkpoint's directory, whose side files every output gets, holds a config.json.
    has_config: bool
    warnings: tuple[str, ...] = ()  # what discovery left out, for the caller to show


@dataclass(frozen=True)
class AverageListing:
    """The checkpoints found, and the outputs they would give (or why those cannot be shown)."""

    points: tuple[TrajectoryPoint, ...]
    outputs: tuple[AverageOutput, ...]
    unshown: str | None
    warnings: tuple[str, ...] = ()


def plan_average(
    paths: Sequence[str], settings: AverageSettings, *, anchor: str | None = None,
    resolve_model: ModelResolver = Path, allow_pickle: bool = False,
) -> AveragePlan:
    """Checks ``settings`` and finds the checkpoints of ``paths`` (and SFA's ``anchor``); reads no tensor.

    Raises :class:`RecipeError` listing every problem of the settings before any path is
    resolved (a Hub id is fetched only for a run that can go ahead).
    """
    problems = settings.problems()
    if settings.method in METHOD_OPTIONS:
        problems += _input_problems(settings.method, paths, anchor, listing=False)
    if problems:
        raise RecipeError(problems)
    points, warnings = _trajectory(paths, settings.method, anchor, resolve_model)
    outputs = settings.outputs(points)
    warnings += reconstruction_warnings(outputs)
    source = resolve(points[-1].path, allow_pickle=allow_pickle).root
    return AveragePlan(settings, tuple(points), tuple(outputs), has_config(source), tuple(warnings))


def list_average(
    paths: Sequence[str], settings: AverageSettings, *, anchor: str | None = None,
    resolve_model: ModelResolver = Path,
) -> AverageListing:
    """The checkpoints of ``paths`` in order, and the outputs when the settings allow them."""
    if settings.method not in METHOD_OPTIONS:
        raise RecipeError(settings.problems())
    problems = _input_problems(settings.method, paths, anchor, listing=True)
    if problems:
        raise RecipeError(problems)
    points, warnings = _trajectory(paths, settings.method, anchor, resolve_model)
    if settings.method == "sfa" and anchor is None:
        return AverageListing(tuple(points), (), "sfa needs --anchor", tuple(warnings))
    try:
        problems = settings.problems()
        if problems:
            raise RecipeError(problems)
        outputs = settings.outputs(points)
    except RecipeError as exc:
        return AverageListing(tuple(points), (), str(exc), tuple(warnings))
    return AverageListing(tuple(points), tuple(outputs), None, tuple(warnings))


def _input_problems(method: str, paths: Sequence[str], anchor: str | None, *, listing: bool) -> list[str]:
    """What is wrong with the inputs given; a listing of SFA may leave out the anchor."""
    if not paths:
        return ["give a run directory, or the checkpoints in training order"]
    if method != "sfa":
        return []
    if anchor is None:
        return [] if listing else ["sfa needs --anchor: the checkpoint at the start of the task"]
    if len(paths) > 1:
        return [f"sfa averages one model with its anchor, but {len(paths)} were given "
                f"({', '.join(paths[:3])}); give the one model to pull toward --anchor"]
    return []


def _trajectory(paths: Sequence[str], method: str, anchor: str | None, resolve_model: ModelResolver
                ) -> tuple[list[TrajectoryPoint], list[str]]:
    """The checkpoints to average (for SFA with an anchor, [anchor, model]) and the warnings of discovery."""
    if method == "phema":
        return _stored_snapshots(paths, resolve_model), []
    found, warnings = _found(paths, resolve_model)
    if method != "sfa" or anchor is None:
        return found, warnings
    # A run directory stands for its newest checkpoint: the model at the end of the task.
    return [TrajectoryPoint(0, resolve_model(anchor)), TrajectoryPoint(1, found[-1].path)], warnings


def _found(paths: Sequence[str], resolve_model: ModelResolver) -> tuple[list[TrajectoryPoint], list[str]]:
    local = [resolve_model(p) for p in paths]
    if len(local) != 1 or not local[0].is_dir():
        return from_paths(local), []
    points, ignored = checkpoints_in(local[0])
    if not ignored:
        return points, []
    names = ", ".join(p.name for p in ignored[:3]) + (", ..." if len(ignored) > 3 else "")
    return points, [f"{local[0]}: ignoring the weights at its root ({names}); averaging its {len(points)} "
                    f"step-named checkpoints (list checkpoints explicitly to choose)"]


def _stored_snapshots(paths: Sequence[str], resolve_model: ModelResolver) -> list[TrajectoryPoint]:
    """The post-hoc EMA snapshots stored under the directories given, oldest first."""
    found = [s for p in paths for s in find_snapshots(resolve_model(p))]
    if not found:
        raise RecipeError([f"no stored post-hoc EMA snapshots under {', '.join(paths)} (the hook's PostHocEMA writes "
                           "them under OUT_DIR/<label>/snapshots/)"])
    return [TrajectoryPoint(s.step, s.path) for s in sorted(found, key=lambda s: (s.step, s.gamma))]


def reconstruction_warnings(outputs: Sequence[AverageOutput]) -> list[str]:
    """Post-hoc EMA lengths the stored profiles cannot reach well, with their errors."""
    return [f"{o.label}: the stored snapshots reconstruct this length with a relative profile error of "
            f"{o.reconstruction.error:.1%} (above {WARN_ERROR:.0%}); store profiles nearer it, or snapshot more often"
            for o in outputs if o.reconstruction is not None and o.reconstruction.error > WARN_ERROR]
