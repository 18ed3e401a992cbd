"""What each output tensor of a slices or modules recipe is made from, before any tensor is read.

mergekit's rules, without its per-architecture files: the tensors before the layers
(input embeddings) are merged by the first slice's recipe from its sources, then each
slice's layers in order, one output layer per offset into its ranges (gradients run over
the slice: ``t = offset / (layers - 1)``, 1 for a one-layer slice), then the tensors after
the layers (final norm, head) by the last slice's recipe from its sources. Output layers are
numbered from 0 in the order they are stacked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_like.errors import RecipeError
from mergekit_like.io.reader import Checkpoint
from mergekit_like.merge.layers import (
    LayerLayout,
    LayerStack,
    Module,
    find_layout,
    find_modules,
    module_named,
    restacked_config,
)
from mergekit_like.merge.parameters import LayerPosition
from mergekit_like.merge.recipe import MergeRecipe, SliceRecipe
from mergekit_like.merge.slices import OutputSlice, SliceSource
from mergekit_like.methods import BaseUse


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: the recipe that merges it and the tensor read from each model."""

    name: str
    recipe: MergeRecipe
    sources: Mapping[str, str]  # model ref -> the name of the tensor read from it
    position: LayerPosition

    @property
    def models(self) -> list[str]:
        """The models merged, in kernel order (the base not among them)."""
        return [m.model for m in self.recipe.inputs]

    @property
    def base(self) -> str | None:
        """The model whose tensor the kernel gets as ``base``, if its method takes one."""
        return self.recipe.base_model if self.recipe.method.base is not BaseUse.NONE else None

    @property
    def refs(self) -> list[str]:
        """Every model read, in kernel order: the inputs, then the base."""
        return self.models + ([self.base] if self.base is not None else [])

    @property
    def reference(self) -> str:
        """The model this tensor follows (shape, integer values, default dtype): its base, else its first."""
        base = self.recipe.base_model
        return base if base is not None and base in self.sources else next(iter(self.sources))


@dataclass(frozen=True)
class LayeredPlan:
    jobs: list[TensorJob]
    config: dict[str, Any] | None  # the output's config.json, its layer count and per-layer lists restacked


BEFORE, AFTER = LayerPosition(None, 0), LayerPosition(None, 0)  # mergekit resolves both at t = 0


def plan_layers(
    recipe: MergeRecipe, checkpoints: Mapping[str, Checkpoint], configs: Mapping[str, Mapping[str, Any] | None],
    config_source: str,
) -> LayeredPlan:
    """Every output tensor of a layered recipe; :class:`RecipeError` listing every problem found.

    The output's config is ``config_source``'s (the base, else the first model, as mergekit's),
    with the layer count and per-layer lists of each sliced module rebuilt.
    """
    layouts = {ref: find_layout(ref, c.names(), configs.get(ref)) for ref, c in checkpoints.items()}
    views = recipe.slice_recipes()
    if recipe.slices:
        parts = [_single_module(views, layouts)]
    else:
        parts = _modules(recipe, views, layouts)
    jobs: list[TensorJob] = []
    config = dict(configs.get(config_source) or {}) or None
    shared_keys = _shared_config_keys(layouts.get(config_source))
    for part in parts:
        jobs += part.jobs
        if part.stack is not None and part.stack.config_key in shared_keys:
            raise RecipeError([f"'{config_source}': config.json's {part.stack.config_key} counts the layers of more "
                               "than one stack, so the output's count cannot be set for one of them alone"])
        if config is not None and part.stack is not None and part.stack.config_key is not None and part.layers:
            layers = [(configs.get(ref) or {}, index) for ref, index in part.layers]
            config = restacked_config(config, part.stack.config_key, layers)
    return LayeredPlan(jobs, config)


def _shared_config_keys(layout: LayerLayout | None) -> set[str]:
    keys = [s.config_key for s in layout.stacks if s.config_key is not None] if layout is not None else []
    return {k for k in keys if keys.count(k) > 1}


@dataclass
class _Part:
    """The jobs of one module, and the (model, layer) its output layers come from."""

    jobs: list[TensorJob]
    stack: LayerStack | None
    layers: list[tuple[str, int]]


def _single_module(views: Sequence[SliceRecipe], layouts: Mapping[str, LayerLayout]) -> _Part:
    problems: list[str] = []
    stacks: dict[str, LayerStack] = {}
    for ref in {s.model for v in views if v.slice for s in v.slice.sources}:
        try:
            stacks[ref] = layouts[ref].only_stack()
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(problems)
    first, last = _first_source(views[0]).model, _first_source(views[-1]).model
    return _sliced(views, stacks, layouts[first].before, layouts[last].after)


def _modules(recipe: MergeRecipe, views: Sequence[SliceRecipe], layouts: Mapping[str, LayerLayout]) -> list[_Part]:
    """Each module of the recipe, from the same module of its models; every module must be given."""
    found = {ref: find_modules(layout) for ref, layout in layouts.items()}
    problems: list[str] = []
    parts: list[_Part] = []
    covered: set[str] = set()
    for name in recipe.modules:
        own = [v for v in views if v.module == name]
        refs = ({s.model for v in own if v.slice for s in v.slice.sources} |
                {m.model for v in own if v.slice is None for m in v.recipe.models} |
                {v.recipe.base_model for v in own if v.slice is None and v.recipe.base_model is not None})
        try:
            modules = {ref: module_named(found[ref], name, ref) for ref in sorted(refs)}
        except RecipeError as exc:
            problems += exc.problems
            continue
        covered |= {m.name for m in modules.values()}
        try:
            parts.append(_module_part(name, own, modules))
        except RecipeError as exc:
            problems += exc.problems
    reference = found[next(iter(layouts))]
    missing = [m for m in reference if m not in covered]
    if missing and not problems:
        problems.append(f"modules: the models also have {', '.join(missing)}, which the recipe does not merge; "
                        "give every module (an output without them would not load)")
    if problems:
        raise RecipeError(problems)
    return parts


