"""Recompute the BatchNorm statistics of an averaged model.

An average of weights (SWA, EMA, LAWA) has stale BatchNorm statistics: the averaged
``running_mean`` / ``running_var`` are not the statistics of the averaged network's
activations, so its eval-mode outputs are off until one pass over training data
recomputes them. :func:`update_bn` is that pass, with the same arithmetic as
``torch.optim.swa_utils.update_bn``; it also loads the average first, and refuses an
empty loader instead of leaving reset statistics behind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mergekit_like.errors import IncompatibleModelsError, OptionsError
from mergekit_like.io.reader import Checkpoint, open_checkpoint

# Buffers of a BatchNorm module that the pass recomputes, so an average may leave them out.
RECOMPUTED_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

Average = Mapping[str, Tensor] | str | Path
# Where a tensor of the average comes from: its shape and a way to read it.
Source = Checkpoint | Mapping[str, Tensor]


def update_bn(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    average: Mapping[str, Tensor] | str | Path | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> torch.nn.Module:
    """Recomputes every BatchNorm module's running statistics with one pass over ``loader``.

    ``average``, when given, is loaded into ``model`` first (see :func:`load_average`).
    The pass resets the statistics, runs ``model`` in train mode under ``no_grad`` with
    ``momentum=None`` (a cumulative average over the batches), then restores each
    module's momentum and the model's training flag. The statistics equal those of
    ``torch.optim.swa_utils.update_bn`` on the same model and batches, bit for bit.

    Each batch from ``loader`` is one of:

    * a tensor: ``model(batch)``;
    * a non-empty list or tuple, such as ``(input, target)`` from a ``DataLoader``:
      ``model(batch[0])``, the rest is ignored;
    * a mapping with string keys, such as a tokenizer's output: ``model(**batch)``;
    * any other object: ``model(batch)``, as torch does.

    With ``device``, the input is moved there with ``.to(device)`` (for a mapping, each
    value that has a ``.to`` method); the model must already be on it. ``max_batches``
    stops the pass after that many batches (the loader is not read further).

    A model without BatchNorm is returned at once, without reading ``loader``. A loader
    that yields no batch raises :class:`OptionsError`; on any error during the pass the
    statistics are put back as they were before it. Returns ``model``.
    """
    _check_max_batches(max_batches)
    if average is not None:
        load_average(model, average)
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    if not norms:
        return model
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    _refresh_statistics(model, norms, batches, device)
    return model


def load_average(model: torch.nn.Module, average: Average) -> None:
    """Copies ``average`` into ``model``'s parameters and buffers, cast to their dtypes.

    ``average`` is a state dict or a safetensors checkpoint (directory or file) read
    tensor by tensor. Its names must be exactly those of ``model.state_dict()``, except
    that BatchNorm ``running_mean`` / ``running_var`` / ``num_batches_tracked`` may be
    missing (:func:`update_bn` recomputes them) and of tied tensors one name suffices.
    Names and shapes are checked before anything is copied, so a refused average
    leaves ``model`` unchanged. Raises :class:`IncompatibleModelsError` naming the
    tensor and the file.
    """
    if isinstance(average, (str, Path)):
        with open_checkpoint(average) as checkpoint:
            _copy_into(model, checkpoint, checkpoint.path)
    else:
        _copy_into(model, average, None)


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is None:
        return
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise OptionsError([f"update_bn: max_batches must be a positive integer or None, got {max_batches!r}"])


def _copy_into(model: torch.nn.Module, source: Source, where: Path | None) -> None:
    targets = model.state_dict(keep_vars=True)
    _check_names(model, targets, source, where)
    with torch.no_grad():
        for name in source:
            stored = source.read(name) if isinstance(source, Checkpoint) else source[name]
            targets[name].copy_(stored)  # copy_ casts to the model tensor's dtype and device


def _check_names(model: torch.nn.Module, targets: Mapping[str, Tensor], source: Source, where: Path | None) -> None:
    unknown = [name for name in source if name not in targets]
    if unknown:
        _refuse(unknown, "is in the average but not in the model", where)
    optional = _recomputed_names(model)
    provided = {id(targets[name]) for name in source}  # tied names share one tensor object
    missing = [name for name, tensor in targets.items() if id(tensor) not in provided and name not in optional]
    if missing:
        _refuse(missing, "is in the model but missing from the average", where)
    for name in source:
        shape = _stored_shape(source, name, where)
        if shape != tuple(targets[name].shape):
            raise IncompatibleModelsError(
                f"has shape {list(shape)} in the average but {list(targets[name].shape)} in the model",
                path=where, tensor=name, fix="average checkpoints of this model's architecture",
            )


def _recomputed_names(model: torch.nn.Module) -> set[str]:
    return {
        f"{prefix}.{buffer}" if prefix else buffer
        for prefix, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for buffer in RECOMPUTED_BUFFERS
    }


def _stored_shape(source: Source, name: str, where: Path | None) -> tuple[int, ...]:
    if isinstance(source, Checkpoint):
        return tuple(source.entry(name).shape)
    value = source[name]
    if not isinstance(value, Tensor):
        raise IncompatibleModelsError(
            f"is a {type(value).__name__} in the average, not a tensor", path=where, tensor=name,
            fix="pass a state dict of tensors",
        )
    return tuple(value.shape)


def _refuse(names: list[str], what: str, where: Path | None) -> None:
    others = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    raise IncompatibleModelsError(
        what + others, path=where, tensor=names[0],
        fix="the average's names must be those of model.state_dict(); average checkpoints of this model",
    )


def _refresh_statistics(
    model: torch.nn.Module, norms: list[_BatchNorm], batches: Iterable[Any], device: torch.device | str | None
) -> None:
    momenta = {module: module.momentum for module in norms}
    was_training = model.training
    before = [_statistics(module) for module in norms]
    try:
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: every batch weighs the same
        model.train()
        if _forward_all(model, batches, device) == 0:
            raise OptionsError([
                "update_bn: the loader yielded no batches, so the BatchNorm statistics cannot be recomputed; "
                "pass a loader of at least one batch of training inputs (the statistics were left as they were)"
            ])
    except BaseException:
        _restore_statistics(norms, before)
        raise
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


def _forward_all(model: torch.nn.Module, batches: Iterable[Any], device: torch.device | str | None) -> int:
    """Runs ``model`` on every batch; returns how many there were."""
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(batches, 1):
            _forward(model, batch, count, device)
    return count


def _forward(model: torch.nn.Module, batch: Any, number: int, device: torch.device | str | None) -> None:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise OptionsError([f"update_bn: batch {number} is an empty {type(batch).__name__}; "
                                "a list or tuple batch must hold the model's input first"])
        model(_moved(batch[0], device))
    elif isinstance(batch, Mapping):
        model(**{key: _moved(value, device) for key, value in batch.items()})
    else:
        model(_moved(batch, device))


def _moved(value: Any, device: torch.device | str | None) -> Any:
    return value.to(device) if device is not None and hasattr(value, "to") else value


def _statistics(module: _BatchNorm) -> list[Tensor | None]:
    return [None if tensor is None else tensor.clone() for tensor in _buffers_of(module)]


def _restore_statistics(norms: list[_BatchNorm], saved: list[list[Tensor | None]]) -> None:
    with torch.no_grad():
        for module, tensors in zip(norms, saved):
            for current, old in zip(_buffers_of(module), tensors):
                if current is not None and old is not None:
                    current.copy_(old)


def _buffers_of(module: _BatchNorm) -> list[Tensor | None]:
    return [getattr(module, name, None) for name in RECOMPUTED_BUFFERS]
