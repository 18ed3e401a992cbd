"""Adapters for training frameworks; each imports its framework only when used.

``evaluate_with="ema_0.999"`` runs the framework's evaluation with that average swapped into the
model (:meth:`WeightAveraging.swapped_in`) and training resumes on the exact training weights.
The average lives only in processes that run a sidecar: under DDP only rank 0, so the adapters
refuse ``evaluate_with`` there when training starts (under FSDP every rank swaps its own shard).

Both adapters make the hook with ``start_step`` set to the trainer's global step when training
starts, so a run resumed from a checkpoint continues the averages saved in ``out_dir`` and their
step numbers (an explicit ``start_step=`` option wins).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from typing import Any

from mergekit_like.errors import HookUsageError, UnknownAverageError
from mergekit_like.hook.weight_averaging import WeightAveraging

logger = logging.getLogger(__name__)


class _EvaluationSwap:
    """An average held swapped in between two framework events (evaluation starts, evaluation ends)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._open: ExitStack | None = None

    @property
    def active(self) -> bool:
        return self._open is not None

    def check(self, averaging: WeightAveraging) -> None:
        """Raises at the start of training what the first evaluation would otherwise raise hours later
        (and stops the hook's sidecar, which the failed run would leave running)."""
        try:
            self._refuse_unusable(averaging)
        except Exception:
            averaging.close()
            raise
        averaging.wait_until_ready()  # so that a sidecar still starting skips no early snapshot

    def _refuse_unusable(self, averaging: WeightAveraging) -> None:
        if self.label not in averaging.labels():
            kept = ", ".join(averaging.labels()) or "none"
            raise UnknownAverageError(f"evaluate_with={self.label!r} names no average; this hook keeps: {kept}")
        if not averaging.active:
            raise HookUsageError(f"evaluate_with={self.label!r} needs the average in every process that evaluates; "
                                 f"under DDP only rank 0 keeps it: drop evaluate_with and evaluate the average "
                                 f"on rank 0 with WeightAveraging.swapped_in()")

    def swap_in(self, averaging: WeightAveraging) -> None:
        self.swap_out()  # an evaluation announced but never run must not leave its swap behind
        stack = ExitStack()
        stack.enter_context(averaging.swapped_in(self.label))
        self._open = stack

    def swap_out(self) -> None:
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()


def _with_start_step(options: dict[str, Any], global_step: int) -> dict[str, Any]:
    """The hook's options with the trainer's global step as ``start_step``, unless the caller gave one.

    The sidecar ignores snapshots at or before the step of the averages it restored: a resumed
    run counting from 0 again would average nothing until it passed its old step count.
    """
    return {"start_step": int(global_step), **options}


