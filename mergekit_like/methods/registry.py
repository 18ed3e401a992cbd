"""The merge methods this tool has: one module per method, listed here, one line each.

Each module ``mergekit_like/methods/NAME.py`` declares its method with
:func:`~mergekit_like.methods.declaration.merge_method` on a kernel also named
``NAME``. Adding a method is that file plus its name below.
"""

from __future__ import annotations

import functools
import importlib

from mergekit_like.methods.declaration import MergeMethod

BUILTIN = (
    "linear",
    "uniform_soup",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "magnitude_prune",
    "slerp",
    "wise_ft",
    "model_stock",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "passthrough",
)


def build_registry(methods: tuple[MergeMethod, ...]) -> dict[str, MergeMethod]:
    """Methods by name, in order; a name declared twice is an error."""
    registry: dict[str, MergeMethod] = {}
    for method in methods:
        if method.name in registry:
            raise ValueError(f"merge method {method.name!r} is registered twice")
        registry[method.name] = method
    return registry


def _declared(module_name: str) -> MergeMethod:
    module = importlib.import_module(f"{__package__}.{module_name}")
    method = getattr(module, module_name, None)
    if not isinstance(method, MergeMethod):
        raise TypeError(f"{module.__name__} must declare its method with @merge_method on a kernel "
                        f"named {module_name}")
    return method


@functools.cache
def _registry() -> dict[str, MergeMethod]:
    return build_registry(tuple(_declared(name) for name in BUILTIN))


def get_method(name: str) -> MergeMethod:
    """The method ``name``; raises KeyError listing the known ones."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_registry()))}") from None


def all_methods() -> dict[str, MergeMethod]:
    """Every method, by name, sorted."""
    return dict(sorted(_registry().items()))
