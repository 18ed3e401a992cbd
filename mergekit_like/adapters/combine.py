"""Merging adapters of one base into an adapter: no full model is written.

A recipe whose models are all adapters of one base (``BASE+ADAPTER`` or adapter
directories) can give an adapter instead of a model, as PEFT's
``add_weighted_adapter`` does:

* ``cat`` (linear and task arithmetic only): the adapters' factors side by side,
  ``A = [c_1 s_1 A_1; c_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so that
  ``B @ A = sum_i c_i s_i B_i A_i`` exactly, at rank ``sum_i r_i``, where ``c_i`` is
  the coefficient the method gives model ``i`` (linear: its normalised weight; task
  arithmetic: weight times lambda);
* ``svd``: any method of this tool applied to the adapters' deltas ``s_i B_i A_i``
  (per tensor, with its filters and per-model values; the base's delta is zero), the
  merged delta then cut to ``rank`` by a truncated SVD (``B = U S``, ``A = V^T``).

Each module's factors are read, merged and written one tensor at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_like.adapters.view import EMBEDDING_A, Adaptation, AdaptedCheckpoint
from mergekit_like.adapters.writer import AdapterContents, adapter_config, is_causal_lm, write_adapter
from mergekit_like.errors import RecipeError
from mergekit_like.merge.engine import tensor_generator
from mergekit_like.merge.plan import MergePlan, TensorPlan
from mergekit_like.progress import NullProgress, ProgressSink

COMBINATIONS = ("cat", "svd")
CAT_METHODS = ("linear", "task_arithmetic")


@dataclass(frozen=True)
class AdapterOutput:
    path: Path
    rank: int  # the rank written (for cat, the largest over modules)
    modules: int
    # svd: the part of each merged delta the cut keeps, ||approx|| / ||delta|| over all modules.
    kept_fraction: float | None = None


def adapter_merge_problems(plan: MergePlan, combination: str, rank: int | None) -> list[str]:
    """Why ``plan`` cannot be written as an adapter (empty when it can), before any tensor is read."""
    problems = []
    if combination not in COMBINATIONS:
        return [f"--as-adapter must be one of {', '.join(COMBINATIONS)}, not {combination!r}"]
    if plan.recipe.layered or len(plan.variants) > 1:
        problems.append("an adapter output needs a models: recipe of one output (no slices, no sweep)")
    adapted = {ref: c for ref, c in plan.checkpoints.items() if isinstance(c, AdaptedCheckpoint)}
    plain = [ref for ref in plan.checkpoints if ref not in adapted and ref != plan.recipe.base_model]
    if plain or not adapted:
        problems.append("an adapter output merges adapters only; these are models: " + ", ".join(plain or ["(none)"]))
    bases = {c.base.layout.root.resolve() for c in adapted.values()}
    base_ref = plan.recipe.base_model
    if base_ref in plan.checkpoints and base_ref not in adapted:
        bases.add(plan.checkpoints[base_ref].layout.root.resolve())
    if len(bases) > 1:
        problems.append(f"the adapters have different bases ({', '.join(map(str, sorted(bases)))}); an adapter "
                        "output needs one")
    # A replaced tensor that is also adapted is the embedding PEFT saves beside its factors: the base's own.
    if any(name not in c.adaptations for c in adapted.values() for name in c.replacements):
        problems.append("an adapter with modules_to_save (whole tensors) cannot be combined as factors; "
                        "merge to a model instead")
    if combination == "cat" and plan.recipe.merge_method not in CAT_METHODS:
        problems.append(f"cat combines linear and task_arithmetic only (a sum of the deltas); use svd for "
                        f"{plan.recipe.merge_method}")
    if combination == "svd" and rank is not None and rank < 1:
        problems.append(f"--rank must be at least 1, not {rank}")
    if combination == "cat" and rank is not None:
        problems.append("cat keeps every adapter's rank (their sum); --rank applies to svd")
    return problems


def merge_as_adapter(
    plan: MergePlan, output: str | Path, *, combination: str, rank: int | None = None, overwrite: bool = False,
    progress: ProgressSink | None = None, files: Mapping[str, str] | None = None,
) -> AdapterOutput:
    """Writes the merge ``plan`` describes as a PEFT adapter of the adapters' base, atomically.

    ``files``: written beside it (name -> text: the model card, the recipe).
    """
    problems = adapter_merge_problems(plan, combination, rank)
    if problems:
        raise RecipeError(problems)
    progress = progress or NullProgress()
    adapters = [c for c in plan.checkpoints.values() if isinstance(c, AdaptedCheckpoint)]
    names = sorted({n for c in adapters for n in c.adaptations})
    tensors = [t for t in plan.tensors if t.name in names]
    target = rank or max(c.adapter.entry(a.a).shape[0] for c in adapters for a in c.adaptations.values())
    progress.start(len(tensors), sum(t.read_bytes for t in tensors))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (B, A)
    embeddings: set[str] = set()
    conv1d: set[str] = set()  # GPT-2's Conv1D layers: the config says fan_in_fan_out
    kept, total = 0.0, 0.0
    with torch.no_grad(), ThreadPoolExecutor(2, thread_name_prefix="kernel") as executor:
        for tensor in tensors:
            module = tensor.name.removesuffix(".weight")
            layout = _adaptation_of(plan, tensor)  # the base's layer, the same in every adapter
            if combination == "cat":
                a, b = _concatenated(plan, tensor)
            else:
                a, b, part, whole = _cut(_merged_delta(plan, tensor, executor), target, layout.transposed)
                kept, total = kept + part, total + whole
            dtype = _dtype(plan, tensor)
            factors[module] = (b.to(dtype).contiguous(), a.to(dtype).contiguous())
            if layout.a.endswith(EMBEDDING_A):
                embeddings.add(module)
            elif layout.transposed:
                conv1d.add(module)
            progress.advance(tensor.name, tensor.read_bytes)
    first = adapters[0]
    contents = AdapterContents(
        factors=factors, embeddings=frozenset(embeddings), saved={}, source=first.base,
        all_modules=tuple(dict.fromkeys(n.rpartition(".")[0] for n in first.base.names())),
        base_ref=first.config.base_model or str(first.base.layout.root),
        causal_lm=is_causal_lm(first.base.layout.root), fan_in_fan_out=bool(conv1d))
    written = write_adapter(output, contents, adapter_config(contents), files=files, overwrite=overwrite)
    ranks = [a.shape[0] for _, a in factors.values()]
    fraction = math.sqrt(kept / total) if combination == "svd" and total > 0 else None
    return AdapterOutput(written, max(ranks, default=0), len(names), fraction)


def _coefficients(plan: MergePlan, tensor: TensorPlan) -> list[float]:
    """The coefficient of each model's delta in a linear combination (linear or task arithmetic)."""
    params = tensor.params[0]
    weights = [float(w) for w in params["weight"]]
    if plan.recipe_of(tensor).merge_method == "task_arithmetic":
        return [w * float(params.get("lambda_", params.get("lambda", 1.0))) for w in weights]
    total = sum(weights)
    return [w / total for w in weights] if params.get("normalize", True) and total != 0 else weights