def hf_trainer_callback(averages: list[Any], *, evaluate_with: str | None = None, **options: Any) -> Any:
    """A ``transformers.TrainerCallback`` that drives a :class:`WeightAveraging` from the Trainer's loop.

    With ``evaluate_with`` (a label such as ``"ema_0.999"``) the Trainer's evaluations during training
    run with that average: it is swapped in at ``on_step_end``/``on_epoch_end`` when the Trainer is about
    to evaluate (``control.should_evaluate``), and swapped out at ``on_evaluate``, before the Trainer
    saves a checkpoint, so checkpoints and training keep the training weights. Callbacks listed after
    this one see the average in their ``on_step_end``. With several evaluation datasets (a dict) the
    Trainer calls ``on_evaluate`` after each and announces none in advance, so only the first is
    evaluated with the average (a warning says so): give one dataset, or call ``trainer.evaluate()``
    inside ``callback.averaging.swapped_in(label)``. An exception inside the evaluation ends training
    with the average still in the model. The other options go to :class:`WeightAveraging`.
    """
    from transformers import TrainerCallback

    swap = _EvaluationSwap(evaluate_with) if evaluate_with is not None else None

    class WeightAveragingCallback(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.averaging: WeightAveraging | None = None
            self._training = False
            self._warned = False

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self._close_previous()
            # state.global_step is the checkpoint's by now when the Trainer resumes (it loads it first);
            # a caller driving the callback without a TrainerState starts at 0.
            step = getattr(state, "global_step", 0)
            self.averaging = WeightAveraging(model, averages, **_with_start_step(options, step))
            if swap is not None:
                swap.check(self.averaging)
            self._training = True

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if swap is not None:
                swap.swap_out()  # only if an evaluation was announced but did not run

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.averaging is not None:
                self.averaging.step()
                self._swap_in_if_evaluating(control)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._swap_in_if_evaluating(control)

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if swap is None:
                return
            if swap.active:
                swap.swap_out()
            elif self._training:
                self._warn_unswapped()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._training = False
            if swap is not None:
                swap.swap_out()
            if self.averaging is not None:
                self.averaging.close()

        def _close_previous(self) -> None:
            """Closes the hook of a train() that raised (no on_train_end): it holds out_dir's lock."""
            if self.averaging is not None:
                self.averaging.close()

        def _swap_in_if_evaluating(self, control: Any) -> None:
            if swap is not None and self.averaging is not None and control.should_evaluate:
                swap.swap_in(self.averaging)

        def _warn_unswapped(self) -> None:
            message = (f"an evaluation during training ran with the training weights, not {evaluate_with!r}: "
                       f"with several evaluation datasets only the first gets the average")
            if not self._warned:
                warnings.warn(message, stacklevel=2)
                self._warned = True
            logger.warning("%s", message)

    return WeightAveragingCallback()


def lightning_callback(averages: list[Any], *, evaluate_with: str | None = None, **options: Any) -> Any:
    """A Lightning ``Callback`` that drives a :class:`WeightAveraging` after every optimizer step.

    The hook is made at ``on_train_start``, once Lightning has restored a resumed run's loops (after
    ``on_fit_start``), so it starts at ``trainer.global_step``; ``step()`` runs at the end of each batch
    that advanced the global step, so with ``accumulate_grad_batches`` the hook counts optimizer steps
    as ``trainer.global_step`` does, not batches.

    With ``evaluate_with`` (a label such as ``"ema_0.999"``) every validation during ``fit`` runs with
    that average, swapped in at ``on_validation_start`` and out at ``on_validation_end`` (or at
    ``on_exception``); the sanity check before training, which runs before any snapshot (and before
    the hook is made), keeps the training weights. The other options go to :class:`WeightAveraging`.
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback  # type: ignore[assignment]

    swap = _EvaluationSwap(evaluate_with) if evaluate_with is not None else None

    class WeightAveragingCallback(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.averaging: WeightAveraging | None = None
            self._fitting = False
            self._stepped_at = 0  # the trainer's global step at the hook's last step()

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self._fitting = True

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # Not at on_fit_start: a resumed run's global step is restored between the two.
            if self.averaging is not None:  # of a fit() that raised (no on_fit_end): it holds out_dir's lock
                self.averaging.close()
            self._stepped_at = trainer.global_step
            self.averaging = WeightAveraging(pl_module, averages, **_with_start_step(options, trainer.global_step))
            if swap is not None:
                swap.check(self.averaging)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            # A batch that only accumulated gradients changed no weight: no step, as for the trainer.
            if self.averaging is not None and trainer.global_step > self._stepped_at:
                self._stepped_at = trainer.global_step
                self.averaging.step()

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if swap is not None and self.averaging is not None and self._fitting and not trainer.sanity_checking:
                swap.swap_in(self.averaging)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if swap is not None:
                swap.swap_out()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if swap is not None:
                swap.swap_out()  # the model goes back to the training weights however validation ended

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self._fitting = False
            if swap is not None:
                swap.swap_out()
            if self.averaging is not None:
                self.averaging.close()

    return WeightAveragingCallback()
