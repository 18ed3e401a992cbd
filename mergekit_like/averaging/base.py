"""The averaging interface shared by `mergekit-like average` and the training hook's sidecar.

An :class:`Averager` keeps float32 state for a stream of snapshots (tensor
name -> tensor) taken at increasing steps: ``update(snapshot, step)`` folds one
in, ``result()`` returns the current average, ``state_dict()`` and
``load_state_dict()`` save and restore it exactly. Floating tensors are
averaged in float32 whatever their dtype (a bf16 average with decay 0.999 never
moves); integer and bool tensors (``num_batches_tracked``) are copied from the
newest snapshot, never averaged. Updates run under ``torch.no_grad()`` with
foreach ops, one kernel launch for the whole model rather than one per tensor.

A state dict holds tensors and JSON-able values. Its tensors come in groups,
each taken at one step: ``"<group>/<name>"``, with ``"snapshots"`` listing the
step of each group (a running average has one group, its state; LAWA one per
snapshot it keeps). The sidecar writes the tensors as safetensors and the rest
as JSON.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Snapshot = Mapping[str, torch.Tensor]
StateDict = dict[str, Any]
# A snapshot is folded into a running average this many float32 bytes at a time (one foreach call per
# group): its float32 copies are the update's only scratch, so the sidecar never holds a second float32
# copy of the model, and the groups are large enough that a model of small tensors needs few calls.
FOLD_GROUP_BYTES = 64 * 1024 * 1024
# The key of a state dict that lists the step of each group of tensors.
GROUP_STEPS = "snapshots"


def as_float32(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A float32 copy (never a view of the snapshot, which the caller may reuse)."""
    return tensor.detach().to(device=device or tensor.device, dtype=torch.float32, copy=True)


def fold_groups(state: Mapping[str, torch.Tensor]) -> Iterator[list[str]]:
    """The names of ``state`` in groups of about :data:`FOLD_GROUP_BYTES` (a larger tensor alone), in order."""
    group: list[str] = []
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > FOLD_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def kept_copy(snapshot: Snapshot, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A snapshot as an averager keeps it: floating tensors in float32, the others as they are."""
    return {name: as_float32(t, device) if t.is_floating_point() else t.detach().to(device or t.device, copy=True)
            for name, t in snapshot.items()}


def pack_groups(groups: Sequence[tuple[int | None, Snapshot]]) -> StateDict:
    """The state-dict entries of ``groups`` ((step, tensors), in order): ``"<i>/<name>"`` and their steps."""
    state: StateDict = {GROUP_STEPS: [step for step, _ in groups]}
    for index, (_, tensors) in enumerate(groups):
        state.update({f"{index}/{name}": tensor for name, tensor in tensors.items()})
    return state


def unpack_groups(state: Mapping[str, Any], device: torch.device | None = None
                  ) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """The (step, tensors) groups of a state dict made by :func:`pack_groups`, tensors on ``device``."""
    steps = state[GROUP_STEPS]
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise ValueError(f"'{GROUP_STEPS}' must be a list of steps, not {steps!r}")
    groups: list[tuple[int, dict[str, torch.Tensor]]] = [(step, {}) for step in steps]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        index, _, name = key.partition("/")
        if not index.isdigit() or int(index) >= len(groups) or not name:
            raise ValueError(f"state tensor {key!r} names no group of the {len(groups)} listed")
        groups[int(index)][1][name] = value.to(device or value.device)
    return groups


def step_number(value: Any, key: str) -> int | None:
    """``value`` of state key ``key`` as a step: an int or None (ValueError otherwise)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"'{key}' must be a step number or null, not {value!r}")
    return value


@dataclass(frozen=True)
class StoredSnapshot:
    """Tensors an averager wants kept beside its average (post-hoc EMA's profiles), with a description.

    Written under the average's directory as ``<name>/`` (floating tensors in ``dtype``), with
    ``info`` as JSON in ``<name>/<info_file>``.
    """

    name: str
    tensors: Mapping[str, torch.Tensor]
    dtype: torch.dtype
    info_file: str
    info: Mapping[str, Any]


