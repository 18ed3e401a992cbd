"""How a merge method is declared: the one place its rules live.

A kernel is a pure function of tensors and numbers; its signature, read once by
:func:`merge_method`, declares everything the recipe checker, the planner and the
engine need, so none of them names a method or a method parameter::

    @merge_method("ties", paper=..., description=..., prepass=MODEL_TOP_K)
    def ties(tensors: list[Tensor], *, base: Tensor,
             weight: Annotated[PerModel[float], Typical(low=0)],
             density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
             lambda_: float = 1.0, ...) -> Tensor

- ``tensors``: the models' tensors (compute dtype, compute device);
- ``base``: the base model's tensor (its presence makes a base required, unless
  the decorator says ``base=BaseUse.OPTIONAL``);
- ``generator``: a generator seeded by the run's seed and the tensor's name;
- ``executor``: a thread pool for per-model (or per-unit) work (absent when called directly);
- the keyword named by a declared :class:`WholeModelPass` receives its result, and the one named
  by a declared :class:`TensorPass` its result for the row block in hand (when the tensor is merged
  in row blocks; absent when it is merged whole);
- every other keyword-only parameter is a method parameter. ``PerModel[X]`` takes
  one value per model (a recipe may give one for all; its default is written
  ``each(value)``); ``Range`` bounds every value; ``Typical`` warns outside a
  usual range; ``Sweep`` makes a list value mean one output per value. ``Literal``
  annotations list the accepted strings; a default makes a parameter optional.
  ``X | None`` admits None as a value (``scale: PerModel[float | None] = each(None)``:
  no value means "leave the tensor as it is", which no number says).

Rules on several parameters at once are declared beside the kernel: ``checks`` refuse a
tensor's combination before any tensor is read, ``warns`` warn about one once per recipe, and
an ``amplification`` measures what only the tensors tell (how far the result strays), which the
engine reports once per merge.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Protocol, TypeVar

import torch

from mergekit_like.errors import short_repr

T = TypeVar("T")


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PerModel"


PER_MODEL = _PerModelMarker()
# One value per input model; at run time a sequence as long as ``tensors``.
PerModel = Annotated[Sequence[T], PER_MODEL]


class _Each(tuple):  # type: ignore[type-arg]
    """The default of a per-model parameter: one value, given to every model."""


def each(value: T) -> Sequence[T]:
    """Declares a per-model parameter's default: ``density: PerModel[float] = each(1.0)``."""
    return _Each((value,))


@dataclass(frozen=True)
class Range:
    """Every value must lie in [low, high] (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None

    def problem(self, value: float) -> str | None:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"{short_repr(value)} is outside [{low}, {high}]"
        return None


@dataclass(frozen=True)
class Typical:
    """Values outside [low, high] are allowed but unusual for this method: a warning says why."""

    low: float | None = None
    high: float | None = None
    why: str = "unusual for this method"

    def contains(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class Sweep:
    """A list value is not a gradient but a sweep: one output per value, from one read pass."""


class BaseUse(Enum):
    NONE = "none"  # the base model is not an input (it may still be a listed model)
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True)
class ParamSpec:
    """A method parameter as read from the kernel's signature."""

    name: str
    kind: type  # float, int, bool or str
    per_model: bool
    default: Any = inspect.Parameter.empty
    choices: tuple[str, ...] | None = None
    bounds: Range | None = None
    typical: Typical | None = None
    sweep: bool = False
    # Declared ``X | None``: None is a value of its own (mergekit's ``Optional[float]``), not a
    # missing one, so it passes the checks and reaches the kernel as None.
    optional: bool = False

    @property
    def recipe_name(self) -> str:
        """The key in recipes: ``lambda_`` in Python is ``lambda`` in YAML."""
        return self.name.rstrip("_")

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def leaf_problem(self, leaf: Any) -> str | None:
        """Why one value (a scalar, after gradients and filters are unfolded) does not fit."""
        if leaf is None and self.optional:
            return None
        if self.kind is bool:
            return None if isinstance(leaf, bool) else f"{short_repr(leaf)} is not true or false"
        if self.kind is str:
            if self.choices and leaf not in self.choices:
                return f"{short_repr(leaf)} is not one of {', '.join(self.choices)}"
            return None
        if not isinstance(leaf, (int, float)) or isinstance(leaf, bool):
            return f"{short_repr(leaf)} is not a number"
        if not math.isfinite(leaf):
            return f"{short_repr(leaf)} is not a finite number"
        return self.bounds.problem(leaf) if self.bounds else None

    def coerce(self, value: Any) -> Any:
        """A resolved value as the kernel takes it: ``kind(value)``, and None kept if optional."""
        return None if value is None and self.optional else self.kind(value)


