"""The training-loop hook: snapshots go to a sidecar process; the step never waits for it.

    avg = WeightAveraging(model, [EMA(decay=0.999), LAWA(k=5, nu=1000)], snapshot_every=1000,
                          out_dir="runs/avg", save_every=1000)
    for batch in loader:
        ...; optimizer.step(); optimizer.zero_grad()
        avg.step()          # returns at once
    avg.close()             # flushes and writes the final averages

A snapshot copies the parameters and floating buffers into shared host memory
in the model's own dtype: on CUDA on a side stream into page-locked shared
memory, so the host never waits and the GPU holds no extra model copy; on the
CPU as a plain copy. If the sidecar is still busy with the previous snapshot
the hook skips this one and counts it (``strict=True`` waits instead). If the
sidecar dies, the next snapshot step starts a new one from its last saved state
and skips snapshots until it runs; one that reports it cannot start (a corrupt
state) is a SidecarError naming the cause instead, and one killed by a signal
before it ran is restarted at most MAX_UNSTARTED_RESTARTS times in a row. Every
wait for the sidecar is bounded and checks, in short slices, that it still runs;
its answers are read whole by a thread of the hook, so one that dies halfway
through an answer leaves no caller reading the rest forever.

A tensor the model replaces (``param.data = t``, a new Parameter or module,
``load_state_dict(..., assign=True)``) is followed at the next snapshot: each snapshot
compares the live tensors' pointers and layouts with the bound ones (no copy). One of
another shape or dtype, or a tensor added or removed, is a HookUsageError naming it.
``out_dir`` is created, checked and locked when the hook is made (one hook per out_dir);
a save that fails later is one warning at the next ``step()`` while averaging goes on.

``with avg.swapped_in("ema_0.999"): evaluate(model)`` evaluates with an average:
the training weights go to host memory (one copy, in their own dtype), the
average is copied into the live parameters and floating buffers a chunk at a
time, and on leaving the block (also by an exception) the training weights are
copied back bit for bit. Only a process that runs a sidecar has the average: under
DDP that is rank 0 alone (nothing is broadcast); under FSDP every rank swaps its shard.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import queue
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from mergekit_like.averaging.base import Averager
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.averaging.sfa import check_beta
from mergekit_like.errors import AveragesNotSavedError, HookUsageError, SidecarError, UnknownAverageError
from mergekit_like.hook.link import POLL_INTERVAL, SidecarLink, refuse_unspawnable_averagers
from mergekit_like.hook.out_dir import OutDirLock, prepare_out_dir
from mergekit_like.hook.shards import is_sharded, shard_directory, write_manifest
from mergekit_like.hook.sidecar import SidecarConfig
from mergekit_like.hook.tensors import (
    binding,
    changed_names_error,
    check_average_fits,
    host_copy,
    inner_model,
    live_tensors,
    load_into,
    model_config,
    pull_in_chunks,
    refuse_reshaped,
    shared_like,
    snapshot_tensors,
)
from mergekit_like.io.dtypes import parse_dtype

logger = logging.getLogger(__name__)

# How long an answer of the sidecar (an average, the final save) may take before the hook gives up on it.
REPLY_TIMEOUT = 600.0
CLOSE_TIMEOUT = 600.0
# How long a strict snapshot waits for the sidecar to free the buffers (it may be folding a large model).
FREE_TIMEOUT = 600.0
# How long the first snapshot waits for a starting sidecar (its torch import takes seconds); later
# snapshots never wait unless strict.
FIRST_SNAPSHOT_WAIT = 60.0
# How long close() waits for the successor of a sidecar found dead to start (it restores the last save).
SUCCESSOR_WAIT = 120.0
# How long close() waits for the sidecar process to exit once it has saved.
JOIN_TIMEOUT = 30.0
# How long a sharded rank waits for the others to say whether they take a snapshot (they step in lockstep;
# one that stopped stepping the hook, by an exception or an early close(), would otherwise hold it forever).
AGREEMENT_TIMEOUT = 600.0
# Sidecars killed by a signal (the OOM killer, say) before they ran, in a row, after which the hook gives up:
# one that is killed every time it restores its state would otherwise be restarted forever.
MAX_UNSTARTED_RESTARTS = 3


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

    def __post_init__(self) -> None:
        check_beta(self.beta)
        if not self.p > 0:
            raise ValueError(f"p must be positive, got {self.p}")
        if self.steps_per_task is not None and self.steps_per_task < 1:
            raise ValueError(f"steps_per_task must be at least 1, got {self.steps_per_task}")

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


def _refuse_before_process_group() -> None:
    """Raises :class:`HookUsageError` in a distributed launch (torchrun's ``WORLD_SIZE``) before the process
    group exists: every rank would take itself for rank 0 and write the same out_dir."""
    world = os.environ.get("WORLD_SIZE", "1")
    distributed = torch.distributed
    if not world.isdigit() or int(world) <= 1 or (distributed.is_available() and distributed.is_initialized()):
        return
    raise HookUsageError(f"WeightAveraging was made before torch.distributed.init_process_group() in a run of "
                         f"WORLD_SIZE={world} processes: every rank would write out_dir as rank 0; make it after "
                         f"init_process_group() (the Trainer and Lightning adapters make it when training starts)")


def _peer_group() -> Any:
    """A gloo group of all ranks for the hook's agreement (None in a single process). Every rank makes its
    hook at the same point of the script, so this collective call is made by all."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() < 2:
        return None
    return distributed.new_group(backend="gloo", timeout=timedelta(seconds=AGREEMENT_TIMEOUT))


def _rank() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank())
    return 0


