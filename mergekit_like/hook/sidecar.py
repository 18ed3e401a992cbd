"""The sidecar process: owns the float32 averages, folds in snapshots, writes checkpoints.

It runs in a spawned process so the training process never does averaging
work. The trainer copies its weights into shared-memory buffers and sends
``("snapshot", step)``; the sidecar folds the buffers into every averager (a
float32 copy, after which the buffers are free again), and every
``save_every`` steps writes each average as a ready-to-load Hugging Face
directory, atomically, updates a ``latest`` link, and saves its float32 state
and counters so a restarted sidecar or a resumed run continues exactly.
If the trainer process disappears, the sidecar saves what it has and exits.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_like.averaging.base import Averager
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.io.atomic import pid_alive
from mergekit_like.io.outputs import WriteItem, write_checkpoints
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.io.sharding import TensorSpec

logger = logging.getLogger(__name__)

Averages = Averager | LAWA
STATE_DIR = "state"
LATEST = "latest"
# How often (seconds) an idle sidecar checks that its trainer still runs.
PARENT_POLL = 1.0


@dataclass
class SidecarConfig:
    """Everything the sidecar needs, sent to it once at spawn."""

    out_dir: Path
    averagers: list[Averages]
    save_every: int | None
    keep_last: int = 2
    config: dict[str, Any] | None = None  # the model's config.json, when it has one
    parent_pid: int = field(default_factory=os.getpid)
    device: str = "cpu"


def run_sidecar(
    settings: SidecarConfig,
    buffers: dict[str, torch.Tensor],
    commands: Any,
    replies: Any,
    free: Any,
) -> None:
    """The sidecar's main loop (the target of the spawned process)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # leave the cores to the trainer
    sidecar = Sidecar(settings, buffers)
    free.set()
    while True:
        try:
            message = commands.get(timeout=PARENT_POLL)
        except queue.Empty:
            if not _alive(settings.parent_pid):
                logger.warning("the training process is gone; saving the averages and exiting")
                sidecar.save()
                return
            continue
        kind = message[0]
        if kind == "snapshot":
            sidecar.fold(message[1])
            free.set()
            sidecar.save_if_due()
        elif kind == "average":
            replies.put(("average", sidecar.average(message[1])))
        elif kind == "save":
            sidecar.save()
            replies.put(("saved", sidecar.last_step))
        elif kind == "close":
            sidecar.save()
            replies.put(("closed", sidecar.last_step))
            return


def _alive(pid: int) -> bool:
    # Re-parented means our trainer is gone, even if its pid was reused since.
    return pid_alive(pid) and os.getppid() == pid


