"""A base model with a LoRA adapter applied, read tensor by tensor as if it were the merged model.

Each adapted weight is formed when it is read, ``W + scale * B @ A`` (the transpose for
embeddings and GPT-2's Conv1D layers), one tensor at a time, exactly as PEFT's
``merge_and_unload()`` forms it: the product in float32 (PEFT upcasts adapter weights
on loading), added to the weight and rounded to the weight's dtype. DoRA weights are
then rescaled row by row to their magnitude vector. ``modules_to_save`` tensors (and an
embedding the adapter saved whole) replace the base's. Nothing merged is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_like.adapters.config import ADAPTER_PICKLE, ADAPTER_WEIGHTS, AdapterConfig, read_adapter_config
from mergekit_like.adapters.layers import stores_transposed
from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io.reader import Checkpoint, _out_buffer, open_checkpoint
from mergekit_like.io.sidefiles import read_config

PEFT_PREFIX = "base_model.model."
# The tensor-name suffixes of a LoRA adapter file, by role.
LINEAR_A, LINEAR_B = ".lora_A.weight", ".lora_B.weight"
EMBEDDING_A, EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"
MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
SAVED_BASE = ".base_layer.weight"


@dataclass(frozen=True)
class Adaptation:
    """How one base weight is adapted: its A and B tensors in the adapter file and its scale."""

    a: str
    b: str
    scaling: float
    transposed: bool  # the delta is (B @ A).T: embeddings, Conv1D (fan_in_fan_out) layers
    magnitude: str | None = None  # DoRA


class AdaptedCheckpoint(Checkpoint):
    """``base`` as it is with ``adapter`` merged into it, under the base's tensor names."""

    def __init__(self, base: Checkpoint, adapter: Checkpoint, config: AdapterConfig, adapter_dir: Path) -> None:
        self.base = base
        self.adapter = adapter
        self.config = config
        self.adapter_dir = adapter_dir
        self.adaptations, self.replacements = plan_adapter(base, adapter, config, adapter_dir)
        # The last adapted tensor, whole: rows of it are sliced from the one product, so they are the
        # bytes of the whole tensor whatever rows are asked for (a product of fewer rows can round
        # differently), and a vocabulary's many spans of one embedding cost one product.
        self._last: tuple[str, torch.Tensor] | None = None
        super().__init__(base.layout, {n: base.entry(n) for n in base.names()}, base.metadata)

    def read(
        self, name: str, *, device: torch.device | str | None = None, out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        source = self.adapter if name in self.replacements else self.base
        stored = self.replacements.get(name, name)
        if name not in self.adaptations:
            return source.read(stored, device=device, out=out, rows=rows)
        value = self._adapted(name, source, stored)
        if rows is not None:
            value = value[rows[0]:rows[1]]
        if out is not None:
            value = _out_buffer(out, value.numel() * value.element_size()).view(value.dtype).reshape(
                value.shape).copy_(value)
        if device is not None and torch.device(device).type != "cpu":
            return value.to(device, non_blocking=value.is_pinned())
        return value

    def _adapted(self, name: str, source: Checkpoint, stored: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = None  # freed before the next is made
            adaptation = self.adaptations[name]
            a, b = self.adapter.read(adaptation.a), self.adapter.read(adaptation.b)
            # delta = B @ A, or its transpose A.T @ B.T for embeddings and Conv1D layers.
            factors = (a.T, b.T) if adaptation.transposed else (b, a)
            magnitude = self.adapter.read(adaptation.magnitude) if adaptation.magnitude is not None else None
            # An embedding the adapter saved whole (PEFT does when it adapts one) is its weight.
            self._last = (name, adapted(source.read(stored), factors, adaptation.scaling, magnitude))
        return self._last[1]

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        if name in self.replacements:
            self.adapter.prefetch(self.replacements[name], rows)
        else:
            self.base.prefetch(name, rows)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def adapted(weight: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor], scaling: float,
            magnitude: torch.Tensor | None) -> torch.Tensor:
    """``weight + scaling * left @ right`` in float32 (at least), rounded to the weight's dtype, as PEFT merges.

    With DoRA's ``magnitude``, each row is then scaled to it over its norm (the norm of the
    adapted row, as PEFT's merge computes it).
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    left, right = (f.to(compute) for f in factors)
    delta = (left @ right) * scaling
    if magnitude is None:
        return (weight.to(compute) + delta).to(weight.dtype)
    combined = weight.to(compute) + delta
    norm = torch.linalg.norm(combined, dim=1)
    factor = (magnitude.to(compute) / norm).view(-1, 1)
    return (factor * combined).to(weight.dtype)


def plan_adapter(
    base: Checkpoint, adapter: Checkpoint, config: AdapterConfig, adapter_dir: Path,
) -> tuple[dict[str, Adaptation], dict[str, str]]:
    """Which base weights the adapter changes and how; every mismatch with the base is refused here."""
    where = adapter_dir / ADAPTER_WEIGHTS
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in adapter.names():
        name = key.removeprefix(PEFT_PREFIX)
        role, module = _role(name)
        if role is None:
            if name not in base:
                raise InvalidCheckpointError(f"adapter tensor '{key}' replaces '{name}', which the base does not have",
                                             path=where, fix="use the base model the adapter was trained on")
            replacements[name] = key
        elif role == "saved":
            replacements[module + ".weight"] = key
        else:
            modules.setdefault(module, {})[role] = key
    adaptations = {}
    model_config = read_config(base.layout.root)  # which layers are GPT-2's Conv1D
    for module, parts in modules.items():
        transposed = stores_transposed(model_config, module, config.fan_in_fan_out)
        adaptations[module + ".weight"] = _adaptation(module, parts, base, adapter, config, where, transposed)
    for saved in config.modules_to_save:
        if not any(n == saved or n.startswith(saved + ".") or n.endswith("." + saved) or f".{saved}." in n
                   for n in replacements):
            raise InvalidCheckpointError(f"modules_to_save names '{saved}' but the adapter file has no tensor of it",
                                         path=where, fix="the adapter file is incomplete; save the adapter again")
    for name, key in replacements.items():
        if base.entry(name).shape != adapter.entry(key).shape:
            raise InvalidCheckpointError(
                f"adapter tensor '{key}' has shape {list(adapter.entry(key).shape)} but the base's '{name}' has "
                f"{list(base.entry(name).shape)}", path=where, fix="use the base model the adapter was trained on")
    _check_targets(config, modules, where)
    return adaptations, replacements


def _role(name: str) -> tuple[str | None, str]:
    for role, suffix in (("a", LINEAR_A), ("b", LINEAR_B), ("ea", EMBEDDING_A), ("eb", EMBEDDING_B),
                         ("saved", SAVED_BASE), *(("m", s) for s in MAGNITUDE)):
        if name.endswith(suffix):
            return role, name[:-len(suffix)]
    if ".lora_" in name:
        return "unknown", name
    return None, name


def _adaptation(module: str, parts: dict[str, str], base: Checkpoint, adapter: Checkpoint, config: AdapterConfig,
                where: Path, conv1d: bool) -> Adaptation:
    weight = module + ".weight"
    if "unknown" in parts:
        raise InvalidCheckpointError(f"adapter tensor '{parts['unknown']}' is of a kind this tool does not apply",
                                     path=where, fix="merge it into its base with peft's merge_and_unload() first")
    embedding = "ea" in parts or "eb" in parts
    a_role, b_role = ("ea", "eb") if embedding else ("a", "b")
    if a_role not in parts or b_role not in parts:
        missing = "A" if a_role not in parts else "B"
        raise InvalidCheckpointError(f"module '{module}' has no lora_{'embedding_' if embedding else ''}{missing}",
                                     path=where, fix="the adapter file is incomplete; save the adapter again")
    if weight not in base:
        raise InvalidCheckpointError(f"the adapter changes '{weight}', which the base does not have", path=where,
                                     fix="use the base model the adapter was trained on")
    a, b = adapter.entry(parts[a_role]).shape, adapter.entry(parts[b_role]).shape
    shape = base.entry(weight).shape
    transposed = embedding or conv1d
    # Linear: A (r, in), B (out, r), W (out, in). Embedding: A (r, tokens), B (dim, r), W (tokens, dim).
    expected = (b[0], a[1]) if not transposed else (a[1], b[0])
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or tuple(shape) != expected:
        raise InvalidCheckpointError(
            f"'{module}': lora A {list(a)} and B {list(b)} do not fit the base's '{weight}' {list(shape)}",
            path=where, fix="use the base model the adapter was trained on")
    rank = a[0]
    if rank != config.rank(module):
        raise InvalidCheckpointError(f"'{module}' has rank {rank} but the config says {config.rank(module)}",
                                     path=where, fix="correct r or rank_pattern in adapter_config.json")
    magnitude = parts.get("m")
    if magnitude is not None and transposed:
        raise InvalidCheckpointError(f"'{module}': DoRA on an embedding or a Conv1D layer is not applied here",
                                     path=where, fix="merge it into its base with peft's merge_and_unload() first")
    if config.use_dora and magnitude is None:
        raise InvalidCheckpointError(f"use_dora is set but '{module}' has no lora_magnitude_vector", path=where,
                                     fix="the adapter file is incomplete; save the adapter again")
    return Adaptation(parts[a_role], parts[b_role], config.scaling(module, rank), transposed, magnitude)


def _check_targets(config: AdapterConfig, modules: dict[str, dict[str, str]], where: Path) -> None:
    """Every module name of ``target_modules`` (a list) has tensors in the file."""
    if isinstance(config.target_modules, str):
        return  # a regex: which modules it meant is the file's business
    for target in config.target_modules:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise InvalidCheckpointError(f"target_modules names '{target}' but the adapter file has no LoRA "
                                         "tensors for it", path=where,
                                         fix="the adapter file is incomplete; save the adapter again")


def open_adapted(adapter_dir: Path, base_dir: Path, *, allow_pickle: bool = False) -> AdaptedCheckpoint:
    """The model ``base_dir`` with the adapter in ``adapter_dir`` merged into it, checked before any read."""
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickle = " (only adapter_model.bin, a pickle)" if (adapter_dir / ADAPTER_PICKLE).is_file() else ""
        raise InvalidCheckpointError(f"the adapter has no adapter_model.safetensors{pickle}", path=adapter_dir,
                                     fix="save the adapter with safe_serialization=True")
    base = open_checkpoint(base_dir, allow_pickle=allow_pickle)
    try:
        return AdaptedCheckpoint(base, open_checkpoint(weights), config, adapter_dir)
    except BaseException:
        base.close()
        raise
