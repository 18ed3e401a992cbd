"""The merge pipeline: stream a planned merge tensor by tensor.

For each tensor (or block of rows of a large tensor, for element-wise methods
and those declaring a tensor pass) a reader thread reads the next inputs while
this one is merged on the compute device in the compute dtype, cast to the
output dtype and handed to the writer thread, so memory holds a few tensors at
a time, never a model. The plan itself comes from :mod:`mergekit_like.merge.plan`;
moving tensors to and from a GPU (pinned staging chunks, a copy stream, events)
from :mod:`mergekit_like.merge.staging`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_like.errors import InvalidCheckpointError, MergeError
from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.values import nonfinite_count
from mergekit_like.io.writer import WrittenCheckpoint
from mergekit_like.memory import apply_allocator
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.plan import (
    MergePlan,
    ModelResolver,
    TensorPlan,
    Variant,
    plan_merge,
    planned_merge,
)
from mergekit_like.merge.staging import DeviceStaging, resolve_device
from mergekit_like.methods.declaration import AmplificationLog, MergeMethod, TensorReduction, passes_whole_tensors
from mergekit_like.progress import NullProgress, ProgressSink
from mergekit_like.vocab.rows import AlignedRows, gather_rows

logger = logging.getLogger(__name__)

__all__ = [
    "MergeOptions", "MergePlan", "MergeResult", "ModelResolver", "OutputSpec", "TensorPlan", "Variant", "plan_merge",
    "planned_merge", "run_merge",
]


@dataclass(frozen=True)
class MergeResult:
    outputs: list[WrittenCheckpoint]
    read_bytes: int
    write_bytes: int
    # CUDA runs: the most tensor memory allocated on the GPU at once during the merge (torch's
    # process-wide peak, reset when the merge starts, so it includes what was allocated before).
    peak_gpu_bytes: int | None = None


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




# Casts that change no value (every bf16 or f16 number is a float32 number), so a kernel that
# lets type promotion widen its inputs computes exactly what it would on cast inputs.
EXACT_WIDENINGS = frozenset({
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
    (torch.float16, torch.float64), (torch.float32, torch.float64),
})


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by the run's seed and the tensor's name: reproducible, order-free."""
    generator = torch.Generator(device=device)
    # torch's CPU generator keeps only 32 bits of a seed, so both go through one 32-bit hash.
    generator.manual_seed(zlib.crc32(f"{seed}\0{name}".encode()))
    return generator


def run_prepass(plan: MergePlan, staging: DeviceStaging, progress: ProgressSink) -> Any:
    """The method's declared whole-model reduction, over every merged tensor, for its kernel."""
    prepass = plan.method.prepass
    merged = [t for t in plan.tensors if t.copy_from is None]
    if prepass is None or not merged:
        return None
    total = sum(TensorSpec(t.name, t.compute_dtype, t.shape).numel for t in merged)
    # The pass's problems() made sure its parameters are the same for every merged tensor.
    reduction = prepass.start(merged[0].params[0], total, staging.device)
    for pass_index in range(prepass.passes):
        for tensor in merged:
            inputs = read_inputs(plan, tensor, staging)
            staging.accept(inputs.tensors(), inputs.fence)
            reduction.observe(pass_index, inputs.models, inputs.base)
            progress.advance(tensor.name, tensor.read_bytes)
        reduction.end_pass(pass_index)
    return reduction.result()


def tensor_pass_count(plan: MergePlan, tensor: TensorPlan) -> int:
    """How many times a tensor merged in row blocks is read before its merge, for its method's tensor pass."""
    tensor_pass = plan.recipe_of(tensor).method.tensor_pass
    if tensor_pass is None or tensor.chunks is None or tensor.copy_from is not None:
        return 0
    return max(tensor_pass.passes(p, tensor.compute_dtype) for p in tensor.params)


