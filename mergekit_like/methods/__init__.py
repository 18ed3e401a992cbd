"""Merge methods: one file per method, pure tensor kernels, declared once, listed in the registry."""

from mergekit_like.methods.declaration import (
    BaseUse,
    MergeMethod,
    ParamSpec,
    PerModel,
    Range,
    Sweep,
    Typical,
    WholeModelPass,
    each,
    merge_method,
)
from mergekit_like.methods.registry import all_methods, get_method

__all__ = [
    "BaseUse", "MergeMethod", "ParamSpec", "PerModel", "Range", "Sweep", "Typical", "WholeModelPass",
    "all_methods", "each", "get_method", "merge_method",
]
