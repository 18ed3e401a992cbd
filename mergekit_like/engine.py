"""The merge pipeline: plan everything from the headers, then stream tensor by tensor.

Planning opens every input (headers only), checks that they agree on tensor
names and shapes, and resolves every parameter for every tensor; all problems
are reported together before any tensor data is read. Running then reads one
tensor from each input, merges it on the compute device in the compute dtype,
casts it to the output dtype and hands it to the streaming writer, so memory
holds a few tensors at a time, never a model.
"""

from __future__ import annotations

import functools
import inspect
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import InvalidCheckpointError, MergeError, RecipeError
from mergekit_like.io.atomic import check_target
from mergekit_like.io.outputs import WriteItem, refuse_output_among_inputs, write_checkpoints
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.safetensors_format import TensorEntry
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.verify import nonfinite_count
from mergekit_like.io.writer import WrittenCheckpoint
from mergekit_like.methods.model_topk import TopKThreshold
from mergekit_like.methods.registry import BaseUse, MergeMethod
from mergekit_like.parameters import LayerPosition, NoValue, layer_count, layer_index, resolve_value
from mergekit_like.progress import NullProgress, ProgressSink
from mergekit_like.recipe import MergeRecipe

MAX_LISTED_PROBLEMS = 25


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


@dataclass(frozen=True)
class Variant:
    """One output of a run: a whole checkpoint (sweeps such as wise_ft alphas make several)."""

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
    # Refuse inputs holding NaN or Inf (the CLI's --check-finite); off by default: it costs a pass.
    check_finite: bool = False

    @property
    def input_refs(self) -> list[str]:
        return [m.model for m in self.recipe.inputs]

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tensors)

    @property
    def write_bytes(self) -> int:
        per_output = sum(TensorSpec(t.name, t.out_dtype, t.shape).nbytes for t in self.tensors)
        return per_output * len(self.variants)

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

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


@dataclass(frozen=True)
class MergeResult:
    outputs: list[WrittenCheckpoint]
    read_bytes: int
    write_bytes: int


ModelResolver = Callable[[str], Path]


@contextmanager
def planned_merge(
    recipe: MergeRecipe, *, allow_pickle: bool = False, resolve_model: ModelResolver = Path
) -> Iterator[MergePlan]:
    """Plans ``recipe`` (see :func:`plan_merge`) and closes the inputs afterwards."""
    plan = plan_merge(recipe, allow_pickle=allow_pickle, resolve_model=resolve_model)
    try:
        yield plan
    finally:
        plan.close()


def plan_merge(
    recipe: MergeRecipe, *, allow_pickle: bool = False, resolve_model: ModelResolver = Path
) -> MergePlan:
    """Opens every input, checks them against each other and resolves every parameter.

    Raises :class:`RecipeError` listing every problem found; no tensor data is read.
    """
    method = recipe.method
    refs = _needed_refs(recipe, method)
    checkpoints: dict[str, Checkpoint] = {}
    with ExitStack() as stack:
        for ref in refs:
            checkpoints[ref] = stack.enter_context(open_checkpoint(resolve_model(ref), allow_pickle=allow_pickle))
        problems: list[str] = []
        reference = refs[0]  # the base when the method uses one
        names = checkpoints[reference].names()
        problems += _check_names(checkpoints, reference)
        variants = _variants(recipe)
        positions = _positions(names)
        tensors = []
        for name in names:
            try:
                tensors.append(_plan_tensor(recipe, method, checkpoints, reference, name, positions[name], variants))
            except _TensorProblems as found:
                problems += found.problems
        problems += _check_model_scope(method, tensors)
        if problems:
            raise _recipe_error(problems)
        stack.pop_all()
    source = _side_file_source(recipe, reference)
    return MergePlan(recipe, method, checkpoints, tensors, variants, source, reference)


def _uses_model_scope(method: MergeMethod, tensors: Sequence[TensorPlan]) -> bool:
    return method.uses_model_topk and any(
        p.get("trim_scope") == "model" for t in tensors if t.copy_from is None for p in t.params
    )


def _check_model_scope(method: MergeMethod, tensors: Sequence[TensorPlan]) -> list[str]:
    if not _uses_model_scope(method, tensors):
        return []
    merged = [t for t in tensors if t.copy_from is None]
    scopes = {p.get("trim_scope") for t in merged for p in t.params}
    densities = {tuple(p["density"]) for t in merged for p in t.params}
    problems = []
    if len(scopes) > 1:
        problems.append("trim_scope must be the same for every tensor (it is 'model' for some only)")
    if len(densities) > 1:
        problems.append("trim_scope: model keeps the top density fraction of the whole model, so each "
                        "model needs one density for all tensors (no gradients or filters)")
    return problems