class Reduction(Protocol):
    """The state of a :class:`WholeModelPass` over one run."""

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        """Takes one merged tensor of every model (and the base), as the kernel gets them: the base
        in the compute dtype, the models in it too, or in their stored dtype for a method
        declared ``inputs_as_stored``."""

    def end_pass(self, pass_index: int) -> None: ...

    def result(self) -> Any:
        """What the kernel receives under the pass's keyword."""


class WholeModelPass(Protocol):
    """A reduction over every merged tensor of the model, run before the merge by the engine.

    The engine knows only this interface: how many read passes, whether a plan needs
    it, what its plan must satisfy, and a keyword under which the kernel gets the result.
    """

    @property
    def keyword(self) -> str:
        """The kernel parameter that receives the result."""

    @property
    def passes(self) -> int:
        """How many read passes over the model the reduction needs."""

    def needed(self, params: Sequence[Mapping[str, Any]]) -> bool:
        """Whether a plan whose merged tensors resolve to ``params`` (kernel names) needs the pass."""

    def problems(self, params: Sequence[Mapping[str, Any]]) -> list[str]:
        """What is wrong with such a plan for the pass (checked before any tensor is read)."""

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device) -> Reduction:
        """A fresh reduction over ``numel`` elements per model, from the first merged tensor's
        parameters (:meth:`problems` refuses plans where the pass's parameters differ)."""


class TensorReduction(Protocol):
    """The state of a :class:`TensorPass` over one tensor (one variant's parameters)."""

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        """Takes one row block of every model (and the base) as the kernel gets them; the blocks of
        a pass come in row order."""

    def end_pass(self, pass_index: int) -> None: ...

    def block(self, rows: tuple[int, int]) -> Any:
        """What the kernel receives under the pass's keyword for the row block ``rows``; asked for
        in row order, once per block, after the passes."""


class TensorPass(Protocol):
    """What a whole-tensor method needs to know of a tensor before merging it row block by row block.

    A top-k needs the k-th largest magnitude; the engine reads the tensor's row blocks
    :meth:`passes` times, feeds them to a :class:`TensorReduction`, then merges the blocks
    with the reduction's result for each. A method merges a tensor in row blocks only where
    :meth:`blockwise` says its parameters allow it, and whole otherwise.
    """

    @property
    def keyword(self) -> str:
        """The kernel parameter that receives the result for a block."""

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        """Whether a tensor with these kernel parameters merges in row blocks to the bits of a whole merge
        on a device of this type (``cpu``, ``cuda``)."""

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        """How many read passes over the tensor's row blocks the reduction needs (0: none)."""

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None) -> TensorReduction:
        """A fresh reduction over a tensor of ``numel`` elements with these kernel parameters (and, for a
        method that draws, the tensor's generator). Started for every tensor merged in row blocks,
        also where :meth:`passes` is 0: its blocks still come from :meth:`TensorReduction.block`."""