def _module_part(name: str, views: Sequence[SliceRecipe], modules: Mapping[str, Module]) -> _Part:
    if views[0].slice is None:  # models: the whole module of each model, as a models: recipe merges them
        (view,) = views
        first = modules[view.recipe.models[0].model]
        refs = [m.model for m in view.recipe.models] + ([view.recipe.base_model] if view.recipe.base_model else [])
        jobs = []
        for tensor in first.names:
            index = _layer_of(first, tensor)
            position = LayerPosition(index, first.stack.count if first.stack else 0)
            jobs.append(TensorJob(tensor, view.recipe, {ref: _same_place(first, modules[ref], tensor)
                                                        for ref in dict.fromkeys(refs)}, position))
        return _Part(jobs, None, [])
    stacks = {ref: m.stack for ref, m in modules.items() if m.stack is not None}
    without = [ref for ref, m in modules.items() if m.stack is None]
    if without:
        raise RecipeError([f"modules.{name}: '{without[0]}' has no layers in this module; merge it with models:"])
    first, last = modules[_first_source(views[0]).model], modules[_first_source(views[-1]).model]
    return _sliced(views, stacks, first.before, last.after)


def _layer_of(module: Module, tensor: str) -> int | None:
    stack = module.stack
    if stack is None or not tensor.startswith(stack.prefix + "."):
        return None
    index = tensor[len(stack.prefix) + 1:].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _same_place(first: Module, other: Module, tensor: str) -> str:
    """The name in ``other`` of ``first``'s tensor (the same unless the module's prefix differs)."""
    return other.name + tensor[len(first.name):] if tensor.startswith(first.name) else tensor


def _sliced(
    views: Sequence[SliceRecipe], stacks: Mapping[str, LayerStack], before: Sequence[str], after: Sequence[str],
) -> _Part:
    problems: list[str] = []
    for view in views:
        problems += _range_problems(view, stacks)
    first, last = views[0], views[-1]
    assert first.slice is not None and last.slice is not None
    if len(last.slice.sources) > len(first.slice.sources):
        # mergekit merges the tensors after the layers from the last slice's models, but only as many
        # of them as the first slice has: the others would be left out without a word.
        problems.append(f"{last.label} has {len(last.slice.sources)} sources and {first.label} "
                        f"{len(first.slice.sources)}: mergekit merges the final norm and head from only the "
                        f"first {len(first.slice.sources)} of the last slice's; give the last slice no more "
                        "sources than the first")
    if problems:
        raise RecipeError(problems)
    out_stack = stacks[_first_source(first).model]
    jobs = _outside(first, before, BEFORE)
    layers: list[tuple[str, int]] = []
    for view in views:
        assert view.slice is not None
        new_jobs, found = _slice_jobs(view, view.slice, stacks, out_stack, len(layers))
        jobs += new_jobs
        problems += found
        source = view.slice.sources[0]
        layers += [(source.model, i) for i in range(*source.layer_range)]
    jobs += _outside(last, after, AFTER)
    if problems:
        raise RecipeError(problems)
    return _Part(jobs, out_stack, layers)


def _first_source(view: SliceRecipe) -> SliceSource:
    assert view.slice is not None
    return view.slice.sources[0]


def _range_problems(view: SliceRecipe, stacks: Mapping[str, LayerStack]) -> list[str]:
    assert view.slice is not None
    problems = []
    for j, source in enumerate(view.slice.sources):
        count = stacks[source.model].count
        if source.layer_range[1] > count:
            problems.append(f"{view.label}.sources[{j}] ({source.model}): layer_range {list(source.layer_range)} "
                            f"goes beyond its {count} layers (0..{count - 1})")
    return problems


def _outside(view: SliceRecipe, names: Sequence[str], position: LayerPosition) -> list[TensorJob]:
    """The tensors outside the layers, merged by ``view``'s recipe from its sources' same-named tensors."""
    assert view.slice is not None
    return [TensorJob(name, view.recipe, {s.model: name for s in view.slice.sources}, position) for name in names]


def _slice_jobs(
    view: SliceRecipe, piece: OutputSlice, stacks: Mapping[str, LayerStack], out_stack: LayerStack, first_out: int,
) -> tuple[list[TensorJob], list[str]]:
    jobs, problems = [], []
    count = piece.layers
    for offset in range(count):
        t = offset / (count - 1) if count > 1 else 1.0
        position = LayerPosition(offset, count, slice_t=t)
        layer = {s.model: (stacks[s.model], s.layer_range[0] + offset) for s in piece.sources}
        suffixes = {ref: stack.suffixes[index] for ref, (stack, index) in layer.items()}
        first_ref = piece.sources[0].model
        for ref, names in suffixes.items():
            if names != suffixes[first_ref]:
                differ = sorted(names ^ suffixes[first_ref])
                problems.append(
                    f"{view.label}: layer {layer[ref][1]} of '{ref}' and layer {layer[first_ref][1]} of "
                    f"'{first_ref}' hold different tensors ({', '.join(differ[:3])}"
                    f"{' and more' if len(differ) > 3 else ''}); slice models of the same architecture")
        for suffix in sorted(suffixes[first_ref]):
            sources = {ref: stack.name(index, suffix) for ref, (stack, index) in layer.items()}
            jobs.append(TensorJob(out_stack.name(first_out + offset, suffix), view.recipe, sources, position))
    return jobs, problems
