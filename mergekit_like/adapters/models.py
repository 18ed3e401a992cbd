"""Opening a model reference that may be, or include, a LoRA adapter.

A reference is a model (path or Hub id), ``BASE+ADAPTER`` (mergekit's form: the adapter
applied to that base), or an adapter directory alone, whose base is the
``base_model_name_or_path`` of its config (``BASE+ADAPTER`` overrides it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergekit_like.adapters.config import is_adapter_dir, read_adapter_config
from mergekit_like.adapters.view import open_adapted
from mergekit_like.errors import InvalidCheckpointError, RecipeError
from mergekit_like.io.reader import Checkpoint, open_checkpoint

Resolver = Callable[[str], Path]


def split_adapter_ref(ref: str) -> tuple[str, str | None]:
    """``(base, adapter)`` of ``BASE+ADAPTER``; ``(ref, None)`` for a plain reference."""
    if "+" not in ref:
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise RecipeError([f"model reference {ref!r}: write BASE+ADAPTER (one '+'), or a model alone"])
    return parts[0], parts[1]


def open_model(ref: str, resolve_model: Resolver, *, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint ``ref`` names, an adapter applied to its base where it names one."""
    base_ref, adapter_ref = split_adapter_ref(ref)
    if adapter_ref is not None:
        adapter_dir = Path(resolve_model(adapter_ref))
        if not is_adapter_dir(adapter_dir):
            raise InvalidCheckpointError("is not a LoRA adapter (no adapter_config.json)", path=adapter_dir,
                                         fix="after '+' name an adapter directory or Hub id")
        return open_adapted(adapter_dir, Path(resolve_model(base_ref)), allow_pickle=allow_pickle)
    path = Path(resolve_model(ref))
    if not is_adapter_dir(path):
        return open_checkpoint(path, allow_pickle=allow_pickle)
    base = read_adapter_config(path).base_model
    if not base:
        raise InvalidCheckpointError("is a LoRA adapter whose config names no base model", path=path,
                                     fix="give its base as BASE+ADAPTER")
    return open_adapted(path, Path(resolve_model(base)), allow_pickle=allow_pickle)
