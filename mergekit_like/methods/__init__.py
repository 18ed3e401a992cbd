"""Merge methods: one file per method, pure tensor kernels, one registry."""

from mergekit_like.methods.registry import (
    BaseUse,
    MergeMethod,
    ParamSpec,
    PerModel,
    all_methods,
    get_method,
    merge_method,
)

__all__ = ["BaseUse", "MergeMethod", "ParamSpec", "PerModel", "all_methods", "get_method", "merge_method"]