def passes_whole_tensors(tensor_pass: TensorPass, params: Mapping[str, Any]) -> bool:
    """Whether a tensor merged whole with these parameters also gets its pass's result, the reduction
    fed the tensor already in memory (no read of its own).

    A pass opts in with a method ``whole(params) -> bool``, where its result serves more than the
    kernel (model_stock's amplification factor comes from the sums that give t): one computation
    for both, and the same for a tensor merged whole as for one merged in row blocks.
    """
    whole = getattr(tensor_pass, "whole", None)
    return bool(whole(params)) if whole is not None else False


# The usual weights of an average: a negative one extrapolates (task arithmetic's negation is on purpose).
NONNEGATIVE_WEIGHT = Typical(
    low=0, why="will extrapolate rather than average (negative weights are meant for task_arithmetic)")

# A check on one tensor's resolved parameters (kernel names): a problem, or None.
TensorCheck = Callable[[Mapping[str, Any]], "str | None"]

# A rule on one tensor's resolved parameters (kernel names) that the method allows but rarely
# means, such as weights that nearly cancel: a one-line warning, or None. It refuses nothing;
# the recipe checker runs it once per recipe (on the values every tensor gets).
ParamWarning = Callable[[Mapping[str, Any]], "str | None"]

# An output this many times larger than its inputs (or moved this many times farther than any
# task vector) is warned about: below it, extrapolating on purpose (a weight of -0.5, task
# arithmetic's negation) is common; above it, rounding noise of the inputs becomes visible change.
AMPLIFICATION_WARN = 10.0


def factor_text(factor: float) -> str:
    """A factor as a warning writes it: ``19``, ``1.05e3``, ``2e6``."""
    text = f"{factor:.3g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class Amplification:
    """How far a kernel's result strays from its inputs, which only the tensors tell (model_stock's
    ratio grows without bound as its task vectors turn opposite).

    ``measure`` is a pure function called as ``measure(result, tensors, **kernel_kwargs)`` with the
    kernel's result in the compute dtype; it returns a factor, 1 meaning "no farther than the
    inputs". The engine feeds every merged tensor to an :class:`AmplificationLog`, which warns once
    per merge with the largest factor and its tensor when it exceeds ``warn_above``. ``says`` is
    the warning, formatted with ``method``, ``tensor`` and ``factor``.
    """

    measure: Callable[..., float]
    says: str
    warn_above: float = AMPLIFICATION_WARN


