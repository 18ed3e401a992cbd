"""Several plans of one recipe that differ only in their numbers, merged in one read pass.

A search asks for many candidates of one recipe. Merged one by one, each candidate reads
every input tensor again; merged together, each tensor is read once and every candidate's
kernel runs on the same inputs, writing one output per candidate (as a sweep parameter's
values do). The batched plan is the first plan with one variant per candidate and each
tensor's kernel arguments taken from every plan in turn.

Any method qualifies whose plans agree on everything but those arguments: the saving is
the reads, so it is largest where the kernel costs little beside them, the methods linear
in their parameters (linear, task_arithmetic, wise_ft, whose kernel is one pass over the
inputs). A plan that needs a whole-model pre-pass (TIES with ``trim_scope: model``) does
not batch: the pre-pass decides on one set of densities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mergekit_like.errors import MergeError
from mergekit_like.merge.plan import MergePlan, TensorPlan, Variant

# What must agree between two candidates' plans of one tensor for them to share its reads.
_SHARED_FIELDS = ("name", "shape", "out_dtype", "compute_dtype", "copy_from", "chunks", "sources", "models", "base",
                  "reference", "aligned")


def batched_plan(plans: Sequence[MergePlan], labels: Sequence[str]) -> MergePlan:
    """One plan writing each of ``plans`` (one output each) as the variant of the same label.

    Raises :class:`MergeError` saying what differs when the plans cannot share a read pass.
    The result reads through the first plan's open checkpoints.
    """
    if len(plans) != len(labels) or not plans:
        raise ValueError("batched_plan needs one label per plan, and at least one plan")
    first = plans[0]
    for plan in plans:
        _check_batchable(first, plan)
    tensors = [dataclasses.replace(tensor, params=tuple(p.tensors[i].params[0] for p in plans))
               for i, tensor in enumerate(first.tensors)]
    return dataclasses.replace(first, tensors=tensors, variants=[Variant(label) for label in labels])


def _check_batchable(first: MergePlan, plan: MergePlan) -> None:
    if len(plan.variants) != 1:
        raise _unbatchable("a candidate is a sweep (several outputs of its own)")
    if plan.needs_prepass:
        raise _unbatchable(f"{plan.method.name} with a whole-model pre-pass decides on each candidate's own "
                           "parameters in a pass of its own")
    if plan.vocabulary is not None or first.vocabulary is not None:
        raise _unbatchable("a recipe with a tokenizer section plans each candidate's vocabulary")
    if plan.output_config != first.output_config or plan.output_files != first.output_files:
        raise _unbatchable("the candidates' outputs differ in their config or tokenizer files")
    if len(plan.tensors) != len(first.tensors):
        raise _unbatchable("the candidates merge different tensors")
    for ours, theirs in zip(first.tensors, plan.tensors):
        differs = [f for f in _SHARED_FIELDS if getattr(ours, f) != getattr(theirs, f)]
        if differs or not _same_kernel(first, ours, plan, theirs):
            raise _unbatchable(f"tensor '{ours.name}' is merged differently ({', '.join(differs) or 'method'})")


def _same_kernel(first: MergePlan, ours: TensorPlan, plan: MergePlan, theirs: TensorPlan) -> bool:
    a, b = first.recipe_of(ours), plan.recipe_of(theirs)
    return a.method.name == b.method.name and a.seed == b.seed


def _unbatchable(why: str) -> MergeError:
    return MergeError(f"these candidates cannot share one read pass: {why}", fix="search with --batch 1")
