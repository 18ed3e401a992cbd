"""mergekit's layer-range recipe forms: ``slices:`` and ``modules:``, as written.

A slice stacks one range of layers into the output; its sources are the models
(each with its ``layer_range``, ``[start, end)``) whose layers are merged, one
output layer per offset into the range. A one-source slice copies its layers
(a frankenmerge, with ``passthrough``). ``modules:`` gives a multi-module model
(a vision tower beside a language model) its own slices per module.

Only the structure lives here; what each slice merges (its method, models and
parameters) is checked as a recipe of its own (see
:meth:`~mergekit_like.merge.recipe.MergeRecipe.slice_recipes`), and which tensors
make a layer is decided from the checkpoints (:mod:`mergekit_like.merge.layers`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekit_like.errors import short_repr, short_text

logger = logging.getLogger(__name__)

SOURCE_KEYS = {"model", "layer_range", "parameters"}
# merge_method per slice is this tool's extension: mergekit 0.1.5 reads one method per recipe
# (and ignores the key). residual_weight is in mergekit's schema but changes no number there.
SLICE_KEYS = {"sources", "base_model", "parameters", "merge_method", "residual_weight"}
MODULE_KEYS = {"slices", "models", "parameters"}


@dataclass(frozen=True)
class SliceSource:
    """One model's layers ``[start, end)`` in a slice, with its own parameter values."""

    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """A range of output layers, merged from the same number of layers of each source."""

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    merge_method: str | None = None

    @property
    def layers(self) -> int:
        return self.sources[0].layers if self.sources else 0


@dataclass(frozen=True)
class OutputModule:
    """One module of a multi-module model: its slices, or whole models (``models:``)."""

    slices: tuple[OutputSlice, ...] = ()
    # Whole-module merges, as mergekit's module ``models:``: (model, parameters) pairs.
    models: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)


def parse_slices(raw: Any, where: str, problems: list[str]) -> tuple[OutputSlice, ...]:
    """``slices:`` as written, every structural problem appended to ``problems``."""
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where} must be a non-empty list of {{sources: [...]}}")
        return ()
    out = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{here} must be a mapping with sources")
            continue
        _unknown_keys(item, SLICE_KEYS, here, problems)
        sources = _sources(item.get("sources"), here, problems)
        lengths = {s.layers for s in sources}
        if len(lengths) > 1:
            listed = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources)
            problems.append(f"{here}: every source must give the same number of layers ({listed})")
        base = item.get("base_model")
        if base is not None and not isinstance(base, str):
            problems.append(f"{here}: base_model must be a path or repo id, not {short_repr(base)}")
            base = None
        method = item.get("merge_method")
        if method is not None and not isinstance(method, str):
            problems.append(f"{here}: merge_method must be a method name, not {short_repr(method)}")
            method = None
        residual = item.get("residual_weight")
        if residual is not None:
            if isinstance(residual, bool) or not isinstance(residual, (int, float)):
                problems.append(f"{here}: residual_weight must be a number, not {short_repr(residual)}")
            else:
                logger.warning("%s: residual_weight changes nothing, in mergekit 0.1.5 either; ignored", here)
        out.append(OutputSlice(tuple(sources), base, _parameters(item, here, problems), method))
    return tuple(out)


def parse_modules(raw: Any, problems: list[str]) -> dict[str, OutputModule]:
    """``modules:`` as written: module name -> its slices or models."""
    if not isinstance(raw, Mapping) or not raw:
        problems.append("modules must be a mapping of module name: {slices: [...]} or {models: [...]}")
        return {}
    out = {}
    for name, item in raw.items():
        here = f"modules.{short_text(str(name))}"
        if not isinstance(item, Mapping):
            problems.append(f"{here} must be a mapping with slices or models")
            continue
        _unknown_keys(item, MODULE_KEYS, here, problems)
        if ("slices" in item) == ("models" in item):
            problems.append(f"{here}: give either slices or models")
            continue
        slices = parse_slices(item["slices"], f"{here}.slices", problems) if "slices" in item else ()
        models = _module_models(item.get("models"), here, problems) if "models" in item else ()
        out[str(name)] = OutputModule(slices, models, _parameters(item, here, problems))
    return out


