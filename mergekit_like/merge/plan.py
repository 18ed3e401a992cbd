"""Planning a merge: everything decided from the headers, before any tensor data is read.

Opens every input (headers only), checks that they agree on tensor names and
shapes, resolves every parameter for every tensor (gradients over layers,
filter lists, per-model values), and reports every problem at once. The plan
is then streamed by :mod:`mergekit_like.merge.engine`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_like.adapters.models import open_model
from mergekit_like.errors import InvalidCheckpointError, RecipeError
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.experts import with_expert_layout
from mergekit_like.io.reader import Checkpoint
from mergekit_like.io.safetensors_format import TensorEntry
from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.sidefiles import read_config
from mergekit_like.merge.heads import TiedHead, config_with_tying, find_tied_head, tying_value, written_head
from mergekit_like.merge.layered import TensorJob, plan_layers
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.parameters import LayerPosition, NoValue, layer_count, layer_index, resolve_value
from mergekit_like.merge.recipe import MergeRecipe
from mergekit_like.merge.staging import planned_device_type
from mergekit_like.methods import BaseUse, MergeMethod
from mergekit_like.vocab.plan import VocabularyPlan, chat_template_files, plan_vocabulary
from mergekit_like.vocab.tensors import embedding_name, is_vocabulary_tensor

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 25
# A tokenizer with fewer tokens than this share of its embedding's rows is likely another model's
# (padded vocabularies leave well under 1% of their rows unused).
SPARSE_VOCABULARY = 0.9


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: merged with resolved parameters, or copied."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    # Integer and bool tensors are copied from this input (the base, else the first model).
    copy_from: str | None
    # Kernel keyword arguments, one dict per output variant.
    params: tuple[dict[str, Any], ...]
    read_bytes: int
    # Row ranges merged one at a time (element-wise methods on large tensors), or None: whole.
    chunks: tuple[tuple[int, int], ...] | None = None
    # The recipe whose method merges it (a slice's, in a layered recipe; None: the plan's own).
    recipe: MergeRecipe | None = None
    # Model ref -> the tensor read from it, where that is not ``name`` (layers of a slice).
    sources: Mapping[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()  # the models merged, in kernel order (the base not among them)
    base: str | None = None  # the model whose tensor the kernel gets as ``base``, if its method takes one
    reference: str = ""  # the model it follows: rows to fit a vocabulary to, integer values
    aligned: bool = False  # token-indexed rows, gathered by the plan's vocabulary alignment

    def source(self, ref: str) -> str:
        """The name of the tensor this output tensor reads from model ``ref``."""
        return self.sources.get(ref, self.name)

    @property
    def merged_from(self) -> tuple[str, ...]:
        """Every model a merged tensor is read from: the models, then the base if its method uses one."""
        return (*self.models, *([self.base] if self.base is not None else []))


@dataclass(frozen=True)
class Variant:
    """One output of a run: a whole checkpoint (a method's sweep parameter makes several)."""

    label: str | None
    value: Any = None


@dataclass
class MergePlan:
    """Everything a merge will do, decided before any tensor data is read."""

    recipe: MergeRecipe
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    tensors: list[TensorPlan]
    variants: list[Variant]
    side_file_source: str
    # The model whose names, shapes (and, with vocab_mismatch: base, rows) the output follows.
    reference: str
    options: MergeOptions = field(default_factory=MergeOptions)
    # The outputs' config.json when the merge changes it (a slices recipe restacks layers, a
    # vocabulary changes its size, a head is written where the base tied it).
    output_config: dict[str, Any] | None = None
    # The output vocabulary (a recipe with a tokenizer section): rows per model, tokenizer files.
    vocabulary: VocabularyPlan | None = None
    # Files written beside every output (name -> text): the merged tokenizer's.
    output_files: dict[str, str] = field(default_factory=dict)

    def recipe_of(self, tensor: TensorPlan) -> MergeRecipe:
        """The recipe that merges ``tensor``: its slice's, or the plan's."""
        return tensor.recipe or self.recipe


    @property
    def memory_budget(self) -> int:
        return self.options.memory_budget

    @property
    def side_file_dir(self) -> Path:
        """The directory whose config, generation config and (unless the merge makes its own)
        tokenizer files the outputs get: the base's, else the first model's, as mergekit."""
        if self.side_file_source in self.checkpoints:
            return self.checkpoints[self.side_file_source].layout.root
        return Path(self.side_file_source)

    @functools.cached_property
    def merged_params(self) -> list[dict[str, Any]]:
        """The kernel arguments of every merged tensor and variant (what a pre-pass decides on)."""
        return [p for t in self.tensors if t.copy_from is None for p in t.params]

    @functools.cached_property
    def needs_prepass(self) -> bool:
        prepass = self.method.prepass
        return prepass is not None and prepass.needed(self.merged_params)

    @property
    def input_refs(self) -> list[str]:
        """The models merged (for a layered recipe, every model it reads)."""
        if self.recipe.layered:
            return self.recipe.referenced_models()
        return [m.model for m in self.recipe.inputs]

    @property
    def methods(self) -> list[MergeMethod]:
        """Every method the plan runs (a layered recipe's slices may each name their own)."""
        found = {t.recipe.method.name: t.recipe.method for t in self.tensors if t.recipe is not None}
        return list(found.values()) or [self.method]

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tensors)

    @property
    def row_block_share(self) -> float:
        """The share of the bytes read that a whole-tensor method merges in row blocks (0 for element-wise
        methods, whose blocks are their only way): the allocator policy for the merge depends on it."""
        blocked = sum(t.read_bytes for t in self.tensors
                      if t.chunks is not None and not self.recipe_of(t).method.elementwise)
        return blocked / self.read_bytes if self.read_bytes else 0.0

    @property
    def whole_tensor_bytes(self) -> int:
        """The largest tensor merged whole, in its compute dtype (the allocator policy depends on it)."""
        return max((TensorSpec(t.name, t.compute_dtype, t.shape).nbytes for t in self.tensors if t.chunks is None),
                   default=0)

    @property
    def write_bytes(self) -> int:
        per_output = sum(TensorSpec(t.name, t.out_dtype, t.shape).nbytes for t in self.tensors)
        return per_output * len(self.variants)

    @property
    def uniform_out_dtype(self) -> torch.dtype | None:
        """The dtype every merged tensor is written in, when they share one."""
        dtypes = {t.out_dtype for t in self.tensors if t.copy_from is None}
        return dtypes.pop() if len(dtypes) == 1 else None

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.out_dtype, t.shape) for t in self.tensors]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Tensors grouped by identical resolved parameters, for --dry-run."""
        groups: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            key = repr(("copy", t.copy_from) if t.copy_from else t.params)
            group = groups.setdefault(key, {
                "parameters": "copied from " + str(t.copy_from) if t.copy_from else self._printable(t.params),
                "tensors": 0, "examples": [],
            })
            group["tensors"] += 1
            if len(group["examples"]) < 3:
                group["examples"].append(t.name)
        return list(groups.values())

    def _printable(self, params: tuple[dict[str, Any], ...]) -> Any:
        """Kernel arguments under their recipe names (``lambda_`` -> ``lambda``)."""
        names = {spec.name: key for key, spec in self.method.params.items()}
        cleaned = [{names.get(k, k): v for k, v in p.items()} for p in params]
        return cleaned[0] if len(cleaned) == 1 else cleaned

    def vocabulary_summary(self) -> dict[str, Any] | None:
        """The vocabulary plan (for --dry-run): its size, tokens each model adds, where rows come from."""
        aligned = next((t for t in self.tensors if t.aligned), None)
        if self.vocabulary is None or aligned is None:
            return None
        return self.vocabulary.summary(aligned.merged_from)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()



ModelResolver = Callable[[str], Path]


@contextmanager
def planned_merge(
    recipe: MergeRecipe, options: MergeOptions | None = None, *, resolve_model: ModelResolver = Path,
) -> Iterator[MergePlan]:
    """Plans ``recipe`` (see :func:`plan_merge`) and closes the inputs afterwards."""
    plan = plan_merge(recipe, options, resolve_model=resolve_model)
    try:
        yield plan
    finally:
        plan.close()


def plan_merge(
    recipe: MergeRecipe, options: MergeOptions | None = None, *, resolve_model: ModelResolver = Path,
) -> MergePlan:
    """Opens every input, checks them against each other and resolves every parameter.

    ``options.memory_budget`` sizes the row blocks of element-wise merges and the engine's
    read-ahead. Raises :class:`RecipeError` listing every problem found; no tensor data is read.
    """
    options = options or MergeOptions()
    method = recipe.method
    refs = recipe.referenced_models() if recipe.layered else _needed_refs(recipe, method)
    checkpoints: dict[str, Checkpoint] = {}
    with ExitStack() as stack:
        for ref in refs:
            checkpoints[ref] = stack.enter_context(open_model(ref, resolve_model, allow_pickle=options.allow_pickle))
        configs = {ref: _config(c, needed=recipe.layered) for ref, c in checkpoints.items()}
        checkpoints = {ref: with_expert_layout(c, configs[ref], recipe.expert_layout) for ref, c in checkpoints.items()}
        problems = [] if options.allow_crimes else _architecture_problems(configs)
        if problems:
            raise _recipe_error(problems)
        reference = _reference(recipe, refs)
        output_config = None
        tied = find_tied_head({ref: set(c.names()) for ref, c in checkpoints.items()}, configs)
        if recipe.layered:
            layered = plan_layers(recipe, checkpoints, configs, reference)
            jobs, output_config = layered.jobs, layered.config
        else:
            names = checkpoints[reference].names()
            problems += _check_names(checkpoints, reference, optional={tied.head} if tied else set())
            positions = _positions(names)
            jobs = [TensorJob(name, recipe, {ref: name for ref in refs}, positions[name]) for name in names]
        if tied is not None:
            jobs = _with_tied_head(jobs, tied)
        vocabulary = _vocabulary(recipe, checkpoints, configs, reference, resolve_model)
        variants = _variants(recipe)
        device_type = planned_device_type(options.device)  # some methods merge in row blocks on the CPU only
        tensors = []
        for job in jobs:
            try:
                tensors.append(_plan_tensor(job, checkpoints, variants, options.memory_budget, device_type,
                                            layered=recipe.layered, vocabulary=vocabulary))
            except _TensorProblems as found:
                problems += found.problems
        output_config = _output_config(output_config or configs.get(reference), {t.name for t in tensors},
                                       vocabulary, tied is not None, keep=output_config is not None)
        files = _output_files(recipe, vocabulary, checkpoints, reference, options.copy_tokenizer)
        plan = MergePlan(recipe, method, checkpoints, tensors, variants, reference, reference, options,
                         output_config, vocabulary, files)
        prepass = method.prepass
        if not problems and recipe.layered:
            problems += _layered_prepass_problems(plan)
        elif not problems and prepass is not None and plan.needs_prepass:
            problems += prepass.problems(plan.merged_params)
        if problems:
            raise _recipe_error(problems)
        stack.pop_all()
    return plan


def _config(checkpoint: Checkpoint, *, needed: bool) -> dict[str, Any] | None:
    """A model's config.json; one that cannot be read fails a slices merge (it counts the layers) and
    only skips the architecture check of a whole-model one (its outputs get it copied unchanged)."""
    try:
        return read_config(checkpoint.layout.root)
    except InvalidCheckpointError:
        if needed:
            raise
        logger.warning("%s: config.json cannot be read; the models' architectures are not compared",
                       checkpoint.layout.root)
        return None


def _layered_prepass_problems(plan: MergePlan) -> list[str]:
    """A whole-model pass ranks every tensor of each model at once: a slice has no such model."""
    problems = []
    for method in plan.methods:
        params = [p for t in plan.tensors if t.copy_from is None and plan.recipe_of(t).method is method
                  for p in t.params]
        if method.prepass is not None and method.prepass.needed(params):
            problems.append(f"{method.name}'s whole-model pass needs a models: recipe (it ranks every tensor of "
                            "each model at once); use its per-tensor form in slices")
    return problems


def _architecture_problems(configs: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Models of different architectures (a Llama beside a Mistral) are refused, as mergekit does."""
    found = {ref: _architecture(config) for ref, config in configs.items() if config is not None}
    kinds = set(found.values()) - {None}
    if len(kinds) <= 1:
        return []
    listed = ", ".join(f"'{ref}' is {kind}" for ref, kind in found.items() if kind)
    return [f"the models are of different architectures ({listed}); merging them gives a model of neither "
            "unless their tensors mean the same; pass --allow-crimes (allow_crimes) to merge them anyway"]