class WeightAveraging:
    """Keeps averages of a live model in a sidecar process (and SFA merge-backs in place).

    The averages are float32; each save writes them ready to load in the model's own dtype, or in
    ``out_dtype`` (``torch.float32`` or ``"float32"``: a bf16 model's average keeps the moves that
    rounding to bf16 would undo). The saved state, from which a run resumes, is float32 either way.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        averages: Sequence[Averager | SFA],
        *,
        snapshot_every: int = 1,
        out_dir: str | Path = "averages",
        save_every: int | None = None,
        strict: bool = False,
        keep_last: int = 2,
        sidecar_device: str = "cpu",
        start_step: int = 0,
        out_dtype: torch.dtype | str | None = None,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if keep_last < 1:
            # 0 would delete the save that `latest` points to, the one a resume and the user read.
            raise HookUsageError(f"keep_last must be at least 1 (the latest save is always kept), not {keep_last}")
        _refuse_before_process_group()
        # The averages take the names and config of the model inside DDP, torch.compile or a LightningModule.
        self.model = model = inner_model(model)
        self.sfa = _the_sfa(averages)
        self.averagers = [a for a in averages if isinstance(a, Averager)]
        labels = self.labels()
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
        self.counts = SnapshotCounts()
        # A resumed run passes its global step; the sidecar restores the averages saved in out_dir.
        self.step_count = start_step
        self.active = self.sharded or rank == 0
        # Sharded, not strict: the ranks agree on every snapshot over a group of their own (see _all_ranks).
        self._peers = _peer_group() if self.sharded and not strict and self.averagers else None
        self._closed = False
        self._start_waited = False
        self._warned = False
        self._anchor: dict[str, torch.Tensor] | None = None
        self._task_step = 0
        self._merged_at: int | None = None  # the task step of the last merge-back
        self._swapped: str | None = None  # the label swapped in by swapped_in(), while its block runs
        self._pending: tuple[int, Any] | None = None  # (step, CUDA event) of a copy in flight
        self._handed_over: int | None = None  # the step of the last snapshot handed to a sidecar
        self._saved_before: int | None = None  # the last save a sidecar since replaced said it made
        self._requests = itertools.count()
        self._unstarted_restarts = 0  # restarts since a sidecar last ran (bounded by MAX_UNSTARTED_RESTARTS)
        # The ready-to-load averages' floating dtype (the float32 state is saved as it is whatever it says).
        written = parse_dtype(out_dtype) if out_dtype is not None else None
        if written is not None and not written.is_floating_point:
            raise HookUsageError(f"out_dtype must be a floating dtype (float32, bfloat16, float16), not {written}")
        self._settings = SidecarConfig(sidecar_dir, self.averagers, save_every, keep_last,
                                       None if self.sharded else model_config(model), os.getpid(), sidecar_device,
                                       out_dtype=written)
        self._link: SidecarLink | None = None
        # Only a process that runs a sidecar writes out_dir: it alone checks and locks it.
        self._lock = _claim_out_dir(sidecar_dir, self.averagers) if self.active and self.averagers else None
        try:
            if self.sharded and rank == 0:
                write_manifest(self.out_dir, model, model_config(model), written)
            if self._lock is not None:
                self._start_sidecar(self._lock)
        except BaseException:
            self._release_lock()
            raise

    def _start_sidecar(self, lock: OutDirLock) -> None:
        """Binds the model's tensors, makes their shared buffers and spawns the sidecar (which shares ``lock``)."""
        _warn_about_lawa_memory(self.averagers, self.snapshot_every)
        self._tensors = snapshot_tensors(self.model)
        self._bindings = {n: binding(t) for n, t in self._tensors.items()}
        self._buffers = {n: shared_like(t) for n, t in self._tensors.items()}
        self._stream = torch.cuda.Stream() if any(t.is_cuda for t in self._tensors.values()) else None
        self._settings.lock = lock
        self._link = SidecarLink(self._settings, self._buffers)
        atexit.register(self._close_at_exit)

    def _release_lock(self, *, unlock: bool = True) -> None:
        if self._lock is not None:
            self._lock.release(unlock=unlock)
            self._lock = None

    # -- the sidecar ------------------------------------------------------------------
    @property
    def _sidecar(self) -> SidecarLink:
        if self._link is None:
            raise HookUsageError("no sidecar runs in this process: under DDP only rank 0 keeps averages, "
                                 "and a hook with SFA alone keeps none")
        return self._link

    def _revive(self) -> bool:
        """True when the sidecar runs; otherwise starts a new one from its last save and returns False.

        Never waits for the new one. A sidecar that died before it ran is restarted only when
        a signal killed it (the OOM killer, while it restored a large state), and only
        :data:`MAX_UNSTARTED_RESTARTS` times in a row; one that could not start (a bad
        ``out_dir``, a corrupt state) would fail the same way again: a :class:`SidecarError`
        carrying what it said.
        """
        link = self._sidecar
        if link.alive:
            return True
        self._refuse_restart_unless_started(link)
        code = link.process.exitcode
        self._relay_notices()
        loss = self._loss(link)
        if not self._warned:
            warnings.warn(f"the averaging sidecar died (exit code {code}); restarting it: {loss}", stacklevel=3)
            self._warned = True
        logger.warning("the averaging sidecar ended (exit code %s); restarting it: %s", code, loss)
        self._restart(link)
        return False

    def _refuse_restart_unless_started(self, dead: SidecarLink) -> None:
        if dead.started.is_set():
            self._unstarted_restarts = 0
        else:
            self._refuse_restart(dead)

    def _restart(self, dead: SidecarLink) -> None:
        """Starts a new sidecar in place of ``dead``, from the averages saved in out_dir (never waits for it)."""
        self.counts.sidecar_restarts += 1
        self._unstarted_restarts += 1
        self._pending = None
        if dead.saved is not None:
            self._saved_before = dead.saved
        dead.close(flush=False)
        self._link = SidecarLink(self._settings, self._buffers)

    def _saved_step(self) -> int | None:
        """The step of the averages last saved in out_dir, as the sidecars said (None: nothing saved)."""
        said = self._sidecar.saved
        return said if said is not None else self._saved_before

    def _unsaved_snapshots(self) -> bool:
        """Whether a snapshot was handed over after the last save."""
        saved = self._saved_step()
        return self._handed_over is not None and (saved is None or saved < self._handed_over)

    def _loss(self, dead: SidecarLink) -> str:
        """What a dead sidecar took with it: the snapshots since its last save (it said which step that was)."""
        handed, saved = self._handed_over, self._saved_step()
        if not self._unsaved_snapshots():
            return f"it had saved every snapshot, and its successor goes on from the averages in {self.out_dir}"
        if saved is None:
            return (f"nothing had been saved in {self.out_dir}, so the snapshots up to step {handed} are lost and "
                    f"the averages start again (save_every= bounds what a dead sidecar loses)")
        return (f"the snapshots after step {saved}, its last save, up to step {handed} are lost; its successor goes "
                f"on from the averages of step {saved} in {self.out_dir}")

    def _refuse_restart(self, link: SidecarLink) -> None:
        """Raises :class:`SidecarError` unless the sidecar, dead before it ran, is to be restarted."""
        code = link.process.exitcode
        if link.said is None and link.killed:
            if self._unstarted_restarts < MAX_UNSTARTED_RESTARTS:
                return
            raise SidecarError(f"the averaging sidecar was killed before it started (exit code {code}), "
                               f"{self._unstarted_restarts} restarts in a row; if the system ran out of memory "
                               f"while it restored the averages in {self.out_dir}, give it more or keep fewer "
                               f"LAWA snapshots")
        said = link.startup_error()
        said = said.rstrip(".") if said else f"exit code {code}"
        raise SidecarError(f"the averaging sidecar exited before it started: {said}; "
                           f"see its log above, and fix or remove the averages in {self.out_dir}")

    def _request(self, kind: str, argument: Any, timeout: float, *, restart: bool = True) -> Any:
        """Sends a request and waits, in slices that check the sidecar lives, for its answer."""
        link = self._sidecar
        request = next(self._requests)
        link.commands.put((kind, request, argument))
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = link.reply(POLL_INTERVAL)  # keeps a report that it could not start for _revive
            except Exception as exc:  # the reply's shared tensors went with a dying sidecar
                if not link.alive:
                    raise self._died(kind, restart) from exc
                raise SidecarError(f"the averaging sidecar's answer to {kind!r} could not be read: {exc}") from exc
            if reply is None:
                if not link.alive:
                    raise self._died(kind, restart) from None
                if time.monotonic() >= deadline:
                    raise SidecarError(f"the averaging sidecar did not answer {kind!r} within {timeout:g} s; "
                                       f"it still runs (a very large model?): pass a longer timeout") from None
                continue
            status, answered, value = reply
            if answered == request:  # else: the late answer to a request given up on
                break
        self._relay_notices()  # the sidecar said them before this answer
        if status == "error":
            raise _reply_error(*value)
        return value

    def _died(self, kind: str, restart: bool) -> SidecarError:
        if not restart:
            said = self._sidecar.said
            return SidecarError(f"the averaging sidecar died before it answered {kind!r}"
                                f"{' (it could not start: ' + said + ')' if said else ''}; the averages in "
                                f"{self.out_dir} are those of its last save")
        self._revive()  # raises the sidecar's own error when it could not start
        return SidecarError(f"the averaging sidecar died before it answered {kind!r}; a new one is starting from "
                            f"the averages saved in {self.out_dir}: ask again once wait_until_ready() returns")

    def _await_free(self, timeout: float) -> bool:
        """Waits until the sidecar can take a snapshot, restarting it if it dies; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._sidecar.free.wait(POLL_INTERVAL):
            self._revive()
            if time.monotonic() >= deadline:
                return False
        return True

    # -- the training loop ---------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimizer step; snapshots every ``snapshot_every`` steps."""
        self._refuse_inside_swap("step()")
        if self._closed:
            raise HookUsageError(f"step() after close(): the averages are final (saved in {self.out_dir}); build a "
                                 "new WeightAveraging with start_step= to go on")
        self.step_count += 1
        if self.sfa is not None:
            self._sfa_step(self.sfa)
        if self._link is None or self._closed:
            return
        self._relay_notices()
        self._hand_over_finished_copy()
        if self.step_count % self.snapshot_every:
            return
        self._revive()  # a new sidecar marks the buffers free once it runs; until then snapshots are skipped
        busy = self._pending is not None or not self._sidecar.free.is_set()
        ready = not busy or self._waited_for_start()
        if not self.strict and not self._all_ranks(ready):
            self.counts.skipped += 1
            return
        if not ready:
            self._wait_for_sidecar()
        self._follow_replaced_tensors()
        self._sidecar.free.clear()
        self._copy_snapshot(self.step_count)
        self.counts.taken += 1

    def _all_ranks(self, ready: bool) -> bool:
        """Whether every rank's sidecar can take this snapshot (a sharded model's ranks take the same ones).

        Sharded and not strict, each rank would otherwise skip whenever its own sidecar is busy, and
        the ranks' shards would hold different steps. One all-reduce of one integer, on a gloo group
        of the hook's (no device sync), on snapshot steps only.
        """
        if self._peers is None:
            return ready
        flag = torch.tensor([int(ready)], dtype=torch.int32)
        try:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self._peers)
        except RuntimeError as exc:  # gloo's timeout, or a peer gone
            raise SidecarError(f"the ranks did not agree on the snapshot of step {self.step_count} within "
                               f"{AGREEMENT_TIMEOUT:g} s: another rank stopped calling step() (an exception, an "
                               f"early close()) or died: {exc}") from exc
        return bool(flag.item())

    def _waited_for_start(self) -> bool:
        """The first snapshot waits (once, bounded) for the sidecar to start: a short run would otherwise
        take none while the sidecar imports torch. True when the sidecar is then free."""
        if self.counts.taken or self._start_waited or self._pending is not None:
            return False
        self._start_waited = True
        return self._await_free(FIRST_SNAPSHOT_WAIT)

    def _follow_replaced_tensors(self) -> None:
        """Binds the snapshot to each tensor the model replaced since the last one (``param.data = t``, a new
        Parameter or module, ``load_state_dict(assign=True)``), so the average goes on with the live weights.

        Run on snapshot steps only, before the copy (no copy of a bound tensor is in flight then). It walks
        ``state_dict(keep_vars=True)`` and compares each tensor's pointer, shape, strides, dtype and device
        with the bound one's; nothing is copied. Measured: about 2 ms for the 291 tensors of a 32-layer Llama
        on a loaded CPU core, against a snapshot copy of the whole model. A tensor of another shape or dtype,
        or one that appeared or went, is a :class:`HookUsageError`: its average cannot go on.
        """
        live = live_tensors(self.model)
        if live.keys() != self._bindings.keys():
            raise changed_names_error(self._bindings.keys(), live.keys())
        replaced = [name for name, tensor in live.items() if binding(tensor) != self._bindings[name]]
        if not replaced:
            return
        refuse_reshaped({name: (self._tensors[name], live[name]) for name in replaced})
        for name in replaced:
            self._tensors[name] = live[name].detach()
            self._bindings[name] = binding(live[name])
        if self._stream is None and any(live[name].is_cuda for name in replaced):
            self._stream = torch.cuda.Stream()  # moved to the GPU after the hook was made
        logger.debug("the snapshot follows %d replaced tensors (%s, ...)", len(replaced), replaced[0])

    def _relay_notices(self) -> None:
        """Shows what the sidecar said about its saves: a failed save as one warning, its recovery in the log."""
        link = self._link
        while link is not None and not link.notices.empty():  # empty(): the cheap test of every step()
            try:
                level, text = link.notices.get_nowait()
            except queue.Empty:  # another thread of the trainer took it
                return
            if level == "warning":
                warnings.warn(text, stacklevel=3)
            else:
                logger.info("%s", text)

    def _wait_for_sidecar(self) -> None:
        self._finish_pending_copy()
        if not self._await_free(FREE_TIMEOUT):
            raise SidecarError(f"the averaging sidecar did not take the previous snapshot within {FREE_TIMEOUT:g} s")

    def _copy_snapshot(self, step: int) -> None:
        with torch.no_grad():
            if self._stream is None:
                for name, tensor in self._tensors.items():
                    self._buffers[name].copy_(tensor)
                self._hand_over(step)
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
            self._hand_over(self._pending[0])
            self._pending = None

    def _hand_over(self, step: int) -> None:
        """Tells the sidecar that the buffers hold the snapshot of ``step``."""
        self._sidecar.commands.put(("snapshot", step))
        self._handed_over = step

    def _finish_pending_copy(self) -> None:
        if self._pending is not None:
            self._pending[1].synchronize()
            self._hand_over_finished_copy()

    # -- SFA ---------------------------------------------------------------------------------
    def start_task(self) -> None:
        """Takes theta_o, the model at the start of a task, into (pinned) host memory."""
        if self.sfa is None:
            raise HookUsageError("start_task() needs SFA(...) among the averages given to WeightAveraging")
        self._refuse_inside_swap("start_task()")
        self._anchor = {n: host_copy(t) for n, t in snapshot_tensors(self.model).items()
                        if t.is_floating_point()}
        self._task_step = 0
        self._merged_at = None

    def end_task(self) -> None:
        """The end-of-task merge-back (none if the task's last step just merged); then theta_o is let go.

        Steps between tasks merge nothing: the next merge-back pulls toward the next ``start_task()``'s model.
        """
        if self._anchor is None or self._merged_at != self._task_step:
            self.merge_back()  # raises without start_task()
        self._anchor = None

    def _sfa_step(self, sfa: SFA) -> None:
        self._task_step += 1
        every = sfa.every
        if self._anchor is not None and every and self._task_step % every == 0:
            self.merge_back()

    def merge_back(self) -> None:
        """theta <- (1 - beta) theta + beta theta_o, in place, in chunks (no model copy on the GPU)."""
        if self.sfa is None:
            raise HookUsageError("merge_back() needs SFA(...) among the averages given to WeightAveraging")
        if self._anchor is None:
            raise HookUsageError("call start_task() first: it takes theta_o, the model the merge-back pulls toward")
        self._refuse_inside_swap("merge_back()")
        check_beta(self.sfa.beta)  # once here: the pull itself trusts its beta
        with torch.no_grad():
            for name, live in snapshot_tensors(self.model).items():
                anchor = self._anchor.get(name)
                if anchor is not None:
                    pull_in_chunks(live, anchor, self.sfa.beta)
        self._merged_at = self._task_step
        if self.sfa.rolling:
            self.start_task()

    # -- results ------------------------------------------------------------------------------
    def averaged_state_dict(self, label: str, *, timeout: float = REPLY_TIMEOUT) -> dict[str, torch.Tensor]:
        """The current float32 average ``label`` (e.g. ``"ema_0.999"``), without touching the model.

        Raises :class:`UnknownAverageError` for a label this hook does not keep,
        :class:`HookUsageError` for an average that holds no snapshot yet, and
        :class:`SidecarError` when the sidecar dies or does not answer within ``timeout`` seconds.
        """
        self._check_label(label)
        if self._closed:
            raise HookUsageError(f"averaged_state_dict() after close(): read the averages saved in {self.out_dir}")
        if not self._revive():
            raise SidecarError(f"the averaging sidecar had died; a new one is starting from the averages saved in "
                               f"{self.out_dir}: ask again once wait_until_ready() returns")
        self._finish_pending_copy()
        value: dict[str, torch.Tensor] = self._request("average", label, timeout)
        return value

    @contextmanager
    def swapped_in(self, label: str, *, timeout: float = REPLY_TIMEOUT) -> Iterator[None]:
        """Runs the ``with`` block with the average ``label`` in the live model; restores it bit for bit after.

        Parameters and floating buffers get the average cast to their own dtype and device, copied
        a chunk at a time (no float32 copy of the model on the GPU); integer buffers
        (``num_batches_tracked``) keep their values. The training weights wait in host memory (pinned
        for CUDA tensors) and are copied back when the block ends, also when it raises. ``step()``
        inside the block is refused: it would average the average. Needs this process's sidecar: under
        DDP only rank 0 has the average and nothing is broadcast, so evaluate with it on rank 0 alone.

        Raises what :meth:`averaged_state_dict` raises, and :class:`HookUsageError` inside another
        swap, after :meth:`close` and in a process that runs no sidecar.
        """
        self._check_label(label)
        self._refuse_swap(label)
        live = {n: t for n, t in snapshot_tensors(self.model).items() if t.is_floating_point()}
        average = self.averaged_state_dict(label, timeout=timeout)
        check_average_fits(average, live, label)
        training = {n: host_copy(t) for n, t in live.items()}
        self._swapped = label
        try:
            load_into(live, average)
            del average  # its host memory is not needed while the block runs
            yield
        finally:
            load_into(live, training)
            self._swapped = None

    def _check_label(self, label: str) -> None:
        if label not in self.labels():
            kept = ", ".join(self.labels()) or "none (SFA changes the model itself)"
            raise UnknownAverageError(f"no average named {label!r}; this hook keeps: {kept}")

    def _refuse_swap(self, label: str) -> None:
        """Raises :class:`HookUsageError` when ``swapped_in(label)`` cannot run now."""
        if self._swapped is not None:
            raise HookUsageError(f"swapped_in({label!r}) inside swapped_in({self._swapped!r}): leave the first "
                                 f"block before swapping in another average")
        if self._closed:
            raise HookUsageError(f"swapped_in({label!r}) after close(): no sidecar holds the average any more; "
                                 f"load it from {self.out_dir}")
        if self._link is None:
            raise HookUsageError(f"swapped_in({label!r}) in a process that keeps no averages: under DDP only rank 0 "
                                 f"has them (nothing is broadcast), so evaluate with the average on rank 0 alone")

    def _refuse_inside_swap(self, call: str) -> None:
        if self._swapped is not None:
            raise HookUsageError(f"{call} inside swapped_in({self._swapped!r}): the model holds the average, not the "
                                 f"training weights; call it after the with-block")

    def wait_until_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until the sidecar runs and can take a snapshot (the hook itself never waits)."""
        if self._link is None:
            return True
        if self._closed:
            raise HookUsageError("wait_until_ready() after close(): no sidecar runs any more")
        return self._await_free(timeout)

    def labels(self) -> list[str]:
        return [a.label for a in self.averagers]

    def close(self) -> SnapshotCounts:
        """Hands over the last snapshot, writes the final averages and stops the sidecar. Idempotent.

        A sidecar found dead is replaced by one that restores the last save and folds in the model
        as it is now; a warning says which snapshots were lost. Raises
        :class:`~mergekit_like.errors.AveragesNotSavedError`, naming the cause and what ``out_dir``
        holds instead, when the final save fails (once the sidecar has stopped).
        """
        if self._closed:
            return self.counts
        self._closed = True
        if self._link is None:
            self._leave_peers()
            return self.counts
        atexit.unregister(self._close_at_exit)
        failure: AveragesNotSavedError | None = None
        answered = False
        try:
            self._finish_pending_copy()
            failure = self._final_save()
            answered = failure is None
        finally:
            self._stop_sidecar(answered)
            self._leave_peers()  # after the save: a group that cannot be destroyed costs no averages
        if failure is not None:
            raise failure
        logger.info("snapshots taken %d, skipped %d", self.counts.taken, self.counts.skipped)
        return self.counts

    def _leave_peers(self) -> None:
        """Destroys the ranks' agreement group (already gone if the default group was destroyed first)."""
        peers, self._peers = self._peers, None
        distributed = torch.distributed
        if peers is None or not distributed.is_initialized():
            return
        try:
            distributed.destroy_process_group(peers)
        except RuntimeError as exc:  # the averages are saved by now; one line, not a traceback
            logger.warning("the ranks' agreement group could not be destroyed: %s", exc)

    def _close_at_exit(self) -> None:
        """close() at interpreter exit, where an exception would end as a traceback nobody asked for."""
        try:
            self.close()
        except Exception as exc:
            logger.error("%s", exc)

    def _final_save(self) -> AveragesNotSavedError | None:
        """Asks the sidecar for its last save, through a successor if it is dead; the error if the save failed."""
        dead = self._sidecar
        if dead.alive:
            return self._last_save(replace_if_dies=True)
        if not self._unsaved_snapshots():
            return None  # what it had is saved (or it never ran; why it could not start was raised then)
        return self._successor_for_close(dead) or self._last_save(replace_if_dies=True)

    def _last_save(self, *, replace_if_dies: bool) -> AveragesNotSavedError | None:
        """Asks the sidecar to save and stop; one that dies while it saves is replaced once (``replace_if_dies``)."""
        try:
            self._request("close", None, CLOSE_TIMEOUT, restart=False)
            return None
        except SidecarError as exc:
            if self._sidecar.alive or not replace_if_dies:
                return self._not_saved(exc)
        return self._successor_for_close(self._sidecar) or self._last_save(replace_if_dies=False)

    def _successor_for_close(self, dead: SidecarLink) -> AveragesNotSavedError | None:
        """Replaces a sidecar that died before close(): the successor restores the last save and folds in
        the model as it is now (what the trainer still holds); says what was lost."""
        code, loss = dead.process.exitcode, self._loss(dead)
        try:
            self._refuse_restart_unless_started(dead)
        except SidecarError as exc:
            return self._not_saved(exc)
        self._restart(dead)
        if not self._await_free(SUCCESSOR_WAIT):
            return self._not_saved(SidecarError(f"the sidecar had died (exit code {code}) and its successor did "
                                                f"not start within {SUCCESSOR_WAIT:g} s"))
        restored = self._restored_step()
        if self.sharded:
            # A fold-in here would give this rank's shard a snapshot the other ranks' shards lack.
            kept = (f"this rank's shard keeps the averages of step {restored}: consolidate --step {restored}"
                    if restored is not None else "this rank's shard holds no average")
            warnings.warn(f"the averaging sidecar had died before close() (exit code {code}): {loss}; {kept}",
                          stacklevel=4)
            return None
        if restored is None or restored < self.step_count:
            self._follow_replaced_tensors()
            self._sidecar.free.clear()
            self._copy_snapshot(self.step_count)
            self._finish_pending_copy()
        warnings.warn(f"the averaging sidecar had died before close() (exit code {code}): {loss}; the final "
                      f"averages fold in the model as it is at step {self.step_count}", stacklevel=4)
        return None

    def _restored_step(self) -> int | None:
        """The step of the averages a new sidecar restored (it says so as it starts; briefly waited for)."""
        link = self._sidecar
        link.said_saved.wait(POLL_INTERVAL * 10)
        return link.saved

    def _not_saved(self, cause: Exception) -> AveragesNotSavedError:
        saved = self._saved_step()
        holds = (f"the averages saved there are of step {saved}" if saved is not None else
                 "nothing of this run's averages is saved there")
        return AveragesNotSavedError(f"the final averages could not be saved in {self.out_dir}: {cause}; {holds}")

    def _stop_sidecar(self, answered: bool) -> None:
        """Waits (bounded) for the sidecar to exit, closes its channels and lets go of ``out_dir``."""
        link = self._sidecar
        link.join(JOIN_TIMEOUT)
        # Flushing waits for the pipe to drain: only a sidecar that answered has read everything.
        link.close(flush=answered)
        self._relay_notices()
        # After the sidecar's last save a next hook may use out_dir; a sidecar still alive past the
        # wait keeps its share of the lock, so no second hook writes beside its save.
        self._release_lock(unlock=not link.alive)

    def __enter__(self) -> WeightAveraging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _the_sfa(averages: Sequence[Averager | SFA]) -> SFA | None:
    for average in averages:
        if not isinstance(average, Averager | SFA):
            raise TypeError(f"{average!r} is neither an average (EMA, SWA, LAWA, ...) nor SFA")
    found = [a for a in averages if isinstance(a, SFA)]
    if len(found) > 1:
        raise ValueError("give at most one SFA: it changes the model itself")
    return found[0] if found else None


def _warn_about_lawa_memory(averagers: Sequence[Averager], snapshot_every: int) -> None:
    for averager in averagers:
        if isinstance(averager, LAWA) and averager.nu > snapshot_every:
            copies = (averager.k - 1) * math.ceil(averager.nu / snapshot_every) + 1
            logger.warning("%s keeps about %d float32 copies of the model with snapshot_every=%d; "
                           "snapshot_every=%d keeps %d", averager.label, copies, snapshot_every, averager.nu,
                           averager.k)


def _reply_error(kind: str, message: str) -> Exception:
    """The caller's error for an error the sidecar answered with."""
    if kind == UnknownAverageError.__name__:
        return UnknownAverageError(message)
    if kind == HookUsageError.__name__:
        return HookUsageError(message)
    return SidecarError(f"the averaging sidecar failed: {kind}: {message}")


def _claim_out_dir(directory: Path, averagers: Sequence[Averager]) -> OutDirLock:
    """Checks what the sidecar will need before it is spawned, and takes ``directory`` for this hook."""
    refuse_unspawnable_averagers(averagers)
    prepare_out_dir(directory)
    return OutDirLock.claim(directory)


__all__ = ["SFA", "SnapshotCounts", "WeightAveraging"]
