"""Finding the checkpoints of a training run and the step each was taken at.

Recognised: ``checkpoint-1000/`` (Hugging Face Trainer), ``step_1000/``,
``step-1000/``, ``iter_0001000/`` (Megatron), ``global_step1000/``, and
``*.safetensors`` files whose name ends in a number (``ema_1000.safetensors``).
A directory's step comes from its name, or else from its ``trainer_state.json``
(``global_step``); if both exist they must agree. Duplicate or unreadable steps
are errors that name the paths. Weight files at the run directory's root without
a step in their name (a Trainer's final ``model.safetensors``, or its shards) are
the directory's own checkpoint, not a point of the trajectory: see
:func:`root_weights`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergekit_like.errors import CheckpointNotFoundError, InvalidCheckpointError

_DIR_STEP = re.compile(r"^(?:checkpoint|step|iter|global_step|ckpt)[_-]?(\d+)$")
_FILE_STEP = re.compile(r"(\d+)$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
# Other files that make the run directory itself a checkpoint; training_args.bin (a pickle of the
# Trainer's arguments, at the root of every Trainer run) is not one of them.
_ROOT_CHECKPOINT = re.compile(r"^(?:.*\.safetensors\.index\.json|pytorch_model.*\.bin(?:\.index\.json)?)$")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrajectoryPoint:
    """One checkpoint of a run and the training step it was taken at."""

    step: int
    path: Path


def _holds_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("*.safetensors.index.json"))


def _trainer_step(directory: Path) -> int | None:
    state_file = directory / TRAINER_STATE
    if not state_file.is_file():
        return None
    try:
        step = json.loads(state_file.read_text(encoding="utf-8")).get("global_step")
    except (ValueError, AttributeError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's digit limit;
        # RecursionError: json nests one Python frame per bracket, so a corrupt '[[[[...' exhausts the stack.
        raise InvalidCheckpointError(
            "is not a JSON object", path=state_file, fix="fix or remove it, or list the checkpoints explicitly"
        ) from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise InvalidCheckpointError(
            f"global_step {step!r} is not a step number", path=state_file,
            fix="fix it, or list the checkpoints explicitly",
        )
    return step


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory or file was taken at, if it says."""
    if path.is_dir():
        match = _DIR_STEP.match(path.name)
        named = int(match.group(1)) if match else None
        recorded = _trainer_step(path)
        if named is not None and recorded is not None and named != recorded:
            raise InvalidCheckpointError(
                f"the name says step {named} but {TRAINER_STATE} says {recorded}", path=path,
                fix="rename the directory, or list the checkpoints explicitly",
            )
        return named if named is not None else recorded
    stem = path.name.removesuffix(".safetensors")
    if _SHARD.search(stem):
        return None
    match = _FILE_STEP.search(stem)
    return int(match.group(1)) if match else None


def discover(run_dir: str | Path, *, skip_unnumbered: bool = False) -> list[TrajectoryPoint]:
    """The checkpoints inside ``run_dir``, ordered by step (root-level weights without a step are skipped).

    An entry holding weights but no step number is an error, or with ``skip_unnumbered``
    left out (for a model directory whose own weights sit at its root).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointNotFoundError("is not a directory of checkpoints", path=run_dir,
                                      fix="point at the run's output directory, or list checkpoints explicitly")
    points: list[TrajectoryPoint] = []
    unreadable: list[Path] = []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_dir() and _holds_weights(entry):
            step = step_of(entry)
        elif _is_weight_file(entry):
            step = step_of(entry)
            if step is None:
                continue  # the run directory's own weights: root_weights() names them
        else:
            continue
        if step is None:
            unreadable.append(entry)
        else:
            points.append(TrajectoryPoint(step, entry))
    if unreadable and not skip_unnumbered:
        raise InvalidCheckpointError(
            f"no step number in the name of {', '.join(p.name for p in unreadable[:3])}", path=run_dir,
            fix="name checkpoints like checkpoint-1000 or step_1000, or list them explicitly in order",
        )
    if not points:
        raise CheckpointNotFoundError(
            "holds no checkpoints (looked for checkpoint-N/, step_N/, step-N/, iter_N/ and *N.safetensors)",
            path=run_dir, fix="point at the run's output directory, or list the checkpoints explicitly",
        )
    return ordered(points, where=run_dir)


def checkpoints_in(directory: str | Path) -> tuple[list[TrajectoryPoint], list[Path]]:
    """The step-named checkpoints inside ``directory``, or the directory itself when it has none.

    Also returns the weight files at its root that were left out because step-named
    checkpoints sit beside them (a Trainer's final model), so the caller can say so.
    """
    directory = Path(directory)
    own_weights = root_weights(directory)
    try:
        # With weights at its root, unnumbered subfolders (say, an export) are not checkpoints.
        points = discover(directory, skip_unnumbered=bool(own_weights))
    except CheckpointNotFoundError:
        if not own_weights:
            raise
        return from_paths([directory]), []  # nothing step-named inside: the directory is one checkpoint
    return points, own_weights


def root_weights(run_dir: str | Path) -> list[Path]:
    """Weight files at the root of ``run_dir`` that :func:`discover` does not treat as trajectory points."""
    return [f for f in sorted(Path(run_dir).iterdir())
            if (_is_weight_file(f) and step_of(f) is None) or _ROOT_CHECKPOINT.match(f.name)]


def _is_weight_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(".safetensors")


def from_paths(paths: Sequence[str | Path]) -> list[TrajectoryPoint]:
    """An explicit list, in training order; steps from the names, else positions 1, 2, ..."""
    resolved = [Path(p) for p in paths]
    for path in resolved:
        if not path.exists():
            raise CheckpointNotFoundError("no such checkpoint", path=path)
    steps = [step_of(p) for p in resolved]
    if any(s is None for s in steps):
        steps = list(range(1, len(resolved) + 1))
    points = [TrajectoryPoint(s, p) for s, p in zip(steps, resolved)]  # type: ignore[arg-type]
    if [p.step for p in points] != sorted(p.step for p in points):
        raise InvalidCheckpointError(
            f"the listed checkpoints are not in step order ({', '.join(str(p.step) for p in points)})",
            fix="list them in training order",
        )
    return ordered(points)


def ordered(points: list[TrajectoryPoint], where: Path | None = None) -> list[TrajectoryPoint]:
    """Sorts by step; two checkpoints at one step are an error naming both."""
    points = sorted(points, key=lambda p: p.step)
    for earlier, later in itertools.pairwise(points):
        if earlier.step == later.step:
            raise InvalidCheckpointError(
                f"{earlier.path.name} and {later.path.name} are both at step {earlier.step}", path=where,
                fix="remove one, or list the checkpoints explicitly",
            )
    return points
