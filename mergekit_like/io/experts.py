"""Mixture-of-experts checkpoints in the fused layout transformers 5 loads (and mergekit 0.1.5 writes).

Mixtral and Qwen-MoE checkpoints on the Hub mostly store one tensor per expert
(``block_sparse_moe.experts.3.w1.weight``); transformers 5 models hold all experts
of a layer in one tensor (``mlp.experts.gate_up_proj``, experts x (gate + up) x
hidden) and convert on loading. A merge that sees the fused tensors gives the same
tensors to name filters and whole-tensor statistics (TIES' and breadcrumbs'
magnitude ranks, model_stock's cosines) as mergekit does, and writes what
transformers 5 loads without converting. :class:`FusedExperts` presents a stored
checkpoint in that layout, reading each expert's tensors on demand.

transformers 4 loads only the stored layout: with it installed, or ``expert_layout:
stored``, checkpoints are merged as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from mergekit_like.io.reader import Checkpoint, _out_buffer
from mergekit_like.io.safetensors_format import TensorEntry

EXPERT_LAYOUTS = ("auto", "fused", "stored")
FUSED = -2  # the offset of an entry assembled from several stored tensors (none is read at it)


@dataclass(frozen=True)
class Fusion:
    """How one family's per-expert tensors fuse: renames, then leaves joined along dim 1 per expert."""

    renames: tuple[tuple[str, str], ...]
    experts: str  # a regex of a stored expert tensor: groups prefix, expert index, leaf
    fused: tuple[tuple[str, tuple[str, ...]], ...]  # fused name (after the prefix) <- its leaves, in order


MIXTRAL = Fusion(
    renames=((".block_sparse_moe.", ".mlp."),),
    experts=r"^(.*\.mlp\.experts)\.(\d+)\.(w[123]\.weight)$",
    fused=(("gate_up_proj", ("w1.weight", "w3.weight")), ("down_proj", ("w2.weight",))),
)
QWEN_MOE = Fusion(
    renames=(),
    experts=r"^(.*\.mlp\.experts)\.(\d+)\.((?:gate|up|down)_proj\.weight)$",
    fused=(("gate_up_proj", ("gate_proj.weight", "up_proj.weight")), ("down_proj", ("down_proj.weight",))),
)
# The model types whose transformers 5 conversion is one of these (and whose mergekit
# architecture names the fused tensors).
FUSIONS = {"mixtral": MIXTRAL, "minimax": MIXTRAL, "qwen2_moe": QWEN_MOE, "qwen3_moe": QWEN_MOE}


def resolved_expert_layout(layout: str) -> str:
    """``auto`` made definite: fused, unless the transformers installed is version 4 (it loads only stored)."""
    if layout != "auto":
        return layout
    return "stored" if _transformers_major() == 4 else "fused"


def fuses(config: Any, layout: str) -> Fusion | None:
    """The fusion to apply to a model with ``config`` under ``layout`` (auto, fused, stored)."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    fusion = FUSIONS.get(model_type) if isinstance(model_type, str) else None
    return fusion if fusion is not None and resolved_expert_layout(layout) == "fused" else None


def _transformers_major() -> int | None:
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class _Fused:
    experts: tuple[tuple[str, ...], ...]  # per expert, the stored names joined along dim 1


class FusedExperts(Checkpoint):
    """A checkpoint as transformers 5 lays it out: renamed tensors and each layer's experts fused."""

    def __init__(self, inner: Checkpoint, fusion: Fusion) -> None:
        self.inner = inner
        entries: dict[str, TensorEntry] = {}
        self._stored: dict[str, str] = {}  # a renamed tensor -> its stored name
        self._fused: dict[str, _Fused] = {}
        groups: dict[str, dict[int, dict[str, tuple[str, str]]]] = {}  # prefix -> expert -> leaf -> names
        pattern = re.compile(fusion.experts)
        for name in inner.names():
            renamed = name
            for old, new in fusion.renames:
                renamed = renamed.replace(old, new)
            match = pattern.match(renamed)
            if match is None:
                entries[renamed] = _renamed(inner.entry(name), renamed)
                self._stored[renamed] = name
                continue
            prefix, index, leaf = match.groups()
            groups.setdefault(prefix, {}).setdefault(int(index), {})[leaf] = (name, renamed)
        for prefix, experts in groups.items():
            for target, leaves in fusion.fused:
                parts = tuple(tuple(experts[e][leaf][0] for leaf in leaves) for e in sorted(experts)
                              if all(leaf in experts[e] for leaf in leaves))
                if len(parts) != len(experts):
                    continue  # an incomplete group stays as stored (the names check then reports it)
                name = f"{prefix}.{target}"
                self._fused[name] = _Fused(parts)
                entries[name] = self._fused_entry(name, parts)
        fused_parts = {n for f in self._fused.values() for part in f.experts for n in part}
        for experts in groups.values():  # tensors of no complete fused group stay as they are
            for by_leaf in experts.values():
                for stored, renamed in by_leaf.values():
                    if stored not in fused_parts:
                        entries[renamed] = _renamed(inner.entry(stored), renamed)
                        self._stored[renamed] = stored
        super().__init__(inner.layout, entries, inner.metadata)

    def _fused_entry(self, name: str, parts: tuple[tuple[str, ...], ...]) -> TensorEntry:
        first = [self.inner.entry(n) for n in parts[0]]
        rows = sum(e.shape[0] for e in first)
        nbytes = sum(self.inner.entry(n).nbytes for part in parts for n in part)
        return TensorEntry(name, first[0].dtype, (len(parts), rows, *first[0].shape[1:]), first[0].file, FUSED,
                           nbytes)

    def read(
        self, name: str, *, device: torch.device | str | None = None, out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if name in self._stored:
            return self.inner.read(self._stored[name], device=device, out=out, rows=rows)
        entry = self.entry(name)
        start, stop = rows if rows is not None else (0, entry.shape[0])
        shape = (stop - start, *entry.shape[1:])
        if out is not None:
            target = _out_buffer(out, entry.row_bytes * (stop - start)).view(entry.dtype).reshape(shape)
        else:
            target = torch.empty(shape, dtype=entry.dtype)
        for row, expert in enumerate(self._fused[name].experts[start:stop]):
            offset = 0
            for stored in expert:
                value = self.inner.read(stored)
                target[row, offset:offset + value.shape[0]].copy_(value)
                offset += value.shape[0]
        if device is not None and torch.device(device).type != "cpu":
            return target.to(device, non_blocking=target.is_pinned())
        return target

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        if name in self._stored:
            self.inner.prefetch(self._stored[name], rows)
            return
        start, stop = rows if rows is not None else (0, len(self._fused[name].experts))
        for expert in self._fused[name].experts[start:stop]:
            for stored in expert:
                self.inner.prefetch(stored)

    def stored_name(self, name: str) -> str | list[str]:
        """The stored tensor (or tensors, for a fused one) behind ``name``."""
        if name in self._stored:
            return self._stored[name]
        return [n for expert in self._fused[name].experts for n in expert]

    def close(self) -> None:
        self.inner.close()


def _renamed(entry: TensorEntry, name: str) -> TensorEntry:
    return TensorEntry(name, entry.dtype, entry.shape, entry.file, entry.start, entry.nbytes)


def with_expert_layout(checkpoint: Checkpoint, config: Any, layout: str) -> Checkpoint:
    """``checkpoint`` in the layout the merge sees (fused experts where transformers 5 fuses them)."""
    fusion = fuses(config, layout)
    if fusion is None:
        return checkpoint
    view = FusedExperts(checkpoint, fusion)
    return view if view.names() != checkpoint.names() else checkpoint