class Sidecar:
    """The averaging state and its persistence (usable in-process for tests)."""

    def __init__(self, settings: SidecarConfig, buffers: dict[str, torch.Tensor]) -> None:
        self.settings = settings
        self.buffers = buffers
        self.averagers = [copy.deepcopy(a) for a in settings.averagers]
        for averager in self.averagers:  # the float32 state lives on the sidecar's device
            averager.device = torch.device(settings.device)
        self.last_step: int | None = None
        self.saved_step: int | None = None
        self.restore()

    @property
    def labels(self) -> list[str]:
        return [a.label for a in self.averagers]

    def fold(self, step: int) -> None:
        with torch.no_grad():
            for averager in self.averagers:
                if averager.last_step is None or step > averager.last_step:
                    averager.update(self.buffers, step)
        self.last_step = step

    def save_if_due(self) -> None:
        every = self.settings.save_every
        # Due once the step crosses a multiple of save_every (4, 8, ... for save_every=4).
        if every and self.last_step is not None and self.last_step // every > (self.saved_step or 0) // every:
            self.save()

    def average(self, label: str) -> dict[str, torch.Tensor]:
        for averager in self.averagers:
            if averager.label == label and averager.ready:
                return {n: t.clone() for n, t in averager.result().items()}
        raise KeyError(f"no average named {label!r} yet (have: {', '.join(self.labels)})")

    # -- persistence ---------------------------------------------------------------
    def save(self) -> None:
        """Writes every ready average as step_N/, moves ``latest``, and saves the state."""
        if self.last_step is None or self.last_step == self.saved_step:
            return
        for averager in self.averagers:
            if averager.ready:
                self._write_average(averager)
                self._write_state(averager)
        self.saved_step = self.last_step

    def _write_average(self, averager: Averages) -> None:
        root = self.settings.out_dir / averager.label
        target = root / f"step_{self.last_step}"
        result = averager.result()
        dtypes = {n: b.dtype for n, b in self.buffers.items()}
        specs = [TensorSpec(n, dtypes[n], tuple(t.shape)) for n, t in result.items()]
        items = (WriteItem(0, n, t.to(dtypes[n])) for n, t in result.items())

        def add_config(directory: Path, _index: int) -> None:
            if self.settings.config is not None:
                (directory / "config.json").write_text(json.dumps(self.settings.config, indent=2) + "\n")

        write_checkpoints(target, [None], specs, items, overwrite=True, finalize=add_config)
        _point_latest(root, target.name)
        _prune(root, self.settings.keep_last)

    def _write_state(self, averager: Averages) -> None:
        directory = self.settings.out_dir / averager.label / STATE_DIR
        snapshots = _state_tensors(averager)
        meta = {"label": averager.label, "last_step": averager.last_step, "kind": type(averager).__name__,
                "count": getattr(averager, "count", None), "snapshots": [s for s, _ in snapshots]}
        specs: list[TensorSpec] = []
        items: list[WriteItem] = []
        for index, (_, tensors) in enumerate(snapshots):
            for name, tensor in tensors.items():
                specs.append(TensorSpec(f"{index}/{name}", tensor.dtype, tuple(tensor.shape)))
                items.append(WriteItem(0, f"{index}/{name}", tensor))

        def add_meta(path: Path, _index: int) -> None:
            (path / "state.json").write_text(json.dumps(meta) + "\n")

        write_checkpoints(directory, [None], specs, items, overwrite=True, finalize=add_meta)

    def restore(self) -> None:
        """Loads each averager's saved state, if any (a restarted sidecar or a resumed run)."""
        for averager in self.averagers:
            directory = self.settings.out_dir / averager.label / STATE_DIR
            if not (directory / "state.json").exists():
                continue
            meta = json.loads((directory / "state.json").read_text())
            with open_checkpoint(directory) as checkpoint:
                stored = {n: checkpoint.read(n) for n in checkpoint.names()}
            snapshots = [(step, {n.split("/", 1)[1]: t for n, t in stored.items() if n.startswith(f"{i}/")})
                         for i, step in enumerate(meta["snapshots"])]
            _load_state(averager, snapshots, meta)
            self.last_step = max(self.last_step or 0, meta["last_step"])
        self.saved_step = self.last_step


def _state_tensors(averager: Averages) -> list[tuple[int | None, dict[str, torch.Tensor]]]:
    if isinstance(averager, LAWA):
        return [(step, snapshot) for step, snapshot in averager.window]
    return [(averager.last_step, {**averager.state, **averager.copied})]


def _load_state(averager: Averages, snapshots: Sequence[tuple[int, dict[str, torch.Tensor]]],
                meta: dict[str, Any]) -> None:
    device = averager.device or torch.device("cpu")
    snapshots = [(step, {n: t.to(device) for n, t in tensors.items()}) for step, tensors in snapshots]
    if isinstance(averager, LAWA):
        averager.window.clear()
        averager.window.extend(snapshots)
    else:
        (_, tensors), = snapshots
        averager.state = {n: t for n, t in tensors.items() if t.is_floating_point()}
        averager.copied = {n: t for n, t in tensors.items() if not t.is_floating_point()}
        averager.count = meta["count"]
    averager.last_step = meta["last_step"]


def _point_latest(root: Path, name: str) -> None:
    """Atomically points ``root/latest`` at ``name`` (a relative symlink)."""
    temporary = root / f".{LATEST}.{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(name, temporary)
    os.replace(temporary, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    saved = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in saved[: max(0, len(saved) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)

