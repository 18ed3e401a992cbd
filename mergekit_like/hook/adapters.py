"""Adapters for training frameworks; each imports its framework only when used."""

from __future__ import annotations

from typing import Any

from mergekit_like.hook.weight_averaging import WeightAveraging


def hf_trainer_callback(averages: list[Any], **options: Any) -> Any:
    """A ``transformers.TrainerCallback`` that drives a :class:`WeightAveraging` from the Trainer's loop."""
    from transformers import TrainerCallback

    class WeightAveragingCallback(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.averaging: WeightAveraging | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.averaging = WeightAveraging(model, averages, **options)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.averaging is not None:
                self.averaging.step()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.averaging is not None:
                self.averaging.close()

    return WeightAveragingCallback()


def lightning_callback(averages: list[Any], **options: Any) -> Any:
    """A Lightning ``Callback`` that drives a :class:`WeightAveraging` after every optimizer step."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback  # type: ignore[assignment]

    class WeightAveragingCallback(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.averaging: WeightAveraging | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.averaging = WeightAveraging(pl_module, averages, **options)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if self.averaging is not None:
                self.averaging.step()

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            if self.averaging is not None:
                self.averaging.close()

    return WeightAveragingCallback()