class TensorPasses:
    """Runs a method's tensor pass over a tensor's row blocks when its first block comes up, then
    hands each block of each variant its result (see :class:`~mergekit_like.methods.declaration.TensorPass`)."""

    def __init__(self, plan: MergePlan, staging: DeviceStaging, executor: Executor | None,
                 progress: ProgressSink) -> None:
        self.plan, self.staging, self.executor, self.progress = plan, staging, executor, progress
        self._tensor: TensorPlan | None = None
        self._reductions: list[TensorReduction] = []

    def block(self, tensor: TensorPlan, variant: int, rows: tuple[int, int]) -> Any:
        """The result for one variant's row block."""
        if self._tensor is not tensor:
            self._run(tensor)
        result = self._reductions[variant].block(rows)
        if rows[1] == tensor.shape[0] and variant == len(self._reductions) - 1:
            # The tensor's last block: its results (masks, gathered sums) go with its kernel call,
            # not held until the next tensor's pass.
            self._tensor, self._reductions = None, []
        return result

    def _run(self, tensor: TensorPlan) -> None:
        assert tensor.chunks is not None
        recipe = self.plan.recipe_of(tensor)
        tensor_pass = recipe.method.tensor_pass
        assert tensor_pass is not None
        numel = math.prod(tensor.shape)
        passes = [tensor_pass.passes(p, tensor.compute_dtype) for p in tensor.params]
        device = self.staging.device
        self._tensor = tensor
        self._reductions = [
            tensor_pass.start(p, numel, device, self.executor,
                              tensor_generator(recipe.seed, tensor.name, device) if recipe.method.uses_generator
                              else None)
            for p in tensor.params]
        for pass_index in range(max(passes)):
            for position, rows in enumerate(tensor.chunks):
                if position + 1 < len(tensor.chunks):
                    prefetch_inputs(self.plan, tensor, tensor.chunks[position + 1])
                inputs = read_inputs(self.plan, tensor, self.staging, rows)
                self.staging.accept(inputs.tensors(), inputs.fence)
                for reduction, n in zip(self._reductions, passes):
                    if pass_index < n:
                        reduction.observe(pass_index, inputs.models, inputs.base)
                del inputs
            for reduction, n in zip(self._reductions, passes):
                if pass_index < n:
                    reduction.end_pass(pass_index)
            self.progress.advance(tensor.name, tensor.read_bytes)


@dataclass(frozen=True)
class KernelContext:
    """What the engine hands a kernel besides tensors and parameters, for one run."""

    staging: DeviceStaging
    executor: Executor | None = None
    prepass_result: Any = None
    # The worst amplification each method declares one (model_stock), warned about once the merge is written.
    amplifications: AmplificationLog | None = None
    tensor_passes: TensorPasses | None = None


@dataclass
class _Inputs:
    """One work item's tensors, read (and cast to the compute dtype) ahead of its compute."""

    tensor: TensorPlan
    rows: tuple[int, int] | None
    models: list[torch.Tensor]
    base: torch.Tensor | None
    fence: torch.cuda.Event | None = None  # the copies to the device that produce them

    def tensors(self) -> list[torch.Tensor]:
        return self.models + ([self.base] if self.base is not None else [])


def read_inputs(
    plan: MergePlan, tensor: TensorPlan, staging: DeviceStaging, rows: tuple[int, int] | None = None
) -> _Inputs:
    """Reads one tensor (or rows of it) from every input the method needs, onto the compute device.

    One after the other: the kernel is already reading ahead (see prefetch_inputs), and
    reading them side by side measured no faster while holding more memory. Copied
    tensors stay on the host: they are written as they were read.
    """
    if tensor.copy_from is not None:
        return _Inputs(tensor, rows, [plan.checkpoints[tensor.copy_from].read(tensor.source(tensor.copy_from))], None)
    with staging.copying():
        load = _loader(plan, tensor, staging, rows)
        as_stored = plan.recipe_of(tensor).method.inputs_as_stored
        models = [load(ref, as_stored) for ref in tensor.models]
        base = load(tensor.base) if tensor.base is not None else None
        return _Inputs(tensor, rows, models, base, staging.fence())


