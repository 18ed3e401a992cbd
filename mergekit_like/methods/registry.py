"""The one registry of merge methods, fed by a decorator that reads each kernel's signature.

A kernel is a pure function of tensors and numbers::

    @merge_method("linear", paper=..., base=BaseUse.OPTIONAL)
    def linear(tensors: list[Tensor], *, weight: PerModel[float], normalize: bool = True) -> Tensor

- ``tensors`` are the models' tensors (in the compute dtype, on the compute device);
- a ``base: Tensor`` keyword makes the base model's tensor an input;
- every other keyword-only parameter is a method parameter: ``PerModel[X]``
  ones take one value per model (a recipe may still give one value for all),
  the rest one value per tensor; a default makes a parameter optional;
- ``generator: torch.Generator`` asks the engine for a generator seeded by the
  run's seed and the tensor's name (reproducible randomness);
- ``thresholds: list[float] | None`` asks for each model's k-th largest task-vector
  magnitude over the whole model (an extra two-pass scan; TIES ``trim_scope: model``).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class PerModel(list, Generic[T]):  # type: ignore[type-arg]
    """Annotation: one value per input model (a plain list at run time)."""


class BaseUse(Enum):
    NONE = "none"  # the base model is not an input (it may still be a listed model)
    OPTIONAL = "optional"
    REQUIRED = "required"


_CONTEXT_ARGS = {"tensors", "base", "generator", "thresholds"}


@dataclass(frozen=True)
class ParamSpec:
    """A method parameter as read from the kernel's signature."""

    name: str
    kind: type  # float, int, bool or str
    per_model: bool
    default: Any = inspect.Parameter.empty
    choices: tuple[str, ...] | None = None

    @property
    def recipe_name(self) -> str:
        """The key in recipes: ``lambda_`` in Python is ``lambda`` in YAML."""
        return self.name.rstrip("_")

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel, parameters and requirements."""

    name: str
    kernel: Callable[..., torch.Tensor]
    params: dict[str, ParamSpec]
    base: BaseUse
    min_models: int
    max_models: int | None
    paper: str
    description: str
    uses_generator: bool
    # Takes ``thresholds``: each model's whole-model top-k magnitude (TIES trim_scope: model).
    uses_model_topk: bool = False
    # Accepted for compatibility with mergekit recipes, and ignored (see COMPATIBILITY_PARAMS).
    ignored_params: frozenset[str] = frozenset()
    # A parameter whose list value means "one output per value" rather than a gradient.
    sweep_param: str | None = None
    # Each output entry depends only on the same entry of the inputs, so large tensors
    # may be merged block by block.
    elementwise: bool = False
    # The kernel uses each model only through ``x - base``, which type promotion computes in
    # base's dtype: models may be handed over in their stored dtype when it widens exactly
    # to the compute dtype (bf16 to float32), saving a cast and half their memory.
    inputs_as_stored: bool = False

    def __call__(self, tensors: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return self.kernel(tensors, **kwargs)


# Parameters mergekit declares for a whole method family (its generalized task arithmetic)
# although some members never read them: task_arithmetic neither sparsifies (density,
# rescale) nor elects signs (int8_mask), and int8_mask only picks the dtype of a sign mask
# that is compared, never multiplied, so it changes no number in any method. A method
# lists the ones it ignores; recipes may set them, and their values are checked as
# mergekit checks them.
COMPATIBILITY_PARAMS: dict[str, ParamSpec] = {
    "int8_mask": ParamSpec("int8_mask", bool, per_model=False, default=False),
    "rescale": ParamSpec("rescale", bool, per_model=False, default=False),
    "density": ParamSpec("density", float, per_model=True, default=1.0),
}

_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    paper: str,
    description: str,
    base: BaseUse | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    ignored_params: tuple[str, ...] = (),
    sweep_param: str | None = None,
    elementwise: bool = False,
    inputs_as_stored: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Registers a kernel as merge method ``name``; a duplicate name is an error."""

    def register(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        hints = typing.get_type_hints(kernel)
        signature = inspect.signature(kernel)
        params: dict[str, ParamSpec] = {}
        for parameter in signature.parameters.values():
            if parameter.name in _CONTEXT_ARGS:
                continue
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{kernel.__name__}: parameter {parameter.name} must be keyword-only")
            spec = _param_spec(parameter, hints[parameter.name])
            params[spec.recipe_name] = spec
        _check_ignored(kernel.__name__, ignored_params, params)
        uses_base = "base" in signature.parameters
        base_use = base or (BaseUse.REQUIRED if uses_base else BaseUse.NONE)
        kernel = _broadcasting_per_model(kernel, [p for p in params.values() if p.per_model])
        _REGISTRY[name] = MergeMethod(
            name=name, kernel=kernel, params=params, base=base_use, min_models=min_models,
            max_models=max_models, paper=paper, description=description,
            uses_generator="generator" in signature.parameters,
            uses_model_topk="thresholds" in signature.parameters,
            ignored_params=frozenset(ignored_params), sweep_param=sweep_param,
            elementwise=elementwise, inputs_as_stored=inputs_as_stored,
        )
        return kernel

    return register


def _check_ignored(kernel: str, ignored: tuple[str, ...], params: dict[str, ParamSpec]) -> None:
    for name in ignored:
        if name not in COMPATIBILITY_PARAMS:
            raise TypeError(f"{kernel}: ignored parameter {name!r} is not one of {sorted(COMPATIBILITY_PARAMS)}")
        if name in params:
            raise TypeError(f"{kernel}: parameter {name!r} is both a kernel parameter and ignored")


def _broadcasting_per_model(
    kernel: Callable[..., torch.Tensor], per_model: list[ParamSpec]
) -> Callable[..., torch.Tensor]:
    """Lets a per-model parameter be given (or defaulted) as one value for all models."""
    if not per_model:
        return kernel

    @functools.wraps(kernel)
    def wrapper(tensors: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        for spec in per_model:
            value = kwargs.get(spec.name, spec.default)
            if value is not inspect.Parameter.empty and not isinstance(value, (list, tuple)):
                kwargs[spec.name] = [value] * len(tensors)
        return kernel(tensors, **kwargs)

    return wrapper


def _param_spec(parameter: inspect.Parameter, hint: Any) -> ParamSpec:
    per_model = typing.get_origin(hint) is PerModel
    inner = typing.get_args(hint)[0] if per_model else hint
    # Optional[X] parameters read as X.
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(inner) if a is not type(None))
    choices = None
    if typing.get_origin(inner) is typing.Literal:
        choices = tuple(typing.get_args(inner))
        inner = str
    if inner not in (float, int, bool, str):
        raise TypeError(f"parameter {parameter.name}: unsupported annotation {hint!r}")
    return ParamSpec(parameter.name, inner, per_model, parameter.default, choices)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; raises KeyError listing the known ones."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_methods() -> dict[str, MergeMethod]:
    _load_builtin_methods()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_methods() -> None:
    # Importing the package's modules runs their decorators once.
    import mergekit_like.methods.builtin  # noqa: F401
