"""The training-loop hook: snapshots go to a sidecar process; the step never waits for it.

    avg = WeightAveraging(model, [EMA(decay=0.999), LAWA(k=5, nu=1000)], snapshot_every=10,
                          out_dir="runs/avg", save_every=1000)
    for batch in loader:
        ...; optimizer.step(); optimizer.zero_grad()
        avg.step()          # returns at once
    avg.close()             # flushes and writes the final averages

A snapshot copies the parameters and floating buffers into shared host memory
in the model's own dtype: on CUDA on a side stream into page-locked shared
memory, so the host never waits and the GPU holds no extra model copy; on the
CPU as a plain copy. If the sidecar is still busy with the previous snapshot
the hook skips this one and counts it (``strict=True`` waits instead).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mergekit_like.averaging.base import Averager
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.hook.shards import is_sharded, local_tensor, shard_directory, write_manifest
from mergekit_like.hook.sidecar import Averages, SidecarConfig, run_sidecar

logger = logging.getLogger(__name__)

# How long close() waits for the sidecar's last save before giving up on it.
CLOSE_TIMEOUT = 600.0
# Elements per host-to-device chunk of the SFA merge-back (bounds GPU scratch).
SFA_CHUNK = 16 * 1024 * 1024


@dataclass
class SFA:
    """Sequential fine-tuning with averaging (Kleiman et al., "Soup to go", 2025).

    Every ``ceil(p * steps_per_task)`` steps of a task, and at ``end_task()``,
    the live model becomes (1 - beta) theta + beta theta_o, theta_o being the
    model at ``start_task()``. ``rolling`` re-takes theta_o after each merge.
    Published defaults were not found; beta = 0.5 and p = 0.25 are ours.
    """

    beta: float = 0.5
    p: float = 0.25
    steps_per_task: int | None = None
    rolling: bool = False

    @property
    def every(self) -> int | None:
        if self.steps_per_task is None or self.p >= 1:
            return None
        return max(1, math.ceil(self.p * self.steps_per_task))


@dataclass
class SnapshotCounts:
    taken: int = 0
    skipped: int = 0
    sidecar_restarts: int = 0


def _rank() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank())
    return 0


class WeightAveraging:
    """Keeps averages of a live model in a sidecar process (and SFA merge-backs in place)."""

    def __init__(
        self,
        model: torch.nn.Module,
        averages: list[Averages | SFA],
        *,
        snapshot_every: int = 1,
        out_dir: str | Path = "averages",
        save_every: int | None = None,
        strict: bool = False,
        keep_last: int = 2,
        sidecar_device: str = "cpu",
        start_step: int = 0,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        self.model = model
        self.sfa = next((a for a in averages if isinstance(a, SFA)), None)
        self.averagers = [a for a in averages if not isinstance(a, SFA)]
        labels = [a.label for a in self.averagers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two averages share a label: {labels}")
        self.snapshot_every = snapshot_every
        self.strict = strict
        self.out_dir = Path(out_dir)
        # FSDP/DTensor: every rank averages its own shard; otherwise (DDP) the ranks hold the same
        # weights and rank 0 alone snapshots.
        self.sharded = is_sharded(model)
        rank = _rank()
        sidecar_dir = shard_directory(self.out_dir, rank) if self.sharded else self.out_dir
        if self.sharded and rank == 0:
            write_manifest(self.out_dir, model, _model_config(model))
        self.counts = SnapshotCounts()
        # A resumed run passes its global step; the sidecar restores the averages saved in out_dir.
        self.step_count = start_step
        self.active = self.sharded or rank == 0
        self._closed = False
        self._warned = False
        self._anchor: dict[str, torch.Tensor] | None = None
        self._task_step = 0
        self._merged_at: int | None = None  # the task step of the last merge-back
        self._pending: tuple[int, Any] | None = None  # (step, CUDA event) of a copy in flight
        self._settings = SidecarConfig(sidecar_dir, self.averagers, save_every, keep_last,
                                       None if self.sharded else _model_config(model), os.getpid(), sidecar_device)
        if self.active and self.averagers:
            self._tensors = _snapshot_tensors(model)
            self._buffers = {n: _shared_like(t) for n, t in self._tensors.items()}
            self._stream = torch.cuda.Stream() if any(t.is_cuda for t in self._tensors.values()) else None
            self._start_sidecar()
            atexit.register(self.close)

    # -- the sidecar ------------------------------------------------------------------
    def _start_sidecar(self) -> None:
        if hasattr(self, "_commands"):  # a restart: the dead sidecar's channels go first
            self._close_channels(flush=False)
        context = mp.get_context("spawn")
        self._commands = context.Queue()
        self._replies = context.Queue()
        self._free = context.Event()
        self._process = context.Process(
            target=run_sidecar, args=(self._settings, self._buffers, self._commands, self._replies, self._free),
            name="mergekit-like-sidecar", daemon=True,
        )
        self._process.start()

    def _sidecar_alive(self) -> bool:
        if self._process.is_alive():
            return True
        if not self._warned:
            warnings.warn("the averaging sidecar died; restarting it from its last saved state", stacklevel=3)
            self._warned = True
        self.counts.sidecar_restarts += 1
        self._pending = None
        self._start_sidecar()
        return False

    # -- the training loop ---------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimizer step; snapshots every ``snapshot_every`` steps."""
        self.step_count += 1
        if self.sfa is not None:
            self._sfa_step()
        if not self.active or not self.averagers or self._closed:
            return
        self._hand_over_finished_copy()
        if self.step_count % self.snapshot_every:
            return
        if not self._sidecar_alive():
            self._free.wait(timeout=60)  # the new sidecar marks the buffers free once it runs
        if self._pending is not None or not self._free.is_set():
            if not self.strict:
                self.counts.skipped += 1
                return
            self._wait_for_sidecar()
        self._free.clear()
        self._copy_snapshot(self.step_count)
        self.counts.taken += 1

    def _wait_for_sidecar(self) -> None:
        if self._pending is not None:
            self._pending[1].synchronize()
            self._hand_over_finished_copy()
        while not self._free.wait(timeout=1.0):
            if not self._sidecar_alive():
                self._free.wait(timeout=60)

    def _copy_snapshot(self, step: int) -> None:
        with torch.no_grad():
            if self._stream is None:
                for name, tensor in self._tensors.items():
                    self._buffers[name].copy_(tensor)
                self._commands.put(("snapshot", step))
                return
            main = torch.cuda.current_stream()
            self._stream.wait_stream(main)
            with torch.cuda.stream(self._stream):
                for name, tensor in self._tensors.items():
                    self._buffers[name].copy_(tensor, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            # The next optimizer step must not overwrite weights being copied: the training
            # stream waits on the copy on the GPU; the host does not wait at all.
            main.wait_event(done)
            self._pending = (step, done)

    def _hand_over_finished_copy(self) -> None:
        if self._pending is not None and self._pending[1].query():
            self._commands.put(("snapshot", self._pending[0]))
            self._pending = None

    # -- SFA ---------------------------------------------------------------------------------
    def start_task(self) -> None:
        """Takes theta_o, the model at the start of a task, into (pinned) host memory."""
        assert self.sfa is not None, "start_task() needs SFA among the averages"
        self._anchor = {n: _host_copy(t) for n, t in _snapshot_tensors(self.model).items()
                        if t.is_floating_point()}
        self._task_step = 0
        self._merged_at = None

    def end_task(self) -> None:
        """The end-of-task merge-back (none if the task's last step just merged)."""
        if self._merged_at != self._task_step:
            self.merge_back()

    def _sfa_step(self) -> None:
        assert self.sfa is not None
        self._task_step += 1
        every = self.sfa.every
        if self._anchor is not None and every and self._task_step % every == 0:
            self.merge_back()

    def merge_back(self) -> None:
        """theta <- (1 - beta) theta + beta theta_o, in place, in chunks (no model copy on the GPU)."""
        assert self.sfa is not None and self._anchor is not None, "call start_task() first"
        beta = self.sfa.beta
        with torch.no_grad():
            for name, live in _snapshot_tensors(self.model).items():
                anchor = self._anchor.get(name)
                if anchor is None:
                    continue
                flat_live, flat_anchor = live.view(-1), anchor.view(-1)
                for start in range(0, flat_live.numel(), SFA_CHUNK):
                    part = flat_anchor[start:start + SFA_CHUNK].to(live.device, non_blocking=True)
                    flat_live[start:start + SFA_CHUNK].lerp_(part, beta)
        self._merged_at = self._task_step
        if self.sfa.rolling:
            self.start_task()

    # -- results ------------------------------------------------------------------------------
    def averaged_state_dict(self, label: str) -> dict[str, torch.Tensor]:
        """The current float32 average ``label`` (e.g. ``"ema_0.999"``), without touching the model."""
        if not self.active or self._closed:
            raise RuntimeError("no sidecar runs in this process (not rank 0, or closed)")
        if self._pending is not None:
            self._pending[1].synchronize()
            self._hand_over_finished_copy()
        self._commands.put(("average", label))
        _kind, value = self._replies.get(timeout=CLOSE_TIMEOUT)
        return value

    def wait_until_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until the sidecar runs and can take a snapshot (the hook itself never waits)."""
        return not self.active or not self.averagers or self._free.wait(timeout)

    def labels(self) -> list[str]:
        return [a.label for a in self.averagers]

    def close(self) -> SnapshotCounts:
        """Hands over the last snapshot, writes the final averages and stops the sidecar. Idempotent."""
        if self._closed:
            return self.counts
        self._closed = True
        if not self.active or not self.averagers:
            return self.counts
        atexit.unregister(self.close)
        if self._pending is not None:
            self._pending[1].synchronize()
            self._hand_over_finished_copy()
        if self._process.is_alive():
            self._commands.put(("close", None))
            try:
                self._replies.get(timeout=CLOSE_TIMEOUT)
            except queue.Empty:
                logger.warning("the averaging sidecar did not finish its last save in %s s", CLOSE_TIMEOUT)
            self._process.join(timeout=30)
        self._close_channels(flush=True)
        logger.info("snapshots taken %d, skipped %d", self.counts.taken, self.counts.skipped)
        return self.counts

    def _close_channels(self, *, flush: bool) -> None:
        for channel in (self._commands, self._replies):
            channel.close()
            if flush:
                channel.join_thread()
            else:
                channel.cancel_join_thread()  # nobody reads the dead sidecar's pipe any more

    def __enter__(self) -> WeightAveraging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snapshot_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (detached, live storage; local shards)."""
    return {name: local_tensor(tensor).detach() for name, tensor in model.state_dict(keep_vars=True).items()}


def _shared_like(tensor: torch.Tensor) -> torch.Tensor:
    """A host buffer in shared memory for snapshots of ``tensor`` (page-locked for CUDA tensors)."""
    buffer = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
    if tensor.is_cuda and buffer.numel():
        # Page-locking the shared pages lets the device-to-host copy run asynchronously.
        torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
    return buffer


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    copy.copy_(tensor)
    return copy


def _model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


__all__ = ["LAWA", "SFA", "Averager", "SnapshotCounts", "WeightAveraging"]