def prefetch_inputs(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> None:
    """Starts the kernel reading a later item's bytes, so the disk has work queued while we compute."""
    if tensor.aligned:
        return  # its rows are gathered from wherever the tokens are
    for ref in [tensor.copy_from] if tensor.copy_from is not None else _merged_sources(tensor):
        checkpoint = plan.checkpoints[ref]
        name = tensor.source(ref)
        if name in checkpoint:
            checkpoint.prefetch(name, rows if tuple(checkpoint.entry(name).shape) == tensor.shape else None)


def compute(plan: MergePlan, inputs: _Inputs, context: KernelContext) -> list[torch.Tensor]:
    """The merged value of one work item for each variant, in the output dtype.

    On the compute device; tensors copied unmerged stay on the host, as they were read.
    """
    tensor = inputs.tensor
    if tensor.copy_from is not None:
        return inputs.models * len(plan.variants)
    staging = context.staging
    staging.accept(inputs.tensors(), inputs.fence)
    recipe = plan.recipe_of(tensor)
    method = recipe.method
    results = []
    for variant, params in enumerate(tensor.params):
        kwargs = dict(params)
        if inputs.base is not None:
            kwargs["base"] = inputs.base
        if method.uses_generator:
            kwargs["generator"] = tensor_generator(recipe.seed, tensor.name, staging.device)
        if method.uses_executor:
            kwargs["executor"] = context.executor
        if method.prepass is not None:
            kwargs[method.prepass.keyword] = context.prepass_result
        if method.tensor_pass is not None and inputs.rows is not None:
            if context.tensor_passes is None:  # a block trimmed as if it were the tensor would be wrong
                raise RuntimeError(f"'{tensor.name}' is merged in row blocks but its tensor pass is not run")
            kwargs[method.tensor_pass.keyword] = context.tensor_passes.block(tensor, variant, inputs.rows)
        elif method.tensor_pass is not None and passes_whole_tensors(method.tensor_pass, params):
            kwargs[method.tensor_pass.keyword] = whole_tensor_pass(plan, tensor, params, inputs, context)
        try:
            merged = _call_kernel(method, inputs.models, kwargs)
        except MergeError as exc:
            raise MergeError(exc.what, tensor=tensor.name, fix=exc.fix) from None
        if context.amplifications is not None:
            context.amplifications.observe(method, tensor.name, merged, inputs.models, kwargs)
        results.append(merged.to(dtype=tensor.out_dtype))
    return results


def whole_tensor_pass(plan: MergePlan, tensor: TensorPlan, params: Any, inputs: _Inputs,
                      context: KernelContext) -> Any:
    """A tensor pass's result for a tensor merged whole: its reduction fed the whole tensor, once per pass."""
    recipe = plan.recipe_of(tensor)
    tensor_pass = recipe.method.tensor_pass
    assert tensor_pass is not None
    device = context.staging.device
    generator = tensor_generator(recipe.seed, tensor.name, device) if recipe.method.uses_generator else None
    reduction = tensor_pass.start(params, math.prod(tensor.shape), device, context.executor, generator)
    for pass_index in range(tensor_pass.passes(params, tensor.compute_dtype)):
        reduction.observe(pass_index, inputs.models, inputs.base)
        reduction.end_pass(pass_index)
    return reduction.block((0, tensor.shape[0] if tensor.shape else 1))


# Element-wise kernels on the CPU run on slices of this many entries of a tensor or row block: their
# float32 temporaries stay in cache, and what a block holds is its inputs and result (what the memory
# budget counts), not several float32 copies of it.
ELEMENTWISE_SLICE = 1 << 20


def _call_kernel(method: MergeMethod, models: list[torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    numel = models[0].numel()
    if not method.elementwise or models[0].device.type != "cpu" or numel <= 2 * ELEMENTWISE_SLICE:
        return method.kernel(models, **kwargs)
    flat_models = [m.reshape(-1) for m in models]
    flat_base = kwargs["base"].reshape(-1) if kwargs.get("base") is not None else None
    out: torch.Tensor | None = None
    for start in range(0, numel, ELEMENTWISE_SLICE):
        part = slice(start, start + ELEMENTWISE_SLICE)
        sliced = dict(kwargs, base=flat_base[part]) if flat_base is not None else kwargs
        inputs = [m[part] for m in flat_models]
        result = method.kernel(inputs, **sliced)
        if out is None and any(result.data_ptr() == x.data_ptr() for x in inputs):
            return method.kernel(models, **kwargs)  # it hands an input back (passthrough): no copy
        if out is None:
            out = torch.empty(numel, dtype=result.dtype)
        out[part] = result
    assert out is not None
    return out.reshape(models[0].shape)


class _Load(Protocol):
    def __call__(self, ref: str | None, as_stored: bool = False) -> torch.Tensor: ...


def _loader(
    plan: MergePlan, tensor: TensorPlan, staging: DeviceStaging, rows: tuple[int, int] | None = None
) -> _Load:
    reference: list[torch.Tensor] = []  # read only if some model's rows need fitting

    def read(ref: str, as_stored: bool = False, span: tuple[int, int] | None = rows) -> torch.Tensor:
        raw = staging.read(plan.checkpoints[ref], tensor.source(ref), span)
        if plan.options.check_finite and (bad := nonfinite_count(raw)):
            raise InvalidCheckpointError(
                f"{bad} NaN or infinite values in model '{ref}'", path=plan.checkpoints[ref].layout.source,
                tensor=tensor.source(ref), fix="the model is corrupt or diverged; leave it out of the merge",
            )
        if as_stored and (raw.dtype, tensor.compute_dtype) in EXACT_WIDENINGS:
            return raw
        return raw.to(tensor.compute_dtype)

    if tensor.aligned:
        return _aligned_loader(plan, tensor, staging, rows, read)

    def load(ref: str | None, as_stored: bool = False) -> torch.Tensor:
        """``as_stored``: a model for a kernel that takes models in a dtype widening to the compute dtype."""
        assert ref is not None
        value = read(ref, as_stored)
        if rows is not None or tuple(value.shape) == tensor.shape:
            return value
        if not reference:
            reference.append(read(tensor.reference))
        return fit_rows(value.to(tensor.compute_dtype), reference[0])

    return load


def _aligned_loader(
    plan: MergePlan, tensor: TensorPlan, staging: DeviceStaging, rows: tuple[int, int] | None,
    read: Callable[..., torch.Tensor],
) -> _Load:
    """Loads an embedding or head in the output's token order (see :mod:`mergekit_like.vocab.rows`)."""
    assert plan.vocabulary is not None
    alignment = plan.vocabulary.alignment(tensor.merged_from)

    def read_rows(ref: str, indices: Sequence[int]) -> torch.Tensor:
        return gather_rows(lambda start, stop: read(ref, span=(start, stop)), indices)

    aligned = AlignedRows(alignment, read_rows, tensor.shape[1:], tensor.compute_dtype, staging.device)

    def load(ref: str | None, as_stored: bool = False) -> torch.Tensor:
        assert ref is not None
        return aligned.block(ref, rows)

    return load


def run_merge(
    plan: MergePlan,
    output: str | Path,
    *,
    outputs: Sequence[OutputSpec] | None = None,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    staging: DeviceStaging | None = None,
) -> MergeResult:
    """Streams the merge into ``output`` (one subdirectory per variant for sweeps), atomically.

    ``outputs`` says what each variant's directory holds besides the weights (card, recipe),
    one per variant in order; by default just the side files of the model the output follows.
    How the merge runs comes from ``plan.options``. ``staging`` overrides how tensors move to
    the device and back (the chunk size, for one).
    """
    options = plan.options
    progress = progress or NullProgress()
    torch_device = resolve_device(options.device)
    staging = staging or DeviceStaging(torch_device)
    if staging.device.type != torch_device.type:
        raise ValueError(f"staging moves tensors to {staging.device}, but the merge is asked to run on "
                         f"{options.device}")
    specs = list(outputs) if outputs is not None else [OutputSpec(v.label) for v in plan.variants]
    if plan.output_config is not None:
        # A restacked model's config (its layer count) is the plan's, whatever the caller adds.
        specs = [spec if spec.config is not None else dataclasses.replace(spec, config=plan.output_config)
                 for spec in specs]
    if plan.output_files:
        # The merged tokenizer's files; the caller's own (a card, the recipe) come after.
        specs = [dataclasses.replace(spec, files={**plan.output_files, **spec.files}) for spec in specs]
    labels = [v.label for v in plan.variants]
    if [spec.label for spec in specs] != labels:
        raise ValueError(f"outputs {[spec.label for spec in specs]} do not match the plan's variants {labels}")
    prepass = plan.method.prepass if plan.needs_prepass else None
    passes = (prepass.passes if prepass is not None else 0) + 1
    tensor_reads = [(n, t.read_bytes) for t in plan.tensors if (n := tensor_pass_count(plan, t))]
    progress.start(len(plan.tensors) * passes + sum(n for n, _ in tensor_reads),
                   plan.read_bytes * passes + sum(n * size for n, size in tensor_reads))
    if staging.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(staging.device)
    threads = options.kernel_threads or max(2, torch.get_num_threads())
    amplifications = AmplificationLog()
    with ThreadPoolExecutor(threads, thread_name_prefix="kernel") as executor:
        merged = _merged_stream(plan, staging, executor, progress, passes > 1, amplifications)
        # Closed on any exit: a writer failure otherwise leaves the generator (and its reader
        # thread) alive for as long as the traceback refers to it.
        with contextlib.closing(merged):
            written = write_checkpoints(
                output, specs, plan.specs(), merged, overwrite=overwrite,
                max_shard_size=options.max_shard_size, side_files_from=plan.side_file_dir,
                copy_tokenizer=options.copy_tokenizer and plan.vocabulary is None,
                out_dtype=plan.uniform_out_dtype,
                inputs={ref: c.layout.root for ref, c in plan.checkpoints.items()},
                refuse_nonfinite=options.check_finite,
            )
    for line in amplifications.warnings():
        logger.warning("%s", line)
    peak = torch.cuda.max_memory_allocated(staging.device) if staging.device.type == "cuda" else None
    return MergeResult(written, plan.read_bytes, plan.write_bytes, peak)


def _merged_stream(
    plan: MergePlan, staging: DeviceStaging, executor: Executor, progress: ProgressSink, prepass: bool,
    amplifications: AmplificationLog | None = None,
) -> Generator[WriteItem, None, None]:
    """The merge as a stream for the writer; its first read (the pre-pass, if any) waits for the writer's
    check of the target, so nothing is read (and no allocator setting changed) for an output that
    cannot be written."""
    apply_allocator(plan.options.allocator, elementwise=all(m.elementwise for m in plan.methods),
                    row_blocks=plan.row_block_share, whole_tensor_bytes=plan.whole_tensor_bytes)
    context = KernelContext(staging, executor, run_prepass(plan, staging, progress) if prepass else None,
                            amplifications, TensorPasses(plan, staging, executor, progress))
    items = [(t, rows) for t in plan.tensors for rows in (t.chunks or [None])]
    stream = _pipelined if plan.options.pipeline else _sequential
    yield from stream(plan, items, lambda i: compute(plan, i, context), staging, progress)


Item = tuple[TensorPlan, tuple[int, int] | None]
Compute = Callable[[_Inputs], list[torch.Tensor]]


def _pipelined(
    plan: MergePlan, items: list[Item], compute_item: Compute, staging: DeviceStaging, progress: ProgressSink
) -> Generator[WriteItem, None, None]:
    """Reading the next item overlaps computing this one (file reads and torch ops release the GIL).

    The writer thread in write_checkpoints overlaps both. An error in any stage ends
    the generator; leaving the executors' blocks then waits for reads in flight, so
    no thread outlives the merge.
    """
    with torch.no_grad(), ThreadPoolExecutor(1, thread_name_prefix="reader") as reader:

        def read_ahead(item: Item) -> Future[_Inputs]:
            return reader.submit(read_inputs, plan, item[0], staging, item[1])

        pending = read_ahead(items[0]) if items else None
        for position, (tensor, rows) in enumerate(items):
            assert pending is not None
            inputs = pending.result()
            following = items[position + 1] if position + 1 < len(items) else None
            # Read ahead only what fits the budget beside the item in hand.
            ahead = following is not None and _item_bytes(plan, *following) <= plan.memory_budget // 2
            if following is not None and ahead:
                pending = read_ahead(following)
            if position + 2 < len(items):
                prefetch_inputs(plan, *items[position + 2])
            values = compute_item(inputs)
            del inputs
            if following is not None and not ahead:
                pending = read_ahead(following)
            yield from _written(tensor, rows, values, staging, progress)
            del values  # written: not held on the device while the next item is computed


def _sequential(
    plan: MergePlan, items: list[Item], compute_item: Compute, staging: DeviceStaging, progress: ProgressSink
) -> Generator[WriteItem, None, None]:
    with torch.no_grad():
        for tensor, rows in items:
            values = compute_item(read_inputs(plan, tensor, staging, rows))
            yield from _written(tensor, rows, values, staging, progress)
            del values


def _written(
    tensor: TensorPlan, rows: tuple[int, int] | None, values: list[torch.Tensor], staging: DeviceStaging,
    progress: ProgressSink,
) -> Generator[WriteItem, None, None]:
    """Each variant's value, on the host, as whole tensors or blocks of rows for the writer."""
    for index, value in enumerate(values):
        for offset, block in staging.download(value):
            row = None if offset is None and rows is None else (rows[0] if rows else 0) + (offset or 0)
            yield WriteItem(index, tensor.name, block, row)
    if rows is None or rows[1] == tensor.shape[0]:
        progress.advance(tensor.name, tensor.read_bytes)


def _item_bytes(plan: MergePlan, tensor: TensorPlan, rows: tuple[int, int] | None) -> int:
    numel = math.prod(tensor.shape) if rows is None else (rows[1] - rows[0]) * math.prod(tensor.shape[1:])
    return numel * tensor.compute_dtype.itemsize * len(_merged_sources(tensor))


def _merged_sources(tensor: TensorPlan) -> list[str]:
    return list(tensor.merged_from)