class Averager(ABC):
    """One averaging rule over snapshots taken at increasing steps.

    ``label`` names the average (its output directory); ``last_step`` is the step of
    the newest snapshot folded in; ``ready`` says whether ``result()`` has anything
    to return. ``state_dict()`` returns references to the live state, not copies.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        # Where the float32 state lives; None: on each snapshot's own device.
        self.device = torch.device(device) if device is not None else None
        self.last_step: int | None = None

    @property
    @abstractmethod
    def label(self) -> str:
        """A short name for this average (used to name its output directory)."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether a snapshot has been folded in."""

    @abstractmethod
    def update(self, snapshot: Snapshot, step: int) -> bool:
        """Folds in ``snapshot`` taken at ``step``; returns whether it was used."""

    @abstractmethod
    def result(self) -> Mapping[str, torch.Tensor]:
        """The current average (float32) and the newest integer tensors (references to the live state, or
        computed a tensor at a time as they are read: copy what is kept)."""

    @abstractmethod
    def state_dict(self) -> StateDict:
        """Everything needed to continue exactly: tensors and JSON-able values (see the module)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state made by :meth:`state_dict`; raises ValueError or KeyError for a malformed one."""

    def accepts(self, step: int) -> bool:
        """Whether a snapshot at ``step`` would be folded in (SWA's window)."""
        return True

    def result_copy(self) -> dict[str, torch.Tensor]:
        """:meth:`result` as tensors of the caller's own (no reference to the live state)."""
        return {name: tensor.clone() for name, tensor in self.result().items()}

    def stored_snapshots(self, *, final: bool = False) -> list[StoredSnapshot]:
        """Snapshots to keep beside the average, due after the last update (``final``: at the run's end)."""
        return []

    def _check_step(self, step: int) -> None:
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"snapshot step {step} does not follow step {self.last_step}; steps must increase")


class RunningAverage(Averager):
    """An averager whose state is one float32 tensor per floating name, updated in place."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        self.state: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        self.count = 0

    @property
    def label(self) -> str:
        return type(self).__name__.lower()

    @property
    def ready(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def update(self, snapshot: Snapshot, step: int) -> bool:
        self._check_step(step)
        if not self.accepts(step):
            return False
        floats = {n: t for n, t in snapshot.items() if t.is_floating_point()}
        for name, tensor in snapshot.items():
            if name not in floats:
                self.copied[name] = tensor.detach().to(self.device or tensor.device, copy=True)
        if floats:
            if not self.state:
                self.state = {n: as_float32(t, self.device) for n, t in floats.items()}
            else:
                if set(self.state) != set(floats):
                    raise ValueError("a snapshot must hold the same floating tensors as the first one")
                weight = self._begin_fold(step)
                for names in fold_groups(self.state):
                    news = [as_float32(floats[n], self.device) for n in names]
                    self._fold(names, [self.state[n] for n in names], news, weight)
        self.count += 1
        self.last_step = step
        return True

    def _begin_fold(self, step: int) -> float:
        """Runs once per snapshot (at ``step``) before its groups are folded; returns the coefficient
        every group's :meth:`_fold` gets (an EMA's ``1 - k``: a warm-up's product over steps is computed once)."""
        return 0.0

    @abstractmethod
    def _fold(self, names: list[str], state: list[torch.Tensor], new: list[torch.Tensor], weight: float) -> None:
        """Updates ``state``, the tensors of ``names``, in place with the float32 tensors ``new`` (same order);
        ``weight`` is what :meth:`_begin_fold` returned for this snapshot."""

    def result(self) -> dict[str, torch.Tensor]:
        return {**self.state, **self.copied}

    def state_dict(self) -> StateDict:
        groups = [(self.last_step, {**self.state, **self.copied})] if self.ready else []
        return {"last_step": self.last_step, "count": self.count, **pack_groups(groups)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = unpack_groups(state, self.device)
        count = state["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0 or (count > 0) != bool(groups):
            raise ValueError(f"'count' {count!r} does not match the {len(groups)} group(s) of tensors")
        self._load_groups(groups, count, step_number(state["last_step"], "last_step"))

    def _load_groups(self, groups: Sequence[tuple[int, dict[str, torch.Tensor]]], count: int,
                     last_step: int | None) -> None:
        if len(groups) > 1:
            raise ValueError(f"a {type(self).__name__} state holds one group of tensors, not {len(groups)}")
        self._restore(groups[0][1] if groups else {}, count, last_step)

    def _restore(self, tensors: Mapping[str, torch.Tensor], count: int, last_step: int | None) -> None:
        self.state = {n: t for n, t in tensors.items() if t.is_floating_point()}
        self.copied = {n: t for n, t in tensors.items() if not t.is_floating_point()}
        self.count = count
        self.last_step = last_step