def slices_to_dict(slices: tuple[OutputSlice, ...]) -> list[dict[str, Any]]:
    """Slices in mergekit's YAML form."""
    out = []
    for piece in slices:
        data: dict[str, Any] = {"sources": [
            {"model": s.model, "layer_range": list(s.layer_range),
             **({"parameters": dict(s.parameters)} if s.parameters else {})}
            for s in piece.sources
        ]}
        if piece.base_model is not None:
            data["base_model"] = piece.base_model
        if piece.merge_method is not None:
            data["merge_method"] = piece.merge_method
        if piece.parameters:
            data["parameters"] = dict(piece.parameters)
        out.append(data)
    return out


def modules_to_dict(modules: Mapping[str, OutputModule]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, module in modules.items():
        data: dict[str, Any] = {}
        if module.slices:
            data["slices"] = slices_to_dict(module.slices)
        else:
            data["models"] = [{"model": m, **({"parameters": dict(p)} if p else {})} for m, p in module.models]
        if module.parameters:
            data["parameters"] = dict(module.parameters)
        out[name] = data
    return out


def _sources(raw: Any, where: str, problems: list[str]) -> list[SliceSource]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: sources must be a non-empty list of {{model, layer_range}}")
        return []
    out = []
    seen: set[str] = set()
    for j, item in enumerate(raw):
        here = f"{where}.sources[{j}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            problems.append(f"{here} needs a 'model' path or repo id")
            continue
        if item["model"] in seen:
            # Sources are merged as models: one model twice would be one input counted twice.
            problems.append(f"{here}: '{item['model']}' is already a source of this slice; a slice merges "
                            "each model once (stack its layers in slices of their own)")
            continue
        seen.add(item["model"])
        _unknown_keys(item, SOURCE_KEYS, f"{here} ({item['model']})", problems)
        layer_range = _layer_range(item.get("layer_range"), f"{here} ({item['model']})", problems)
        if layer_range is None:
            continue
        out.append(SliceSource(item["model"], layer_range, _parameters(item, f"{here} ({item['model']})", problems)))
    return out


def _layer_range(raw: Any, where: str, problems: list[str]) -> tuple[int, int] | None:
    if raw is None:
        problems.append(f"{where}: layer_range is missing (write layer_range: [start, end))")
        return None
    if isinstance(raw, list):  # mergekit's integers accept numbers written as strings
        raw = [int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in raw]
    ints = isinstance(raw, list) and len(raw) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    if not ints:
        problems.append(f"{where}: layer_range must be two integers [start, end), not {short_repr(raw)}")
        return None
    start, end = raw
    if start < 0 or end <= start:
        problems.append(f"{where}: layer_range {short_repr(raw)} is empty or negative (need 0 <= start < end)")
        return None
    return start, end


def _module_models(raw: Any, where: str, problems: list[str]) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: models must be a non-empty list of {{model: PATH}}")
        return ()
    out = []
    for j, item in enumerate(raw):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            problems.append(f"{where}.models[{j}] needs a 'model' path or repo id")
            continue
        _unknown_keys(item, {"model", "parameters"}, f"{where}.models[{j}]", problems)
        out.append((item["model"], _parameters(item, f"{where}.models[{j}]", problems)))
    return tuple(out)


def _parameters(item: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    params = item.get("parameters") or {}
    if not isinstance(params, Mapping):
        problems.append(f"{where}: parameters must be a mapping of name: value")
        return {}
    return dict(params)


def _unknown_keys(item: Mapping[str, Any], known: set[str], where: str, problems: list[str]) -> None:
    unknown = sorted((str(k) for k in item if k not in known), key=str)
    if unknown:
        problems.append(f"{where}: unknown keys {short_repr(unknown)} (known: {', '.join(sorted(known))})")
