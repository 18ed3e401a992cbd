"""Averaging a training trajectory offline: stream tensor by tensor across the checkpoints.

For each tensor name, the checkpoints are read in step order, one tensor at a
time, and fed to the state-update classes of every requested output (several
EMA decays, or LAWA at every position, from one read pass). An output's
tensor is written as soon as its last checkpoint has been folded in, so memory
holds one float32 state per output *in progress*, plus the tensor being read
and its float32 temporaries, never a model and never all checkpoints
(:func:`memory_bound`). With many checkpoints the files are not all kept open:
beyond :data:`MAX_OPEN_FILES` shards, each checkpoint's file is closed after its
tensor is read and reopened for the next tensor.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_like.averaging.base import Averager
from mergekit_like.averaging.ema import EMA
from mergekit_like.averaging.lawa import LAWA, lawa_selection
from mergekit_like.averaging.posthoc import FixedCombination, Reconstruction, read_snapshot_info, reconstruct
from mergekit_like.averaging.power_ema import PowerEMA
from mergekit_like.averaging.sfa import AnchorPull
from mergekit_like.averaging.swa import SWA, UniformMean
from mergekit_like.averaging.trajectory import TrajectoryPoint
from mergekit_like.errors import IncompatibleModelsError, InvalidCheckpointError, RecipeError
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.safetensors_format import TensorEntry
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.values import nonfinite_count
from mergekit_like.io.writer import WrittenCheckpoint
from mergekit_like.progress import NullProgress, ProgressSink

logger = logging.getLogger(__name__)

# Shard files kept open across tensors. Beyond it a run over hundreds of checkpoints would hit the
# process's descriptor limit (often 1024), so each checkpoint is reopened per tensor instead: one
# open() per tensor and checkpoint, negligible next to reading the tensor.
MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class AverageOutput:
    """One output checkpoint: which trajectory positions it averages, and with what rule."""

    label: str | None
    indices: tuple[int, ...]  # positions in the trajectory, oldest first
    make: Callable[[], Averager]  # a fresh state for each tensor
    state_tensors: int = 1  # float32 tensors one state holds per name (SFA keeps the anchor too)
    reconstruction: Reconstruction | None = None  # post-hoc EMA: the snapshots' weights and the error

    @property
    def last(self) -> int:
        return self.indices[-1]


def ema_outputs(points: Sequence[TrajectoryPoint], decays: Sequence[float] = (),
                half_lives: Sequence[float] = (), per_checkpoint: bool = False, *, start: int | None = None,
                **warmup: Any) -> list[AverageOutput]:
    """One EMA per decay and per half-life, over the checkpoints from ``start`` (``warmup``: EMA's options)."""
    kept = _from_step(points, start, "EMA")
    options = dict(per_checkpoint=per_checkpoint, start_step=start, **warmup)
    makers = [functools.partial(EMA, d, **options) for d in decays]
    makers += [functools.partial(EMA, half_life=h, **options) for h in half_lives]
    return [AverageOutput(make().label, kept, make) for make in makers]


def power_ema_outputs(points: Sequence[TrajectoryPoint], sigma_rels: Sequence[float]) -> list[AverageOutput]:
    """One power-function EMA per relative width, over the whole trajectory (steps from 0)."""
    everything = tuple(range(len(points)))
    makers = [functools.partial(PowerEMA, s) for s in sigma_rels]
    return [AverageOutput(make().label, everything, make) for make in makers]


def phema_outputs(points: Sequence[TrajectoryPoint], sigma_rels: Sequence[float]) -> list[AverageOutput]:
    """Post-hoc EMA: per width, the stored snapshots' combination nearest it at the newest step."""
    infos = [read_snapshot_info(p.path) for p in points]
    steps, gammas = [i.step for i in infos], [i.gamma for i in infos]
    outputs = []
    for sigma_rel in sigma_rels:
        found = reconstruct(steps, gammas, sigma_rel, max(steps))
        label = f"phema_sr{sigma_rel:g}"
        make = functools.partial(FixedCombination, found.weights, label)
        # The sum is kept in float64: two float32 states' worth.
        outputs.append(AverageOutput(label, tuple(range(len(points))), make, state_tensors=2, reconstruction=found))
    return outputs


def _from_step(points: Sequence[TrajectoryPoint], start: int | None, what: str) -> tuple[int, ...]:
    kept = tuple(i for i, p in enumerate(points) if start is None or p.step >= start)
    if not kept:
        raise RecipeError([f"no checkpoint has a step from the {what} start {start} on "
                           f"(steps run from {points[0].step} to {points[-1].step})"])
    return kept


def swa_outputs(points: Sequence[TrajectoryPoint], start: int | None, end: int | None) -> list[AverageOutput]:
    """The uniform mean of the checkpoints with start <= step <= end."""
    window = SWA(start, end)
    indices = tuple(i for i, p in enumerate(points) if window.accepts(p.step))
    if not indices:
        raise RecipeError([f"no checkpoint has a step in the SWA window [{start}, {end}] "
                           f"(steps run from {points[0].step} to {points[-1].step})"])
    return [AverageOutput(window.label, indices, lambda: SWA(start, end))]


def lawa_outputs(points: Sequence[TrajectoryPoint], k: int, nu: int, every_step: bool = False, *,
                 start: int | None = None) -> list[AverageOutput]:
    """LAWA at the newest checkpoint, or (every_step) at every position, of the checkpoints from ``start``."""
    kept = _from_step(points, start, "LAWA")
    steps = [points[i].step for i in kept]
    positions = range(len(kept)) if every_step else [len(kept) - 1]
    outputs = []
    for position in positions:
        chosen = tuple(kept[i] for i in lawa_selection(steps[: position + 1], k, nu))
        label = f"step_{steps[position]}" if every_step else LAWA(k, nu, start_step=start).label
        outputs.append(AverageOutput(label, chosen, UniformMean))
    return outputs


def sfa_outputs(beta: float) -> list[AverageOutput]:
    """(1 - beta) theta + beta theta_o for a two-point trajectory [anchor, model]."""
    return [AverageOutput(f"sfa_beta{beta:g}", (0, 1), lambda: AnchorPull(beta), state_tensors=2)]


def peak_states(outputs: Sequence[AverageOutput]) -> int:
    """The most float32 state tensors of the current name alive at once, over all outputs."""
    events = sorted([(o.indices[0], o.state_tensors) for o in outputs]
                    + [(o.last + 0.5, -o.state_tensors) for o in outputs])
    alive = peak = 0
    for _, change in events:
        alive += change
        peak = max(peak, alive)
    return peak


@dataclass(frozen=True)
class MemoryBound:
    """The most tensor memory a run holds at once, and the terms it is made of."""

    bytes: int
    states: int  # float32 state tensors alive at once
    tensor: str  # the tensor that needs the most
    open_files: int  # shard files kept open at once

    def describe(self) -> str:
        return (f"{self.states} float32 state(s) + the tensor read + 2 float32 temporaries + the cast written, "
                f"for the largest tensor '{self.tensor}'; at most {self.open_files} input file(s) open")


def memory_bound(newest: Checkpoint, outputs: Sequence[AverageOutput], files: int,
                 out_dtype: torch.dtype | None = None) -> MemoryBound:
    """The bound for averaging checkpoints shaped like ``newest`` into ``outputs``; ``files``: input shards.

    Per tensor of n elements: 4n per float32 state, the tensor read in its own dtype, two float32
    temporaries (the read tensor's float32 copy, and the mean's difference), and the result cast to the
    output dtype while it is written.
    """
    states = peak_states(outputs)

    def need(entry: TensorEntry) -> int:
        written = out_dtype if out_dtype is not None and entry.dtype.is_floating_point else entry.dtype
        return entry.numel * (4 * states + entry.dtype.itemsize + 2 * 4 + written.itemsize)

    largest = max(newest.entries(), key=need, default=None)
    # Beyond the cap each checkpoint is closed after its read: one input file open at a time.
    open_files = files if files <= MAX_OPEN_FILES else 1
    return MemoryBound(need(largest) if largest else 0, states, largest.name if largest else "", open_files)


def trajectory_memory_bound(points: Sequence[TrajectoryPoint], outputs: Sequence[AverageOutput],
                            out_dtype: torch.dtype | None = None, allow_pickle: bool = False) -> MemoryBound:
    """:func:`memory_bound` from the checkpoints' headers alone (no tensor is read)."""
    needed = sorted({i for o in outputs for i in o.indices}) or range(len(points))
    files = 0
    for i in needed:
        with open_checkpoint(points[i].path, allow_pickle=allow_pickle) as checkpoint:
            files += len(checkpoint.files)
    with open_checkpoint(points[-1].path, allow_pickle=allow_pickle) as newest:
        return memory_bound(newest, outputs, files, out_dtype)


def check_trajectory(checkpoints: Sequence[Checkpoint], points: Sequence[TrajectoryPoint]) -> None:
    """Every checkpoint must hold the newest one's tensors with the same shapes and kinds of dtype."""
    newest = checkpoints[-1]
    problems = []
    for checkpoint, point in zip(checkpoints[:-1], points[:-1]):
        missing = set(newest.names()) - set(checkpoint.names())
        extra = set(checkpoint.names()) - set(newest.names())
        if missing or extra:
            example = sorted(missing or extra)[0]
            problems.append(f"{point.path} ({len(missing)} tensors missing, {len(extra)} extra, e.g. '{example}')")
            continue
        for name in newest.names():
            entry, expected = checkpoint.entry(name), newest.entry(name)
            if entry.shape != expected.shape:
                problems.append(f"{point.path}: tensor '{name}' has shape {list(entry.shape)}, "
                                f"not {list(expected.shape)}")
                break
            if problem := _dtype_problem(name, entry.dtype, point.path, expected.dtype, points[-1].path):
                problems.append(problem)
                break
    if problems:
        raise IncompatibleModelsError(
            f"checkpoints differ from the newest ({points[-1].path}): " + "; ".join(problems[:5]),
            fix="average checkpoints of one model; list the right ones explicitly",
        )


def _dtype_problem(name: str, dtype: torch.dtype, path: Path, expected: torch.dtype, newest: Path) -> str | None:
    """As a merge refuses them (merge.plan): floating tensors may differ in precision (the state is
    float32), but a floating tensor beside an integer one, or integers of two types, have no mean;
    without this the newest checkpoint's dtype would silently decide what is written."""
    if dtype == expected or (dtype.is_floating_point and expected.is_floating_point):
        return None
    return (f"tensor '{name}': {dtype_name(dtype)} in '{path}' but {dtype_name(expected)} in '{newest}' "
            "(average checkpoints whose tensors have the same kind of dtype)")


def run_average(
    points: Sequence[TrajectoryPoint],
    outputs: Sequence[AverageOutput],
    output: str | Path,
    *,
    out_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    progress: ProgressSink | None = None,
    files: Sequence[Mapping[str, str]] = (),
    check_finite: bool = False,
    announce: Callable[[MemoryBound], None] | None = None,
) -> list[WrittenCheckpoint]:
    """Writes every output of ``outputs`` from one streaming pass over the checkpoints.

    A single output is written to ``output`` itself, several to subdirectories named by their labels.
    ``files`` (one mapping per output, name -> text) are written beside each output's weights.
    ``check_finite`` refuses a checkpoint tensor holding NaN or Inf values, naming tensor and checkpoint,
    and an output holding any (they are counted in each result otherwise).
    ``announce`` receives the memory bound once the headers are read, before any tensor is.
    """
    sink = progress or NullProgress()
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p.path, allow_pickle=allow_pickle)) for p in points]
        check_trajectory(checkpoints, points)
        newest = checkpoints[-1]
        specs = [
            TensorSpec(e.name, out_dtype if out_dtype is not None and e.dtype.is_floating_point else e.dtype, e.shape)
            for e in newest.entries()
        ]
        needed = sorted({i for o in outputs for i in o.indices})
        shards = sum(len(checkpoints[i].files) for i in needed)
        bound = memory_bound(newest, outputs, shards, out_dtype)
        logger.info("memory bound: %d bytes: %s", bound.bytes, bound.describe())
        if announce is not None:
            announce(bound)
        sink.start(len(specs), sum(checkpoints[i].entry(s.name).nbytes for s in specs for i in needed))
        reader = _Reader(checkpoints, points, keep_open=shards <= MAX_OPEN_FILES, check_finite=check_finite)
        stream = _averaged(reader, points, outputs, specs, needed, sink)
        # One output is the output directory itself; several are subdirectories named by label.
        labels = [o.label for o in outputs] if len(outputs) > 1 else [None]
        extra = list(files) or [{}] * len(outputs)
        return write_checkpoints(
            output, [OutputSpec(label, written) for label, written in zip(labels, extra, strict=True)], specs,
            stream, overwrite=overwrite, max_shard_size=max_shard_size, side_files_from=newest.layout.root,
            out_dtype=out_dtype, inputs={str(p.path): c.layout.root for p, c in zip(points, checkpoints)},
            refuse_nonfinite=check_finite,
        )