def _architecture(config: Mapping[str, Any]) -> str | None:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _needed_refs(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    refs = [m.model for m in recipe.inputs]
    if method.base is not BaseUse.NONE and recipe.base_model is not None:
        refs = [recipe.base_model, *refs]
    return refs


def _reference(recipe: MergeRecipe, refs: Sequence[str]) -> str:
    """The model the output follows: names, shapes, integer tensors and default output dtype.

    The base whenever the recipe names one, also for methods that merge it as one of the
    models (those without a base input): integer tensors come "from the base, else the first model".
    """
    base = recipe.base_model
    return base if base is not None and base in refs else refs[0]


def _check_names(checkpoints: dict[str, Checkpoint], reference: str, *, optional: set[str]) -> list[str]:
    """Every model has the reference's tensors (but ``optional`` ones: a head some models tie away)."""
    expected = set(checkpoints[reference].names()) - optional
    problems = []
    for ref, checkpoint in checkpoints.items():
        if ref == reference:
            continue
        names = set(checkpoint.names()) - optional
        for kind, diff in (("missing from", expected - names), ("only in", names - expected)):
            if diff:
                listed = ", ".join(sorted(diff)[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")
                problems.append(
                    f"{len(diff)} tensor(s) {kind} '{ref}' compared with '{reference}': {listed}"
                )
    return problems


def _positions(names: Sequence[str]) -> dict[str, LayerPosition]:
    count = layer_count(names)
    return {name: LayerPosition(layer_index(name), count) for name in names}


def _variants(recipe: MergeRecipe) -> list[Variant]:
    values = recipe.sweep_values
    if values is None:
        return [Variant(None)]
    name = recipe.method.sweep_param
    return [Variant(f"{name}_{v:g}", v) for v in values]


class _TensorProblems(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems


# The row blocks of a larger tensor are smaller than that: a stream of blocks also holds results
# queued for the writer and the freed blocks the allocator keeps for the next ones, and with blocks
# a quarter of that size (element-wise methods) the whole stays within the budget whatever the
# tensor's size (benchmarks/large_tensor_bench.py). Methods with a tensor pass take blocks twice
# as large: each block costs them the passes' reads and per-model work to dispatch, and their
# temporaries are slices of a block anyway.
ELEMENTWISE_BLOCK_SHRINK = 4
TENSOR_PASS_BLOCK_SHRINK = 2


def _plan_tensor(
    job: TensorJob, checkpoints: dict[str, Checkpoint], variants: list[Variant], memory_budget: int,
    device_type: str, *,
    layered: bool, vocabulary: VocabularyPlan | None = None,
) -> TensorPlan:
    recipe, name, reference = job.recipe, job.name, job.reference
    method = recipe.method
    entries = {ref: checkpoints[ref].entry(job.sources[ref]) for ref in job.sources if job.sources[ref] in
               checkpoints[ref]}
    missing = [ref for ref in job.refs if ref not in entries]
    if missing:
        raise _TensorProblems([f"tensor '{job.sources[ref]}' is missing from '{ref}'" for ref in missing])
    entries = {ref: entries[ref] for ref in job.refs} if job.refs else entries
    ref_entry = entries[reference] if reference in entries else next(iter(entries.values()))
    aligned = vocabulary is not None and _token_indexed(name, entries, vocabulary)
    if aligned:
        assert vocabulary is not None
        problems = _aligned_shape_problems(name, job, entries, vocabulary)
        problems = problems or vocabulary.tensor_problems(name, (*job.models, *([job.base] if job.base else [])))
        ref_entry = dataclasses.replace(ref_entry, shape=(vocabulary.rows, *ref_entry.shape[1:]))
    else:
        problems = _shape_problems(name, entries, reference, recipe.vocab_mismatch)
    problems += _dtype_problems(name, entries, reference)
    read_bytes = sum(e.nbytes for e in entries.values())
    where: dict[str, Any] = dict(
        recipe=recipe if layered else None, sources={ref: n for ref, n in job.sources.items() if n != name},
        models=tuple(job.models), base=job.base, reference=reference, aligned=aligned)
    if not ref_entry.dtype.is_floating_point:
        if problems:
            raise _TensorProblems(problems)
        return TensorPlan(name, ref_entry.shape, ref_entry.dtype, ref_entry.dtype, reference, ({},),
                          ref_entry.nbytes, **where)
    compute = recipe.compute_dtype or _promoted(e.dtype for e in entries.values())
    # Without out_dtype mergekit writes what the kernel returns: a method declaring a more precise
    # result keeps it.
    written = compute if recipe.dtype_sets_output else ref_entry.dtype
    if method.result_dtype is not None:
        written = torch.promote_types(written, method.result_dtype)
    out_dtype = recipe.out_dtype or written
    params = []
    for variant in variants:
        resolved, found = _resolve_params(recipe, method, job, variant)
        problems += found
        params.append(resolved)
    if problems:
        raise _TensorProblems(problems)
    same_shapes = aligned or all(e.shape == ref_entry.shape for e in entries.values())
    # A tensor merges whole while its inputs take at most a quarter of the budget: the rest holds the
    # next tensor read ahead (half) and the temporaries and result (a quarter).
    whole_elements = memory_budget // (4 * len(entries) * compute.itemsize)
    blockwise = (same_shapes and math.prod(ref_entry.shape) > whole_elements
                 and method.merges_row_blocks(params, compute, device_type))
    shrink = ELEMENTWISE_BLOCK_SHRINK if method.elementwise else TENSOR_PASS_BLOCK_SHRINK
    min_rows = 1 if method.elementwise else TENSOR_PASS_MIN_ROWS
    chunks = row_chunks(ref_entry.shape, whole_elements // shrink, min_rows) if blockwise else None
    return TensorPlan(name, ref_entry.shape, out_dtype, compute, None, tuple(params), read_bytes, chunks, **where)


def row_chunks(shape: tuple[int, ...], budget: int, min_rows: int = 1) -> tuple[tuple[int, int], ...] | None:
    """Row ranges of at most ``budget`` elements each (but at least ``min_rows`` rows, a short last range
    joining the one before it), or None for a tensor that fits whole."""
    numel = math.prod(shape)
    if numel <= budget or len(shape) < 2 or shape[0] < max(2, min_rows):
        return None
    per_row = numel // shape[0]
    step = max(min_rows, budget // per_row)
    starts = list(range(0, shape[0], step))
    if len(starts) > 1 and shape[0] - starts[-1] < min_rows:
        starts.pop()
    if len(starts) == 1:
        return None  # one block would be the whole tensor, read once more for nothing
    return tuple((start, starts[i + 1] if i + 1 < len(starts) else shape[0]) for i, start in enumerate(starts))


# A row block of a method with a tensor pass holds at least this many rows: torch reduces one
# row's entries (a norm along dim -1) in another order when it is the only row of a reduction
# (split across threads) than among several (a row per thread), so a one-row block would not
# give the whole tensor's bits.
TENSOR_PASS_MIN_ROWS = 2


def _token_indexed(name: str, entries: Mapping[str, TensorEntry], vocabulary: VocabularyPlan) -> bool:
    """An embedding or head whose rows are its model's tokens (in the reference at least)."""
    if not is_vocabulary_tensor(name):
        return False
    return any(e.shape and e.shape[0] == vocabulary.vocabularies[ref].size for ref, e in entries.items()
               if ref in vocabulary.vocabularies)


def _aligned_shape_problems(
    name: str, job: TensorJob, entries: Mapping[str, TensorEntry], vocabulary: VocabularyPlan,
) -> list[str]:
    """Each model's rows are its vocabulary; every other dimension agrees across the models."""
    problems = []
    first = next(iter(entries.values()))
    for ref, entry in entries.items():
        size = vocabulary.vocabularies[ref].size
        if not entry.shape or entry.shape[0] != size:
            problems.append(f"tensor '{job.sources[ref]}' of '{ref}': {list(entry.shape)} rows do not match its "
                            f"vocabulary of {size} tokens ({vocabulary.vocabularies[ref].path})")
        elif entry.shape[1:] != first.shape[1:]:
            problems.append(f"tensor '{name}': shape {list(entry.shape)} in '{ref}' but {list(first.shape)} "
                            "elsewhere (beyond the vocabulary rows)")
    return problems


def _promoted(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype mergekit computes in without a `dtype` key: the inputs' promoted dtype."""
    return functools.reduce(torch.promote_types, dtypes)


def _shape_problems(name: str, entries: dict[str, TensorEntry], reference: str, vocab_mismatch: str) -> list[str]:
    expected = entries[reference].shape
    problems = []
    for ref, entry in entries.items():
        if entry.shape == expected:
            continue
        rows_only = _is_vocab_tensor(name) and entry.shape[1:] == expected[1:]
        if rows_only and vocab_mismatch == "base":
            continue
        hint = (" (different vocabulary sizes; vocab_mismatch: base merges the reference model's "
                "rows and keeps its vocabulary)") if rows_only else ""
        problems.append(f"tensor '{name}': shape {list(entry.shape)} in '{ref}' but {list(expected)} "
                        f"in '{reference}'{hint}")
    return problems



def _dtype_problems(name: str, entries: dict[str, TensorEntry], reference: str) -> list[str]:
    """Floating tensors may differ in precision (they are merged in one compute dtype); a floating
    tensor beside an integer one, or integer tensors of different types, have no meaning together."""
    expected = entries[reference].dtype
    problems = []
    for ref, entry in entries.items():
        same_kind = entry.dtype.is_floating_point and expected.is_floating_point
        if entry.dtype != expected and not same_kind:
            problems.append(f"tensor '{name}': {dtype_name(entry.dtype)} in '{ref}' but {dtype_name(expected)} "
                            f"in '{reference}' (merge models whose tensors have the same kind of dtype)")
    return problems


def _is_vocab_tensor(name: str) -> bool:
    return any(key in name for key in ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out"))


def _resolve_params(
    recipe: MergeRecipe, method: MergeMethod, job: TensorJob, variant: Variant
) -> tuple[dict[str, Any], list[str]]:
    """The kernel arguments of one tensor. As mergekit: a shared value is looked up under the
    output tensor's name, a per-model value under the name of the tensor read from that model."""
    resolved: dict[str, Any] = {}
    problems: list[str] = []
    name, position = job.name, job.position
    shared = [recipe.parameters, *recipe.inherited_parameters]
    value: Any
    for key, spec in method.params.items():
        if spec.per_model:
            values = []
            for entry in recipe.inputs:
                value = _lookup(key, [entry.parameters, *shared], job.sources.get(entry.model, name), position,
                                spec.default)
                if value is _MISSING:
                    problems.append(f"tensor '{name}': no value of '{key}' for model '{entry.model}' "
                                    "(no filter matched and there is no default)")
                values.append(value)
            resolved[spec.name] = [spec.coerce(v) for v in values if v is not _MISSING]
        else:
            if variant.label is not None and key == method.sweep_param:
                value = variant.value
            else:
                value = _lookup(key, shared, name, position, spec.default)
            if value is _MISSING:
                problems.append(f"tensor '{name}': no value of '{key}' (no filter matched and there is no default)")
                continue
            resolved[spec.name] = spec.coerce(value)
    if not problems:
        problems += [f"tensor '{name}': {p}" for check in method.checks if (p := check(resolved))]
    return resolved, problems


_MISSING = object()


def _lookup(key: str, scopes: list[Any], name: str, position: LayerPosition, default: Any) -> Any:
    """The first scope that gives ``key`` a value for this tensor wins (mergekit's precedence)."""
    for scope in scopes:
        if key in scope:
            try:
                return resolve_value(scope[key], name, position)
            except NoValue:
                continue
    return _MISSING if default is inspect.Parameter.empty else default


def _with_tied_head(jobs: list[TensorJob], tied: TiedHead) -> list[TensorJob]:
    """The head read from each tied model's embedding; added after the tensors when the reference ties it."""
    def tied_sources(job: TensorJob) -> dict[str, str]:
        return {ref: tied.embedding if ref in tied.tied else tied.head for ref in job.sources}

    out = [dataclasses.replace(job, sources=tied_sources(job)) if job.name == tied.head else job for job in jobs]
    if not any(job.name == tied.head for job in jobs):
        embedding = next((job for job in jobs if job.name == tied.embedding), None)
        if embedding is not None:
            out.append(dataclasses.replace(embedding, name=tied.head, sources=tied_sources(embedding)))
    return out


def _vocabulary(
    recipe: MergeRecipe, checkpoints: Mapping[str, Checkpoint], configs: Mapping[str, Mapping[str, Any] | None],
    reference: str, resolve_model: ModelResolver,
) -> VocabularyPlan | None:
    """The output vocabulary of a recipe with a tokenizer section, every model's rows aligned by token."""
    spec = recipe.tokenizer
    if spec is None:
        return None
    problems = []
    directories = {ref: c.layout.root for ref, c in checkpoints.items()}
    sizes: dict[str, int | None] = {}
    for ref, checkpoint in checkpoints.items():
        embedding = embedding_name(checkpoint.names())
        if embedding is None:
            problems.append(f"'{ref}' has no input embedding tensor (model.embed_tokens.weight or the like) to "
                            "align by token; leave the tokenizer section out")
            continue
        rows = checkpoint.entry(embedding).shape[0]
        declared = _vocab_size(configs.get(ref))
        if declared is not None and declared != rows:
            problems.append(f"'{ref}': config.json says vocab_size {declared} but {embedding} has {rows} rows; "
                            "the checkpoint is inconsistent (fix its config)")
        sizes[ref] = rows
    for ref in spec.models():
        if ref not in directories:
            directories[ref] = Path(resolve_model(ref))
    if problems:
        raise _recipe_error(problems)
    base = recipe.base_model if recipe.base_model in checkpoints else None
    models = [ref for ref in checkpoints if ref != base] + ([base] if base is not None else [])
    plan = plan_vocabulary(spec, recipe.chat_template, models, base, directories, sizes)
    for ref in models:
        vocabulary = plan.vocabularies[ref]
        if vocabulary.dropped_plain:
            problems.append(f"'{ref}': its tokenizer ({vocabulary.path}) has {vocabulary.dropped_plain} tokens of its "
                            f"own vocabulary beyond the embedding's {vocabulary.size} rows: it is not this model's "
                            "tokenizer (copy the right tokenizer.json into the model)")
        elif len(vocabulary.tokens) < SPARSE_VOCABULARY * vocabulary.size:
            logger.warning("'%s': its tokenizer (%s) has %d tokens for the embedding's %d rows; if it is another "
                           "model's, the rows are aligned wrongly", ref, vocabulary.path, len(vocabulary.tokens),
                           vocabulary.size)
        if vocabulary.dropped and not vocabulary.dropped_plain:
            logger.warning("'%s': %d added tokens of its tokenizer have no embedding row (ids %d and up); they are "
                           "left out, as mergekit leaves them", ref, vocabulary.dropped, vocabulary.size)
    if problems:
        raise _recipe_error(problems)
    return plan


def _vocab_size(config: Mapping[str, Any] | None) -> int | None:
    if config is None:
        return None
    for scope in (config, config.get("text_config")):
        if isinstance(scope, Mapping) and isinstance(scope.get("vocab_size"), int):
            return int(scope["vocab_size"])
    return None


def _output_config(
    config: Mapping[str, Any] | None, names: set[str], vocabulary: VocabularyPlan | None, tied_head: bool, *,
    keep: bool,
) -> dict[str, Any] | None:
    """The output's config.json where the merge changes the reference's (``keep``: already changed):
    its vocabulary size and token ids, its tying. None: the reference's is copied as it is."""
    if config is None:
        return None
    out = dict(config)
    if vocabulary is not None:
        out = vocabulary.config(out)
    head = written_head(names)
    if tied_head or (head is not None and tying_value(out) is True):
        out = config_with_tying(out, head_written=head is not None)
    return out if keep or out != config else None


def _output_files(
    recipe: MergeRecipe, vocabulary: VocabularyPlan | None, checkpoints: Mapping[str, Checkpoint], reference: str,
    copy_tokenizer: bool,
) -> dict[str, str]:
    """The tokenizer files the merge writes itself: the merged vocabulary's, or a copied one's chat template."""
    root = checkpoints[reference].layout.root
    if vocabulary is None:
        if recipe.chat_template is None:
            return {}
        if not copy_tokenizer:
            logger.warning("chat_template is not written: the tokenizer is not copied (--no-copy-tokenizer)")
            return {}
        return chat_template_files(recipe.chat_template, [c.layout.root for c in checkpoints.values()], root)
    files = dict(vocabulary.files)
    generation = vocabulary.generation_config(root)
    if generation is not None:
        files["generation_config.json"] = generation
    return files


def _recipe_error(problems: list[str]) -> RecipeError:
    if len(problems) > MAX_LISTED_PROBLEMS:
        extra = len(problems) - MAX_LISTED_PROBLEMS
        problems = [*problems[:MAX_LISTED_PROBLEMS], f"... and {extra} more problems"]
    return RecipeError(problems)