def _concatenated(plan: MergePlan, tensor: TensorPlan) -> tuple[torch.Tensor, torch.Tensor]:
    pieces_a, pieces_b = [], []
    for ref, coefficient in zip(tensor.models, _coefficients(plan, tensor)):
        adapter = plan.checkpoints[ref]
        assert isinstance(adapter, AdaptedCheckpoint)
        adaptation = adapter.adaptations.get(tensor.name)
        if adaptation is None:
            continue  # this adapter leaves the module alone: a zero delta
        a, b = (adapter.adapter.read(n).to(torch.float32) for n in (adaptation.a, adaptation.b))
        pieces_a.append(a * (coefficient * adaptation.scaling))
        pieces_b.append(b)
    return torch.cat(pieces_a, dim=0), torch.cat(pieces_b, dim=1)


def _delta(adapter: AdaptedCheckpoint, adaptation: Adaptation, shape: tuple[int, ...]) -> torch.Tensor:
    """``scaling * B @ A`` of one adapter, in the weight's layout, in float32."""
    a, b = (adapter.adapter.read(n).to(torch.float32) for n in (adaptation.a, adaptation.b))
    delta = (b @ a) * adaptation.scaling
    return delta.T if adaptation.transposed else delta


def _merged_delta(plan: MergePlan, tensor: TensorPlan, executor: ThreadPoolExecutor) -> torch.Tensor:
    """The recipe's method applied to the adapters' deltas (the base's delta: zero)."""
    method = plan.recipe_of(tensor).method
    deltas = []
    for ref in tensor.models:
        adapter = plan.checkpoints[ref]
        assert isinstance(adapter, AdaptedCheckpoint)
        adaptation = adapter.adaptations.get(tensor.name)
        deltas.append(torch.zeros(tensor.shape) if adaptation is None else _delta(adapter, adaptation, tensor.shape))
    kwargs: dict[str, Any] = dict(tensor.params[0])
    if tensor.base is not None:
        kwargs["base"] = torch.zeros(tensor.shape)
    if method.uses_generator:  # the same draws as a merge to a model
        kwargs["generator"] = tensor_generator(plan.recipe_of(tensor).seed, tensor.name, torch.device("cpu"))
    if method.uses_executor:
        kwargs["executor"] = executor
    return method.kernel(deltas, **kwargs).to(torch.float32)


def _adaptation_of(plan: MergePlan, tensor: TensorPlan) -> Adaptation:
    """The first adapter's adaptation of ``tensor`` (some adapter adapts it: it is planned for that)."""
    for ref in tensor.models:
        adapter = plan.checkpoints[ref]
        if isinstance(adapter, AdaptedCheckpoint) and tensor.name in adapter.adaptations:
            return adapter.adaptations[tensor.name]
    raise AssertionError(f"no adapter adapts {tensor.name}")


def _cut(delta: torch.Tensor, rank: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Factors ``A`` (rank x in) and ``B`` (out x rank) of the best rank-``rank`` approximation of ``delta``.

    For embeddings and Conv1D layers the factors are of ``delta.T``, as PEFT stores them.
    Also returns the squared norms kept and in all.
    """
    matrix = delta.T if transposed else delta
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    b, a = u[:, :r] * s[:r], vh[:r]
    return a, b, float((s[:r] ** 2).sum()), float((s ** 2).sum())


def _dtype(plan: MergePlan, tensor: TensorPlan) -> torch.dtype:
    """The factors' dtype: the recipe's output dtype, else float32 (adapters are small)."""
    return plan.recipe_of(tensor).out_dtype or torch.float32