class _Reader:
    """Reads one tensor of one checkpoint, keeping the files open across tensors only when they are few."""

    def __init__(self, checkpoints: Sequence[Checkpoint], points: Sequence[TrajectoryPoint], *,
                 keep_open: bool, check_finite: bool) -> None:
        self.checkpoints = checkpoints
        self.points = points
        self.keep_open = keep_open
        self.check_finite = check_finite

    def read(self, index: int, name: str) -> torch.Tensor:
        checkpoint = self.checkpoints[index]
        tensor = checkpoint.read(name)
        # close() drops a pickle checkpoint's loaded tensors, so only safetensors files are released;
        # Checkpoint reopens a closed file on the next read.
        if not self.keep_open and checkpoint.layout.format == "safetensors":
            checkpoint.close()
        if self.check_finite and (bad := nonfinite_count(tensor)):
            raise InvalidCheckpointError(
                f"{bad} NaN or infinite values in the checkpoint at step {self.points[index].step}",
                path=self.points[index].path, tensor=name,
                fix="the run diverged or the file is corrupt; list the checkpoints to average without it",
            )
        return tensor


def _averaged(
    reader: _Reader,
    points: Sequence[TrajectoryPoint],
    outputs: Sequence[AverageOutput],
    specs: Sequence[TensorSpec],
    needed: Sequence[int],
    sink: ProgressSink,
) -> Iterator[WriteItem]:
    consumers = {i: [n for n, o in enumerate(outputs) if i in o.indices] for i in needed}
    with torch.no_grad():
        for spec in specs:
            states: dict[int, Averager] = {}
            read = 0
            for i in needed:
                tensor = reader.read(i, spec.name)
                read += tensor.numel() * tensor.element_size()
                for n in consumers[i]:
                    state = states.get(n)
                    if state is None:
                        state = states[n] = outputs[n].make()
                    state.update({spec.name: tensor}, points[i].step)
                    if i == outputs[n].last:
                        yield WriteItem(n, spec.name, state.result()[spec.name].to(spec.dtype))
                        del states[n]
                del tensor
            sink.advance(spec.name, read)
