"""The model's tensors as the hook sees them: bound for snapshots, copied to and from host memory in chunks."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mergekit_like.averaging.sfa import sfa_pull
from mergekit_like.errors import HookUsageError
from mergekit_like.hook.shards import local_tensor

# Elements per host-to-device chunk of the SFA merge-back and of a swap (bounds GPU scratch).
SFA_CHUNK = 16 * 1024 * 1024
# Tensors an error about a changed model names before it says "and N more".
MAX_NAMED = 3
CHANGED_MODEL_FIX = ("close this hook and make a new WeightAveraging, with another out_dir, for the changed model "
                     "(or change the model before making the hook)")


def pull_in_chunks(live: torch.Tensor, anchor: torch.Tensor, beta: float) -> None:
    """:func:`sfa_pull` of ``live`` toward the host tensor ``anchor``, in place, a chunk at a time.

    The only GPU scratch is the anchor's chunk on its way in: the pull writes into ``live``.
    """
    for part, theta_o in device_chunks(live, anchor):
        sfa_pull(part, theta_o, beta, out=part)


def device_chunks(live: torch.Tensor, source: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of a chunk of ``live`` (a view to write through) and the same chunk of ``source`` on live's device.

    ``source`` keeps its dtype: a float32 chunk of :data:`SFA_CHUNK` elements is the only scratch on the
    device. A tensor not contiguous in the standard layout (a channels-last convolution) has no flat view,
    so it comes whole.
    """
    if not live.is_contiguous():
        yield live, source.to(live.device)
        return
    flat_live, flat_source = live.view(-1), source.reshape(-1)
    for start in range(0, flat_live.numel(), SFA_CHUNK):
        yield flat_live[start:start + SFA_CHUNK], flat_source[start:start + SFA_CHUNK].to(live.device,
                                                                                         non_blocking=True)


def load_into(live: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copies each of ``values`` into the live tensor of its name, cast to that tensor's dtype, in chunks."""
    with torch.no_grad():
        for name, tensor in live.items():
            for part, chunk in device_chunks(tensor, values[name]):
                part.copy_(chunk)


def check_average_fits(average: dict[str, torch.Tensor], live: dict[str, torch.Tensor], label: str) -> None:
    """Raises :class:`HookUsageError` before the swap touches anything when the average lacks a tensor or
    has another shape (the model changed since the hook was made)."""
    for name, tensor in live.items():
        value = average.get(name)
        if value is None or value.shape != tensor.shape:
            found = "no such tensor" if value is None else f"shape {tuple(value.shape)}"
            raise HookUsageError(f"the average {label!r} does not fit the model: tensor {name!r} has shape "
                                 f"{tuple(tensor.shape)}, the average {found}; make a new WeightAveraging for a "
                                 f"changed model")


def snapshot_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (detached, live storage; local shards)."""
    return {name: tensor.detach() for name, tensor in live_tensors(model).items()}


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, as the model holds them now (local shards)."""
    return {name: local_tensor(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}


# What the snapshot copies from, for one tensor: (data pointer, shape, strides, dtype, device).
Binding = tuple[int, torch.Size, tuple[int, ...], torch.dtype, torch.device]


def binding(tensor: torch.Tensor) -> Binding:
    """What changes when the model replaces a tensor: a bound tensor keeps its storage alive, so an
    equal pointer with an equal layout is the same memory."""
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def changed_names_error(bound: Iterable[str], live: Iterable[str]) -> HookUsageError:
    new, gone = sorted(set(live) - set(bound)), sorted(set(bound) - set(live))
    parts = [f"{label}: {_first_few([repr(n) for n in names])}" for label, names in (("new", new), ("gone", gone))
             if names]
    return HookUsageError(f"the model's tensors changed since the hook was made ({'; '.join(parts)}): the "
                          f"averages hold the tensors it had then; {CHANGED_MODEL_FIX}")


def refuse_reshaped(replaced: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raises :class:`HookUsageError` naming each (bound, live) pair of another shape or dtype."""
    changes = []
    for name, (bound, live) in replaced.items():
        if bound.shape != live.shape:
            changes.append(f"{name!r} changed its shape from {tuple(bound.shape)} to {tuple(live.shape)}")
        elif bound.dtype != live.dtype:
            changes.append(f"{name!r} changed its dtype from {bound.dtype} to {live.dtype}")
    if changes:
        raise HookUsageError(f"since the hook was made, {_first_few(changes, '; ')}: averages of another shape or "
                             f"dtype cannot go on; {CHANGED_MODEL_FIX}")


def _first_few(items: list[str], separator: str = ", ") -> str:
    """The first :data:`MAX_NAMED` of ``items``, and how many more (a resized model changes many tensors)."""
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return separator.join(items[:MAX_NAMED]) + more


def shared_like(tensor: torch.Tensor) -> torch.Tensor:
    """A host buffer in shared memory for snapshots of ``tensor`` (page-locked for CUDA tensors)."""
    buffer = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
    if tensor.is_cuda and buffer.numel():
        # Page-locking the shared pages lets the device-to-host copy run asynchronously.
        torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
    return buffer


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    copy.copy_(tensor)
    return copy


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose tensor names and config the averages take, looking through the wrappers of training.

    DDP and DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) prefix every name
    (``module.``, ``_orig_mod.``), and a LightningModule holding a Hugging Face model as its one child
    (``self.model = AutoModelForCausalLM...``) prefixes ``model.`` and has no config: the averages would
    load nowhere. The inner model's tensors are the wrapper's, so snapshots, swaps and SFA see the same
    memory. A wrapper with tensors or a config of its own, or several children holding tensors, is the
    model itself.
    """
    while True:
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(compiled, torch.nn.Module):
            model = compiled
        else:
            child = _sole_configured_child(model)
            if child is None:
                return model
            model = child


def _sole_configured_child(model: torch.nn.Module) -> torch.nn.Module | None:
    """The one child holding all of ``model``'s tensors, if it has a Hugging Face config and ``model`` none."""
    if model_config(model) is not None:
        return None
    if any(True for _ in itertools.chain(model.parameters(recurse=False), model.buffers(recurse=False))):
        return None
    holding = [c for c in model.children() if any(True for _ in itertools.chain(c.parameters(), c.buffers()))]
    if len(holding) != 1 or model_config(holding[0]) is None:
        return None
    return holding[0]


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None