def _needed_refs(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    refs = [m.model for m in recipe.inputs]
    if method.base is not BaseUse.NONE and recipe.base_model is not None:
        refs = [recipe.base_model, *refs]
    return refs


def _check_names(checkpoints: dict[str, Checkpoint], reference: str) -> list[str]:
    expected = set(checkpoints[reference].names())
    problems = []
    for ref, checkpoint in checkpoints.items():
        if ref == reference:
            continue
        names = set(checkpoint.names())
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


def _plan_tensor(
    recipe: MergeRecipe,
    method: MergeMethod,
    checkpoints: dict[str, Checkpoint],
    reference: str,
    name: str,
    position: LayerPosition,
    variants: list[Variant],
) -> TensorPlan:
    entries = {ref: ckpt.entry(name) for ref, ckpt in checkpoints.items() if name in ckpt}
    ref_entry = entries[reference]
    problems = _shape_problems(name, entries, reference, recipe.vocab_mismatch)
    read_bytes = sum(e.nbytes for e in entries.values())
    if not ref_entry.dtype.is_floating_point:
        if problems:
            raise _TensorProblems(problems)
        return TensorPlan(name, ref_entry.shape, ref_entry.dtype, ref_entry.dtype, reference, ({},),
                          ref_entry.nbytes)
    compute = recipe.compute_dtype or _promoted(e.dtype for e in entries.values())
    out_dtype = recipe.out_dtype or (compute if recipe.dtype_sets_output else None) or ref_entry.dtype
    params = []
    for variant in variants:
        resolved, found = _resolve_params(recipe, method, name, position, variant)
        problems += found
        params.append(resolved)
    if problems:
        raise _TensorProblems(problems)
    same_shapes = all(e.shape == ref_entry.shape for e in entries.values())
    chunks = row_chunks(ref_entry.shape) if method.elementwise and same_shapes else None
    return TensorPlan(name, ref_entry.shape, out_dtype, compute, None, tuple(params), read_bytes, chunks)


# Element-wise merges of tensors larger than this go row block by row block, so memory
# holds a few blocks per input instead of whole tensors (embeddings can be GBs).
CHUNK_ELEMENTS = 4 * 1024 * 1024


def row_chunks(shape: tuple[int, ...], budget: int | None = None) -> tuple[tuple[int, int], ...] | None:
    """Row ranges of at most ``budget`` elements each, or None for a tensor that fits whole."""
    budget = budget or CHUNK_ELEMENTS
    numel = math.prod(shape)
    if numel <= budget or len(shape) < 2 or shape[0] < 2:
        return None
    per_row = numel // shape[0]
    step = max(1, budget // per_row)
    return tuple((start, min(start + step, shape[0])) for start in range(0, shape[0], step))


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


def fit_rows(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Truncates, or pads with the reference's rows, to the reference's row count.

    For ``vocab_mismatch: base``: a model without some of the reference's tokens
    contributes the reference's rows for them (a zero task vector there), and
    tokens beyond the reference's vocabulary are dropped.
    """
    rows = reference.shape[0]
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, reference[tensor.shape[0]:].to(tensor.dtype)], dim=0)


def _is_vocab_tensor(name: str) -> bool:
    return any(key in name for key in ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out"))


def _resolve_params(
    recipe: MergeRecipe, method: MergeMethod, name: str, position: LayerPosition, variant: Variant
) -> tuple[dict[str, Any], list[str]]:
    resolved: dict[str, Any] = {}
    problems: list[str] = []
    inputs = recipe.inputs
    value: Any
    for key, spec in method.params.items():
        if spec.per_model:
            values = []
            for entry in inputs:
                value = _lookup(key, [entry.parameters, recipe.parameters], name, position, spec.default)
                if value is _MISSING:
                    problems.append(f"tensor '{name}': no value of '{key}' for model '{entry.model}' "
                                    "(no filter matched and there is no default)")
                values.append(value)
            resolved[spec.name] = [spec.kind(v) for v in values if v is not _MISSING]
        else:
            if variant.label is not None and key == method.sweep_param:
                value = variant.value
            else:
                value = _lookup(key, [recipe.parameters], name, position, spec.default)
            if value is _MISSING:
                problems.append(f"tensor '{name}': no value of '{key}' (no filter matched and there is no default)")
                continue
            resolved[spec.name] = spec.kind(value)
    if not problems and resolved.get("normalize") and "weight" in resolved and sum(resolved["weight"]) == 0:
        problems.append(f"tensor '{name}': the weights sum to zero and normalize is on "
                        "(set normalize: false or change the weights)")
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




def _side_file_source(recipe: MergeRecipe, reference: str) -> str:
    source = recipe.tokenizer_source
    if source is None or source == "base":
        return recipe.base_model or reference
    return source


def _recipe_error(problems: list[str]) -> RecipeError:
    if len(problems) > MAX_LISTED_PROBLEMS:
        extra = len(problems) - MAX_LISTED_PROBLEMS
        problems = [*problems[:MAX_LISTED_PROBLEMS], f"... and {extra} more problems"]
    return RecipeError(problems)


# -- running ---------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("CUDA was asked for but is not available", fix="use --device cpu or auto")
    return resolved


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by the run's seed and the tensor's name: reproducible, order-free."""
    generator = torch.Generator(device=device)
    # torch's CPU generator keeps only 32 bits of a seed, so both go through one 32-bit hash.
    generator.manual_seed(zlib.crc32(f"{seed}\0{name}".encode()))
    return generator


def model_topk_thresholds(plan: MergePlan, device: torch.device, progress: ProgressSink) -> list[float]:
    """Each model's k-th largest task-vector magnitude over all merged tensors (two read passes)."""
    merged = [t for t in plan.tensors if t.copy_from is None]
    total = sum(TensorSpec(t.name, t.compute_dtype, t.shape).numel for t in merged)
    densities = merged[0].params[0]["density"] if merged else []
    selectors = [TopKThreshold(max(1, int(d * total)), device) for d in densities]
    for pass_number in (1, 2):
        for tensor in merged:
            load = _loader(plan, tensor, device)
            base = load(plan.recipe.base_model)
            for selector, ref in zip(selectors, plan.input_refs):
                delta = load(ref) - base
                selector.first_pass(delta) if pass_number == 1 else selector.second_pass(delta)
            progress.advance(tensor.name, tensor.read_bytes)
        if pass_number == 1:
            for selector in selectors:
                selector.choose_bucket()
    return [s.threshold() if d < 1 else 0.0 for s, d in zip(selectors, densities)]


@dataclass
class _Inputs:
    """One work item's tensors, read (and cast to the compute dtype) ahead of its compute."""

    tensor: TensorPlan
    rows: tuple[int, int] | None
    models: list[torch.Tensor]
    base: torch.Tensor | None


def read_inputs(
    plan: MergePlan, tensor: TensorPlan, device: torch.device, rows: tuple[int, int] | None = None
) -> _Inputs:
    """Reads one tensor (or rows of it) from every input the method needs."""
    if tensor.copy_from is not None:
        return _Inputs(tensor, rows, [plan.checkpoints[tensor.copy_from].read(tensor.name)], None)
    load = _loader(plan, tensor, device, rows)
    models = [load(ref) for ref in plan.input_refs]
    base = load(plan.recipe.base_model) if plan.method.base is not BaseUse.NONE else None
    return _Inputs(tensor, rows, models, base)


def compute(plan: MergePlan, inputs: _Inputs, device: torch.device,
            thresholds: list[float] | None = None) -> list[torch.Tensor]:
    """The merged value of one work item for each variant, in the output dtype, on the CPU."""
    tensor = inputs.tensor
    if tensor.copy_from is not None:
        return inputs.models * len(plan.variants)
    recipe, method = plan.recipe, plan.method
    results = []
    for params in tensor.params:
        kwargs = dict(params)
        if inputs.base is not None:
            kwargs["base"] = inputs.base
        if method.uses_generator:
            kwargs["generator"] = tensor_generator(recipe.seed, tensor.name, device)
        if method.uses_model_topk:
            kwargs["thresholds"] = thresholds
        try:
            merged = method.kernel(inputs.models, **kwargs)
        except MergeError as exc:
            raise MergeError(exc.what, tensor=tensor.name, fix=exc.fix) from None
        results.append(merged.to(dtype=tensor.out_dtype).cpu())
    return results


def _loader(
    plan: MergePlan, tensor: TensorPlan, device: torch.device, rows: tuple[int, int] | None = None
) -> Callable[[str | None], torch.Tensor]:
    reference: list[torch.Tensor] = []  # read only if some model's rows need fitting

    def read(ref: str) -> torch.Tensor:
        raw = plan.checkpoints[ref].read(tensor.name, device=device, rows=rows)
        if plan.check_finite and (bad := nonfinite_count(raw)):
            raise InvalidCheckpointError(
                f"{bad} NaN or infinite values in model '{ref}'", path=plan.checkpoints[ref].layout.source,
                tensor=tensor.name, fix="the model is corrupt or diverged; leave it out of the merge",
            )
        return raw.to(tensor.compute_dtype)

    def load(ref: str | None) -> torch.Tensor:
        assert ref is not None
        value = read(ref)
        if rows is not None or tuple(value.shape) == tensor.shape:
            return value
        if not reference:
            reference.append(read(plan.reference))
        return fit_rows(value, reference[0])

    return load


def run_merge(
    plan: MergePlan,
    output: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressSink | None = None,
    finalize: Callable[[Path, Variant], None] | None = None,
) -> MergeResult:
    """Streams the merge into ``output`` (one subdirectory per variant for sweeps), atomically.

    ``finalize(directory, variant)`` runs for each output directory before it is
    moved into place (the CLI writes the model card and recipe there).
    """
    progress = progress or NullProgress()
    torch_device = resolve_device(device)
    check_target(output, overwrite=overwrite)
    refuse_output_among_inputs(output, {ref: c.layout.root for ref, c in plan.checkpoints.items()})
    passes = 3 if _uses_model_scope(plan.method, plan.tensors) else 1
    progress.start(len(plan.tensors) * passes, plan.read_bytes * passes)
    thresholds = model_topk_thresholds(plan, torch_device, progress) if passes == 3 else None

    items = [(t, rows) for t in plan.tensors for rows in (t.chunks or [None])]

    def merged() -> Iterator[WriteItem]:
        # Reading the next item overlaps computing this one (file reads and torch ops
        # release the GIL); the writer thread in write_checkpoints overlaps both.
        with torch.no_grad(), ThreadPoolExecutor(1, thread_name_prefix="reader") as reader:
            pending = reader.submit(read_inputs, plan, items[0][0], torch_device, items[0][1]) if items else None
            for position, (tensor, rows) in enumerate(items):
                assert pending is not None
                inputs = pending.result()
                following = items[position + 1] if position + 1 < len(items) else None
                # Read ahead only what fits the budget beside the item in hand.
                ahead = following is not None and _item_bytes(plan, *following) <= READ_AHEAD_BYTES
                if following is not None and ahead:
                    pending = reader.submit(read_inputs, plan, following[0], torch_device, following[1])
                values = compute(plan, inputs, torch_device, thresholds)
                del inputs
                if following is not None and not ahead:
                    pending = reader.submit(read_inputs, plan, following[0], torch_device, following[1])
                for index, value in enumerate(values):
                    yield WriteItem(index, tensor.name, value, rows[0] if rows else None)
                if rows is None or rows[1] == tensor.shape[0]:
                    progress.advance(tensor.name, tensor.read_bytes)

    outputs = write_checkpoints(
        output, [v.label for v in plan.variants], plan.specs(), merged(),
        overwrite=overwrite, max_shard_size=max_shard_size, side_files_from=_side_file_dir(plan),
        out_dtype=_uniform_out_dtype(plan),
        finalize=(lambda directory, i: finalize(directory, plan.variants[i])) if finalize else None,
    )
    return MergeResult(outputs, plan.read_bytes, plan.write_bytes)


# The most bytes of inputs (in the compute dtype) read ahead while another item computes.
READ_AHEAD_BYTES = 256 * 1024 * 1024


def _item_bytes(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    numel = math.prod(tensor.shape) if rows is None else (rows[1] - rows[0]) * math.prod(tensor.shape[1:])
    inputs = len(plan.input_refs) + (1 if plan.method.base is not BaseUse.NONE else 0)
    return numel * torch.empty((), dtype=tensor.compute_dtype).element_size() * inputs


def _side_file_dir(plan: MergePlan) -> Path:
    source = plan.side_file_source
    if source in plan.checkpoints:
        return plan.checkpoints[source].layout.root
    return Path(source)


def _uniform_out_dtype(plan: MergePlan) -> torch.dtype | None:
    dtypes = {t.out_dtype for t in plan.tensors if t.copy_from is None}
    return dtypes.pop() if len(dtypes) == 1 else None