@dataclass(frozen=True)
class MergeMethod:
    """A declared merge method: its kernel, parameters and requirements."""

    name: str
    kernel: Callable[..., torch.Tensor]  # broadcasts per-model scalars, then calls the pure function
    params: dict[str, ParamSpec]
    base: BaseUse
    min_models: int
    max_models: int | None
    paper: str
    description: str
    uses_generator: bool
    uses_executor: bool = False
    # Accepted for compatibility with mergekit recipes, and ignored (see COMPATIBILITY_PARAMS).
    ignored_params: frozenset[str] = frozenset()
    # Each output entry depends only on the same entry of the inputs, so large tensors
    # may be merged block by block.
    elementwise: bool = False
    # The kernel uses each model only through ``x - base``, which type promotion computes in
    # base's dtype: models may be handed over in their stored dtype when it widens exactly
    # to the compute dtype (bf16 to float32), saving a cast and half their memory.
    inputs_as_stored: bool = False
    prepass: WholeModelPass | None = None
    # A per-tensor pre-pass that lets the method merge large tensors in row blocks.
    tensor_pass: TensorPass | None = None
    checks: tuple[TensorCheck, ...] = ()
    # The kernel's result is at least this precise whatever the compute dtype (arcee_fusion
    # multiplies by a float32 mask); a recipe whose dtype sets the output keeps that precision,
    # as mergekit writes the kernel's result as it is.
    result_dtype: torch.dtype | None = None
    # Parameter combinations allowed but rarely meant (linear's weights that nearly cancel).
    warns: tuple[ParamWarning, ...] = ()
    # Measured on every tensor, and on every row block of a tensor merged in row blocks (the
    # measure gets the tensor pass's keyword: the worst block's factor must be the tensor's).
    amplification: Amplification | None = None

    def __call__(self, tensors: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return self.kernel(tensors, **kwargs)

    def merges_row_blocks(self, params: Sequence[Mapping[str, Any]], compute_dtype: torch.dtype,
                          device_type: str) -> bool:
        """Whether a tensor with these kernel parameters (one set per variant) may merge in row blocks."""
        if self.elementwise:
            return True
        return self.tensor_pass is not None and all(self.tensor_pass.blockwise(p, compute_dtype, device_type)
                                                    for p in params)

    @property
    def sweep_param(self) -> str | None:
        """The parameter whose list value means one output per value, if any."""
        return next((key for key, spec in self.params.items() if spec.sweep), None)

    def spec(self, key: str) -> ParamSpec | None:
        """A parameter by its recipe name: the kernel's, or an ignored compatibility one."""
        if key in self.params:
            return self.params[key]
        return COMPATIBILITY_PARAMS[key] if key in self.ignored_params else None

    def model_count_problem(self, inputs: int, *, with_base: bool = True) -> str | None:
        """Why ``inputs`` models besides the base (``with_base``: one is given) do not suit this method."""
        if self.base is BaseUse.REQUIRED and self.min_models == self.max_models == 1 and inputs != 1:
            given = f"{inputs + 1}" if with_base else f"{inputs} and no base_model"
            return f"{self.name} needs exactly two models, one of them the base_model; got {given}"
        if inputs < self.min_models:
            return f"{self.name} needs at least {self.min_models} model(s) besides the base; got {inputs}"
        if self.max_models is not None and inputs > self.max_models:
            return f"{self.name} takes at most {self.max_models} model(s) besides the base; got {inputs}"
        return None


# Parameters mergekit declares for a whole method family (its generalized task arithmetic)
# although some members never read them: task_arithmetic neither sparsifies (density,
# rescale) nor elects signs (int8_mask), and int8_mask only picks the dtype of a sign mask
# that is compared, never multiplied, so it changes no number in any method. A method
# lists the ones it ignores; recipes may set them, and their values are checked as
# mergekit checks them.
COMPATIBILITY_PARAMS: dict[str, ParamSpec] = {
    "int8_mask": ParamSpec("int8_mask", bool, per_model=False, default=False),
    "rescale": ParamSpec("rescale", bool, per_model=False, default=False),
    "density": ParamSpec("density", float, per_model=True, default=1.0, bounds=Range(0, 1)),
}

_CONTEXT_ARGS = {"tensors", "base", "generator", "executor"}


def merge_method(
    name: str,
    *,
    paper: str,
    description: str,
    base: BaseUse | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    ignored_params: tuple[str, ...] = (),
    elementwise: bool = False,
    inputs_as_stored: bool = False,
    prepass: WholeModelPass | None = None,
    tensor_pass: TensorPass | None = None,
    checks: tuple[TensorCheck, ...] = (),
    result_dtype: torch.dtype | None = None,
    warns: tuple[ParamWarning, ...] = (),
    amplification: Amplification | None = None,
) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Declares a kernel as merge method ``name`` (listed in :mod:`mergekit_like.methods.registry`)."""

    def declare(kernel: Callable[..., torch.Tensor]) -> MergeMethod:
        hints = typing.get_type_hints(kernel, include_extras=True)
        signature = inspect.signature(kernel)
        context = (_CONTEXT_ARGS | ({prepass.keyword} if prepass is not None else set())
                   | ({tensor_pass.keyword} if tensor_pass is not None else set()))
        params: dict[str, ParamSpec] = {}
        for parameter in signature.parameters.values():
            if parameter.name in context:
                continue
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{kernel.__name__}: parameter {parameter.name} must be keyword-only")
            spec = _param_spec(parameter, hints[parameter.name])
            params[spec.recipe_name] = spec
        _check_ignored(kernel.__name__, ignored_params, params)
        if sum(spec.sweep for spec in params.values()) > 1:
            raise TypeError(f"{kernel.__name__}: at most one parameter may be a Sweep")
        if amplification is not None and elementwise:
            raise TypeError(f"{kernel.__name__}: an element-wise method cannot declare an amplification "
                            "(a factor over a block of entries is not the tensor's)")
        if elementwise and tensor_pass is not None:
            raise TypeError(f"{kernel.__name__}: an element-wise method needs no tensor pass")
        base_use = base or (BaseUse.REQUIRED if "base" in signature.parameters else BaseUse.NONE)
        return MergeMethod(
            name=name, kernel=_broadcasting_per_model(kernel, [p for p in params.values() if p.per_model]),
            params=params, base=base_use, min_models=min_models, max_models=max_models, paper=paper,
            description=description, uses_generator="generator" in signature.parameters,
            uses_executor="executor" in signature.parameters, ignored_params=frozenset(ignored_params),
            elementwise=elementwise, inputs_as_stored=inputs_as_stored, prepass=prepass, tensor_pass=tensor_pass,
            checks=checks, result_dtype=result_dtype, warns=warns, amplification=amplification,
        )

    return declare


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
    markers: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        markers = hint.__metadata__
        hint = typing.get_args(hint)[0]
    per_model = any(m is PER_MODEL for m in markers)
    inner = typing.get_args(hint)[0] if per_model else hint
    # Optional[X] parameters read as X, with None as a further value.
    optional = False
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        optional = type(None) in typing.get_args(inner)
        inner = next(a for a in typing.get_args(inner) if a is not type(None))
    choices = None
    if typing.get_origin(inner) is typing.Literal:
        choices = tuple(typing.get_args(inner))
        inner = str
    if inner not in (float, int, bool, str):
        raise TypeError(f"parameter {parameter.name}: unsupported annotation {hint!r}")
    default = parameter.default
    if per_model and default is not inspect.Parameter.empty:
        if not isinstance(default, _Each):
            raise TypeError(f"parameter {parameter.name}: a per-model default is written each(value)")
        (default,) = default
    return ParamSpec(
        parameter.name, inner, per_model, default, choices,
        bounds=next((m for m in markers if isinstance(m, Range)), None),
        typical=next((m for m in markers if isinstance(m, Typical)), None),
        sweep=any(isinstance(m, Sweep) for m in markers),
        optional=optional,
    )


def weights_do_not_cancel(params: Mapping[str, Any]) -> str | None:
    """A normalised weighted sum must not divide by a zero weight sum."""
    if params.get("normalize") and sum(params.get("weight", [1])) == 0:
        return "the weights sum to zero and normalize is on (set normalize: false or change the weights)"
    return None


class AmplificationLog:
    """The largest declared amplification of each method over one merge, for one warning each.

    The engine calls :meth:`observe` with every merged tensor's kernel result and arguments and
    logs :meth:`warnings` once the merge is written; the kernels stay pure.
    """

    def __init__(self) -> None:
        self._worst: dict[str, tuple[float, str, Amplification]] = {}

    def observe(self, method: MergeMethod, tensor: str, result: torch.Tensor, tensors: list[torch.Tensor],
                kwargs: Mapping[str, Any]) -> None:
        declared = method.amplification
        if declared is None:
            return
        factor = declared.measure(result, tensors, **kwargs)
        if math.isnan(factor):
            return  # a non-finite result is the output checks' to report, not a factor
        worst = self._worst.get(method.name)
        if worst is None or factor > worst[0]:
            self._worst[method.name] = (factor, tensor, declared)

    def warnings(self) -> list[str]:
        """One line per method whose worst tensor exceeds its threshold."""
        return [declared.says.format(method=name, tensor=tensor, factor=factor_text(factor))
                for name, (factor, tensor, declared) in self._worst.items() if factor > declared.warn_above]
