"""Parameter values as recipes write them, resolved to one number per tensor.

A value is one of (mergekit's forms, with its semantics):

- a scalar: ``0.5``, ``true``;
- a gradient, a list of numbers: for the layer with index ``l`` of ``L``
  numbered layers, ``t = l / (L - 1)`` and the value is the linear
  interpolation of the list at ``t * (len - 1)``; tensors outside numbered
  layers (embeddings, final norm, head) use ``t = 0``;
- a filter list, ``[{filter: self_attn, value: 0.3}, {value: 0.5}]``: the first
  entry whose filter is a substring of the tensor name (or that has no
  filter) gives the value, which may itself be a scalar or a gradient.
  ``filter: "re:..."`` matches a regular expression and ``filter: "glob:..."``
  a shell pattern instead of a substring (this tool's extension).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mergekit_like.errors import short_repr

Scalar = float | int | bool | str

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|encoder\.layer|decoder\.layers)\.(\d+)\.")


@dataclass(frozen=True)
class LayerPosition:
    """Where a tensor sits among the model's numbered layers (``index`` None outside them)."""

    index: int | None
    count: int
    # Set for a layer of a slice, whose gradients run over the slice (mergekit: 1 for a one-layer slice).
    slice_t: float | None = None

    @property
    def t(self) -> float:
        """The gradient position in [0, 1]; 0 outside numbered layers."""
        if self.slice_t is not None:
            return self.slice_t
        if self.index is None or self.count <= 1:
            return 0.0
        return self.index / (self.count - 1)


def layer_index(tensor_name: str) -> int | None:
    """The numbered layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_count(tensor_names: Iterable[str]) -> int:
    """The number of numbered layers: one more than the largest layer index found."""
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def is_gradient(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)


def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def interpolate_gradient(values: list[float], t: float) -> float:
    """mergekit's gradient: linear interpolation of ``values`` at ``t * (len - 1)``."""
    scaled = t * (len(values) - 1)
    low = math.floor(scaled)
    frac = scaled - low
    if low >= len(values) - 1:
        return float(values[-1])
    return values[low] * (1 - frac) + values[low + 1] * frac


def filter_matches(pattern: str | None, tensor_name: str) -> bool:
    if not pattern or pattern == "*":  # mergekit's "*" matches every tensor, as no filter does
        return True
    if pattern.startswith("re:"):
        return re.search(pattern[3:], tensor_name) is not None
    if pattern.startswith("glob:"):
        return fnmatch.fnmatchcase(tensor_name, pattern[5:])
    return pattern in tensor_name


class NoValue(Exception):
    """No filter entry matched the tensor."""


def resolve_value(value: Any, tensor_name: str, position: LayerPosition) -> Scalar:
    """The value a parameter takes for one tensor."""
    if is_filter_list(value):
        for entry in value:
            if filter_matches(entry.get("filter"), tensor_name):
                return resolve_value(entry.get("value"), tensor_name, position)
        raise NoValue(tensor_name)
    if is_gradient(value):
        return interpolate_gradient([float(v) for v in value], position.t)
    return value


_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def unquoted(value: Any, kind: type) -> Any:
    """``value`` with quoted numbers and booleans read as mergekit reads them (``"0.5"`` -> 0.5).

    mergekit validates each value against its parameter's type, which turns a number or
    boolean written as a string into one; a string that is not one stays as written (and is
    refused by the parameter's check). Gradients and filter lists are unquoted entry by entry.
    """
    if isinstance(value, list):
        return [unquoted(v, kind) for v in value]
    if isinstance(value, Mapping):
        return {k: unquoted(v, kind) if k == "value" else v for k, v in value.items()}
    if kind is bool and type(value) is int and value in (0, 1):
        return bool(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind is bool:
        lowered = text.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else value
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    if kind is int:
        try:
            return int(text)
        except ValueError:
            return value
    return value


def check_value_form(value: Any) -> str | None:
    """Why ``value`` is not a valid parameter value, or None if it is."""
    if isinstance(value, (bool, int, float, str)):
        return None
    if is_gradient(value):
        return None
    if is_filter_list(value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown:
                return f"filter entry has unknown keys {short_repr(sorted(unknown, key=str))} (use filter and value)"
            if "value" not in entry:
                return "filter entry has no 'value'"
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                return f"filter {short_repr(entry['filter'])} is not a string"
            problem = check_value_form(entry["value"])
            if problem:
                return problem
            if isinstance(entry.get("filter"), str) and entry["filter"].startswith("re:"):
                try:
                    re.compile(entry["filter"][3:])
                except re.error as exc:
                    return f"filter {short_repr(entry['filter'])} is not a valid regular expression ({exc})"
        return None
    if isinstance(value, list) and not value:
        return "empty list"
    return f"{short_repr(value)} is neither a number, a list of numbers (gradient) nor a list of {{filter, value}}"


def numeric_values(value: Any) -> list[Any]:
    """Every leaf value a parameter can take, for range checks before any tensor is read."""
    if is_filter_list(value):
        out: list[Any] = []
        for entry in value:
            out += numeric_values(entry.get("value"))
        return out
    if is_gradient(value):
        return list(value)
    return [value]


def too_large_for_float(value: Any) -> bool:
    """Whether ``value`` is an integer no float can hold (``10**400``): math on it overflows."""
    if not _is_number(value) or isinstance(value, float):
        return False
    try:
        float(value)
    except OverflowError:
        return True
    return False


def expanded_size_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` values, counted as expanded.

    YAML aliases are shared references, so a tiny file can name 9**9 values; every traversal
    (validation, resolving, a repr) walks the expanded tree. A shared value is counted each
    time it is reached, and counting stops at ``limit``, so this takes at most ``limit`` steps
    and never recurses (a recursive alias, ``&a [*a]``, simply exceeds any limit).
    """
    count = 1
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            count += 2 * len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            count += len(item)
        else:
            continue
        # Counted before they are stacked: the stack never holds more than ``limit`` values.
        if count > limit:
            return True
        if isinstance(item, Mapping):
            stack += [*item.keys(), *item.values()]
        else:
            stack += item
    return False
