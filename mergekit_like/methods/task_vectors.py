"""The one kernel behind task arithmetic, TIES, DARE, breadcrumbs and DELLA.

Every member of the family computes task vectors ``d_i = x_i - base``,
optionally sparsifies each (magnitude top-k, random drop, breadcrumbs'
outlier-and-small cut, or DELLA's random drop by magnitude rank), weights
them, optionally elects a sign per entry and keeps only the agreeing entries
(the TIES disjoint mean), and adds the combination, scaled by ``lambda``, to
the base. Operation order follows
mergekit 0.1.5 so recipes give its numbers.

It runs in two phases. Only the sparsification needs a whole tensor (a top-k,
or an L1 norm), so it runs first, one model at a time, and keeps just a
boolean mask and a scale per model (a :class:`Trim`). Everything else is
element-wise and runs block by block over the flattened tensors: blocks stay
in cache and the full-size temporaries (stacked deltas, signs, agreement
masks) never exist, which makes the merge both faster and several times
leaner than computing on whole tensors, with the same numbers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mergekit_like.methods.l1_sums import L1Sums
from mergekit_like.methods.sort_replay import replays_this_sort, sorted_range_mask
from mergekit_like.methods.topk import top_k_count, top_k_mask

Consensus = Literal["sum", "count"]
Sparsification = Literal["magnitude", "bernoulli", "breadcrumbs", "della"]
# The sparsifications that draw random numbers: their draws must run in model order.
RANDOM_SPARSIFICATIONS = frozenset({"bernoulli", "della"})
TrimTies = Literal["sort", "index", "keep"]
RescaleMode = Literal["l1", "inverse_density"]

# Breadcrumbs' default share of the largest magnitudes dropped (mergekit's).
BREADCRUMBS_GAMMA = 0.01
# Below this the weight sum counts as zero when normalising without consensus (as mergekit).
ZERO_WEIGHT_SUM = 1e-8
# Elements per block in the element-wise phase: on the CPU, temporaries that stay in cache;
# on a GPU, blocks large enough that kernel launches cost little (a dozen float32 temporaries
# of 64 MB each at most).
BLOCK = 1 << 20
GPU_BLOCK = 1 << 24
# Masks of tensors from PARALLEL_MIN entries up are computed one model per thread: the
# replays and counts run on one core each. Tensors over PARALLEL_MAX go one at a time: each
# trim in flight holds a float copy of its task vector's magnitudes (and the replay's 4-byte
# position per entry), which for an embedding is hundreds of MB.
PARALLEL_MIN, PARALLEL_MAX = 1 << 16, 1 << 24
# From this size up, trim_ties: sort first tries to do without the sort (see magnitude_mask).
SORT_AVOIDABLE_MIN = 1 << 12


@dataclass(frozen=True)
class Trim:
    """How one model's task vector is sparsified: kept entries, then a rescale."""

    mask: torch.Tensor | None = None  # flat bool; None keeps everything
    multiply: torch.Tensor | None = None  # L1-norm rescale
    divide: float | None = None  # 1 / density rescale
    work_dtype: torch.dtype | None = None  # DARE and DELLA rescale in float32 on CPU (as mergekit)

    def apply_(self, delta: torch.Tensor, block: slice) -> torch.Tensor:
        """The sparsified delta for the flat ``block`` of the tensor, computed in place of ``delta``
        where the work dtype is its own (the same kernels, so the same bits, as out of place)."""
        if self.mask is None:
            return delta
        work = delta.to(self.work_dtype) if self.work_dtype is not None else delta
        # x * mask, to the bit (x * 0 keeps x's sign, a NaN stays NaN), with the bool mask read as
        # its 0/1 bytes: torch multiplies by uint8 several times faster than by bool, whose cast
        # does not vectorise on the CPU.
        kept = work.mul_(self.mask[block].view(torch.uint8))
        if self.multiply is not None:
            kept = kept.mul_(self.multiply)
        if self.divide is not None:
            kept = kept.div_(self.divide)
        return kept.to(delta.dtype)


KEEP_ALL = Trim()


def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    trims: Sequence[Trim] | None = None,
    *,
    consensus: Consensus | None,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """``base + scale * merged`` of the (trimmed) task vectors, block by block."""
    trims = trims or [KEEP_ALL] * len(tensors)
    flat_base = base.reshape(-1)
    flat_models = [x.reshape(-1) for x in tensors]
    out = torch.empty_like(flat_base)
    step = BLOCK if base.device.type == "cpu" else GPU_BLOCK
    for start in range(0, max(flat_base.numel(), 1), step):
        block = slice(start, start + step)
        b = flat_base[block]
        deltas = [t.apply_(x[block] - b, block) for x, t in zip(flat_models, trims)]
        combine_task_vectors_(b, deltas, weights, consensus=consensus, normalize=normalize, scale=scale,
                              out=out[block])
    return out.reshape(base.shape)


def combine_task_vectors_(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale * merged``, where merged is the (sign-agreeing, normalised) weighted sum,
    written to ``out`` when given; the deltas are overwritten.

    Model by model rather than on a stacked tensor: the same numbers (the sums run in model
    order, as a reduction over the stacked models does), without the stacked copies, and in
    place wherever the numbers allow (each pass over a block costs about as much as its
    arithmetic, so the passes saved are the time saved).
    """
    # The weights in the compute dtype, as mergekit's weight tensor. torch.full, not torch.tensor:
    # the same rounding, without a copy from host memory that waits for the GPU to finish its work.
    w = [torch.full((), x, dtype=deltas[0].dtype, device=deltas[0].device) for x in weights]
    weighted = [_first_term(deltas[0], w[0])] + [d.mul_(wi) for d, wi in zip(deltas[1:], w[1:])]
    if consensus is not None:
        agree = sign_agreement(weighted, consensus)
        # The merged sum first: the divisor's sum overwrites the agreements it reads.
        merged = _sum_of_products_in_order(weighted, agree)
        divisor = _sum_of_products_in_order(agree, w)
        # divisor[divisor == 0] = 1 as arithmetic: the comparison written as 0/1 floats and added
        # (x + 0 is x, and only zeros gain 1); masked_fill_ does not vectorise on the CPU.
        divisor += torch.eq(divisor, 0, out=torch.empty_like(divisor))
    else:
        merged = _sum_in_order(weighted)
        divisor = _sum_in_order(w)
        divisor = torch.where(divisor.abs() < ZERO_WEIGHT_SUM, torch.ones_like(divisor), divisor)
    if normalize and scale == 1 and base.dtype in (torch.float32, torch.float64):
        # base + merged / divisor in one pass (16-bit dtypes would round once instead of twice).
        return torch.addcdiv(base, merged, divisor, out=out)
    if normalize:
        merged = merged.div_(divisor)
    if scale != 1:
        merged = merged.mul_(scale)
    return torch.add(base, merged, out=out)


# From this many models up, torch's sum over stacked models (mergekit's) no longer adds them
# one after another (it keeps several partial sums), so the block is stacked and summed as mergekit does.
STACKED_SUM_MIN = 5


def _first_term(value: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``0 + value * factor``, in place of ``value``: the first term of a sum in model order.

    torch sums stacked models from +0, so where every term is -0 its sum is +0; a sum that starts
    from this term (never -0) gives those bits without a pass of its own. One rounding either way:
    adding 0 to a product changes no bit but a zero's sign, fused or not.
    """
    return torch.addcmul(value.new_zeros(()), value, factor, out=value)


def _sum_of_products_in_order(values: Sequence[torch.Tensor], flags: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i values[i] * flags[i]`` as :func:`_sum_in_order` sums those products, where one factor of
    each product is 0 or 1 (an agreement), so every product is exact.

    Overwrites ``values`` (not needed afterwards). Where the sum is added term by term in the
    dtype itself, each product is added as it is formed (one pass instead of two: an exact
    product added once rounds as the separate product and sum do).
    """
    first = _first_term(values[0], flags[0])
    if len(values) >= STACKED_SUM_MIN or first.dtype in (torch.bfloat16, torch.float16):
        return _sum_in_order([first] + [v.mul_(f) for v, f in zip(values[1:], flags[1:])])
    for value, flag in zip(values[1:], flags[1:]):
        first.addcmul_(value, flag)
    return first


def _sum_in_order(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum over models as torch sums stacked models: in model order, accumulated in float32 for
    16-bit dtypes; from STACKED_SUM_MIN models up, by that reduction itself (on one block: small).

    torch's reduction starts from +0: below STACKED_SUM_MIN its bits are those of a first term
    that is never -0 (see :func:`_first_term`); the sums of signs and weights need no such care
    (sign() gives +0, and a zero divisor or vote is the same whatever its sign).
    """
    if len(terms) >= STACKED_SUM_MIN:
        return torch.stack(list(terms)).sum(0)
    dtype = terms[0].dtype
    if dtype in (torch.bfloat16, torch.float16):
        total = terms[0].float()
    elif len(terms) > 1:
        total = torch.add(terms[0], terms[1])  # (a + b) + c, as the clone of a plus b would give
        terms = terms[1:]
    else:
        total = terms[0].clone()
    for term in terms[1:]:
        total += term
    return total.to(dtype)


def sign_agreement(weighted: Sequence[torch.Tensor], method: Consensus) -> list[torch.Tensor]:
    """Per model: 1 where its sign equals the elected sign, else 0 (zero and NaN never agree), in
    the deltas' dtype.

    The election is mergekit's ``votes >= 0`` (a tie elects +, a NaN -), and agreement
    ``sign(x) == elected``, both without bool masks (whose products do not vectorise on the CPU):
    ``copysign(1, votes)``, a NaN vote counted as -1, is the elected
    sign wherever a model can agree (votes of -0 come only from entries every model has at zero,
    where none agrees), and the comparison is written in place into the signs as 1 or +0, so
    ``x * agreement`` is ``x * True`` or ``x * False`` to the bit.
    """
    signs = [x.sign() for x in weighted]
    if method == "sum":
        votes = _sum_in_order(weighted)
    elif method == "count":
        votes = _sum_in_order(signs)
    else:
        raise ValueError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    # A NaN vote elects -1, as ``votes >= 0`` does (its sign bit says nothing).
    elected = torch.copysign(torch.ones((), dtype=votes.dtype, device=votes.device), votes.nan_to_num_(nan=-1.0))
    return [s.eq_(elected) for s in signs]


# -- the whole-tensor phase: masks and rescale factors ---------------------------------


def make_trims(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    densities: Sequence[float],
    method: Sparsification,
    *,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    generator: torch.Generator | None = None,
    trim_ties: TrimTies = "sort",
    executor: Executor | None = None,
) -> list[Trim]:
    """One :class:`Trim` per model (``gammas`` per model for breadcrumbs, ``epsilons`` for DELLA).

    With an ``executor``, mid-sized tensors get one model's mask per thread, and DARE draws
    the units of each mask in its threads (the engine passes its pool; called directly, the
    masks are made one after another).
    """
    gammas = gammas if gammas is not None else [BREADCRUMBS_GAMMA] * len(tensors)
    epsilons = epsilons if epsilons is not None else [0.15] * len(tensors)

    def one(x: torch.Tensor, density: float, gamma: float, epsilon: float, units: Executor | None = None,
            index: int = 0) -> Trim:
        return make_trim(x, base, density, method, gamma=gamma, epsilon=epsilon, rescale=rescale,
                         rescale_mode=rescale_mode, generator=generator, trim_ties=trim_ties, executor=units,
                         model_index=index)

    # DELLA draws model after model from one generator, in model order; DARE seeds each model by its
    # index and draws the units of one model's mask in parallel.
    if method == "bernoulli":
        return [one(x, d, g, e, executor, i) for i, (x, d, g, e) in enumerate(zip(tensors, densities, gammas,
                                                                                    epsilons))]
    parallel = (method not in RANDOM_SPARSIFICATIONS and base.device.type == "cpu" and len(tensors) > 1
                and PARALLEL_MIN <= base.numel() <= PARALLEL_MAX)
    if executor is not None and parallel:
        return list(executor.map(one, tensors, densities, gammas, epsilons))
    return [one(x, d, g, e) for x, d, g, e in zip(tensors, densities, gammas, epsilons)]


# DARE draws its mask in units of this many flat entries, each from a generator of its own, seeded by
# the model's seed (the tensor generator's seed and the model's index) and the unit's index: a mask does
# not depend on the threads that draw it, on which part of the tensor a merge reads first, or on the
# other models.
DRAW_UNIT = 1 << 20


def model_seed(generator: torch.Generator, index: int) -> int:
    """The seed of model ``index``'s DARE mask: from the tensor generator's seed (run seed and tensor
    name), never from its state, so finding it costs no draw (on a GPU, no wait for the device)."""
    return zlib.crc32(f"{generator.initial_seed()}:{index}".encode())


def bernoulli_mask(numel: int, density: float, seed: int, device: torch.device,
                   executor: Executor | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
    """A flat bool mask, True with probability ``density``.

    Unit ``u`` draws from a generator seeded by CRC32 of ``seed`` and ``u``. On the CPU that is
    numpy's SFC64, whose raw 64-bit outputs are read as two 32-bit draws each (low half first), an
    entry kept where its draw is below ``density * 2**32``: four times faster than torch's float32
    uniforms, with a finer keep probability (2^-32 steps instead of 2^-24); elsewhere torch's
    generator of the device, an entry kept where its float32 uniform is below ``density``. Either
    costs a fraction of ``torch.bernoulli`` of a probability tensor and needs no such tensor; on
    the CPU the units run in ``executor``'s threads (each generator is used by one thread).
    ``span``: only the flat entries ``[start, stop)`` of a tensor of ``numel`` entries (a row
    block), the same values as there in the whole tensor's mask.
    """
    start, stop = span if span is not None else (0, numel)
    mask = torch.zeros(stop - start, dtype=torch.bool, device=device)
    if density <= 0:
        return mask
    if density >= 1:
        return mask.fill_(True)
    threshold = np.uint32(int(density * 2**32))
    flat = mask.numpy() if device.type == "cpu" else None

    def draw(unit: int) -> None:
        first = unit * DRAW_UNIT
        last = min(numel, first + DRAW_UNIT)
        unit_seed = zlib.crc32(f"{seed}:{unit}".encode())
        lo, hi = max(first, start), min(last, stop)
        # The unit's whole draw, even where a row block needs part of it: a draw's values may
        # depend on its length on some devices.
        if flat is not None:
            raw = np.random.SFC64(unit_seed).random_raw((last - first + 1) // 2)
            draws = raw.astype("<u8", copy=False).view("<u4")  # the low half first, on any host
            np.less(draws[lo - first : hi - first], threshold, out=flat[lo - start : hi - start])
            return
        unit_generator = torch.Generator(device=device)
        unit_generator.manual_seed(unit_seed)
        uniforms = torch.rand(last - first, generator=unit_generator, device=device)
        torch.lt(uniforms[lo - first : hi - first], density, out=mask[lo - start : hi - start])

    units = range(start // DRAW_UNIT, math.ceil(stop / DRAW_UNIT))
    if executor is not None and device.type == "cpu" and len(units) > 1:
        list(executor.map(draw, units))
    else:
        for unit in units:
            draw(unit)
    return mask


def dare_trim(mask: torch.Tensor, density: float, rescale: bool, rescale_mode: RescaleMode,
              work_dtype: torch.dtype | None, l1_factor: torch.Tensor | None) -> Trim:
    """DARE's trim from its mask: no rescale, ``1 / density``, or the L1 factor (see :class:`L1Sums`)."""
    if not rescale:
        return Trim(mask, work_dtype=work_dtype)
    if rescale_mode == "inverse_density":
        return Trim(mask, divide=density if density > 0 else None, work_dtype=work_dtype)
    return Trim(mask, multiply=l1_factor, work_dtype=work_dtype)


def dare_work_dtype(delta_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """As mergekit: bf16 and non-CPU deltas keep their dtype (None), other CPU dtypes rescale in float32."""
    return None if delta_dtype == torch.bfloat16 or device.type != "cpu" else torch.float32


def make_trim(
    x: torch.Tensor,
    base: torch.Tensor,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    gamma: float = BREADCRUMBS_GAMMA,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    trim_ties: TrimTies = "sort",
    executor: Executor | None = None,
    model_index: int = 0,
) -> Trim:
    """Keeps a ``density`` fraction of ``x - base``; ``density >= 1`` keeps it whole.

    ``executor`` draws DARE's mask a unit at a time in its threads, from the seed of model
    ``model_index`` (see :func:`bernoulli_mask`).

    ``rescale`` restores the magnitude of what was dropped: ``"l1"`` (mergekit's
    default) matches the kept entries' L1 norm to the whole delta's, per tensor;
    ``"inverse_density"`` divides by ``density`` (the DARE paper).
    """
    if density >= 1:
        return KEEP_ALL
    if method == "della":
        return della_trim(x, base, density, epsilon, rescale=rescale, rescale_mode=rescale_mode,
                          generator=generator)
    if method == "bernoulli":
        if generator is None:
            raise ValueError("random sparsification needs a seeded generator")
        delta = x - base
        work_dtype = dare_work_dtype(delta.dtype, delta.device)
        mask = bernoulli_mask(delta.numel(), density, model_seed(generator, model_index), delta.device, executor)
        factor = None
        if rescale and rescale_mode == "l1":
            sums = L1Sums(delta.numel())
            sums.add((delta if work_dtype is None else delta.to(work_dtype)).reshape(-1), mask)
            factor = sums.factor()
        return dare_trim(mask, density, rescale, rescale_mode, work_dtype, factor)
    return magnitude_trim((x - base).abs_().reshape(-1), method, density, gamma=gamma, trim_ties=trim_ties,
                          rescale=rescale, rescale_mode=rescale_mode)


def magnitude_trim(magnitudes: torch.Tensor, method: Sparsification, density: float, *, gamma: float,
                   trim_ties: TrimTies, rescale: bool, rescale_mode: RescaleMode) -> Trim:
    """The trim of a task vector by its flat ``magnitudes`` (TIES' top-k or breadcrumbs' range), which it
    may reorder (they are the caller's temporaries)."""
    if method == "magnitude":
        mask = magnitude_mask(magnitudes, density, trim_ties, consume=not rescale)
    elif method == "breadcrumbs":
        mask = breadcrumbs_mask(magnitudes, density, gamma, consume=not rescale)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    return _with_rescale(mask, magnitudes, rescale, rescale_mode, density, None)


def della_trim(
    x: torch.Tensor,
    base: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    generator: torch.Generator | None = None,
) -> Trim:
    """DELLA's MAGPRUNE: drops each entry of ``x - base`` at random, larger ones less often.

    Within each row (along dim 1, as mergekit; a 1-D tensor is one row) the entries are
    ranked by magnitude, and the keep probability rises linearly with the rank from
    ``density - epsilon`` (the smallest) to ``density + epsilon`` (the largest). One
    Bernoulli draw per tensor, from ``generator``, in mergekit's order.
    """
    if density >= 1:
        return KEEP_ALL
    if (problem := della_probability_problem(density, epsilon)) is not None:
        raise ValueError(problem)
    delta = x - base
    if density <= 0 or delta.numel() == 0:
        return Trim(torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device))
    if generator is None:
        raise ValueError("random sparsification needs a seeded generator")
    work_dtype = della_work_dtype(delta.dtype, delta.device)
    mask = della_mask(delta, density, epsilon, work_dtype, generator)
    # In place: delta (or its float32 copy) is not needed any more.
    magnitudes = delta.to(work_dtype).abs_().reshape(-1)
    return _with_rescale(mask, magnitudes, rescale, rescale_mode, density,
                         None if work_dtype == delta.dtype else work_dtype)


def della_work_dtype(delta_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """As mergekit: bf16 and non-CPU task vectors keep their dtype; other CPU dtypes work in float32."""
    return delta_dtype if delta_dtype == torch.bfloat16 or device.type != "cpu" else torch.float32


def della_mask(delta: torch.Tensor, density: float, epsilon: float, work_dtype: torch.dtype,
               generator: torch.Generator) -> torch.Tensor:
    """MAGPRUNE's flat keep mask of ``delta`` (or of a block of its rows: ranks are taken along dim 1,
    and on the CPU the Bernoulli draw of a block continues the generator's stream where the block
    before it left it, so blocks drawn in order give the whole tensor's mask; on the CPU the rows
    are ranked and drawn a group at a time for that reason too)."""
    if delta.device.type != "cpu" or delta.dim() < 2:
        probs = della_keep_probabilities(delta, density, epsilon, work_dtype)
        return torch.bernoulli(probs, generator=generator).reshape(-1).bool()
    # On the CPU a few rows at a time: the ranks' sort indices (8 bytes an entry) stay small.
    mask = torch.empty(delta.numel(), dtype=torch.bool)
    per_row = delta.numel() // max(1, delta.shape[0])
    step = max(1, DELLA_ROW_GROUP // max(1, per_row))
    for start in range(0, delta.shape[0], step):
        probs = della_keep_probabilities(delta[start : start + step], density, epsilon, work_dtype)
        mask[start * per_row : (start + probs.shape[0]) * per_row] = torch.bernoulli(
            probs, generator=generator).reshape(-1)
    return mask


# DELLA ranks and draws this many entries' rows at a time on the CPU.
DELLA_ROW_GROUP = 1 << 20


def della_keep_probabilities(
    delta: torch.Tensor, density: float, epsilon: float, work_dtype: torch.dtype
) -> torch.Tensor:
    """Each entry's keep probability, by its magnitude's rank along dim 1, in ``work_dtype``.

    The shape is mergekit's: a 1-D (or 0-D) delta becomes one row, so the Bernoulli draw
    that follows consumes the generator's stream in the same order.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    if n == 1:
        # Ranks 1 to 1 normalise to 0/0 (mergekit fails there); a lone entry gets the mean.
        return torch.full_like(rows, density, dtype=work_dtype)
    # The argsort decides the order among equal magnitudes: the same call as mergekit's,
    # on the same (unconverted) magnitudes, ranks ties alike.
    order = torch.argsort(rows.abs(), dim=1, descending=False)
    positions = torch.arange(n, device=rows.device).reshape(1, n, *([1] * (rows.dim() - 2))).expand_as(order)
    # The inverse permutation: what mergekit gets from a second argsort, in O(n).
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(work_dtype) + 1
    # min and max of the ranks are 1 and n, but rounded as mergekit rounds them (bf16 ranks
    # above 256 are inexact), so they are computed, not written down.
    low = ranks.amin(dim=1, keepdim=True)
    high = ranks.amax(dim=1, keepdim=True)
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_probability_problem(density: float, epsilon: float) -> str | None:
    """Why keep probabilities from ``density - epsilon`` to ``density + epsilon`` do not work, or None.

    mergekit refuses ``density + epsilon >= 1`` or ``density - epsilon <= 0`` when
    ``0 < density < 1`` (density 0 and 1 draw nothing); a negative epsilon passes that
    test but must still leave every probability in [0, 1].
    """
    if not 0 < density < 1:
        return None
    low, high = density - epsilon, density + epsilon
    if high >= 1 or low <= 0 or low > 1 or high < 0:
        return (f"density {density:g} with epsilon {epsilon:g} gives keep probabilities from {low:g} to "
                f"{high:g}, which must lie in (0, 1) (use 0 <= epsilon < {min(density, 1 - density):g})")
    return None


def della_probabilities_in_range(params: Mapping[str, Any]) -> str | None:
    """The recipe check for DELLA: each model's density and epsilon, before any tensor is read."""
    pairs = zip(params.get("density", []), params.get("epsilon", []))
    problems = [f"model {i + 1}: {problem}" for i, (density, epsilon) in enumerate(pairs)
                if (problem := della_probability_problem(density, epsilon)) is not None]
    return "; ".join(problems) or None


def threshold_trim(x: torch.Tensor, base: torch.Tensor, threshold: float, rescale: bool) -> Trim:
    """Keeps the entries with ``|x - base| >= threshold`` (TIES trim_scope: model)."""
    magnitudes = (x - base).abs_().reshape(-1)
    return _with_rescale(magnitudes >= threshold, magnitudes, rescale, "l1", 1.0, None)


def _with_rescale(
    mask: torch.Tensor, magnitudes: torch.Tensor, rescale: bool, mode: RescaleMode, density: float,
    work_dtype: torch.dtype | None,
) -> Trim:
    if not rescale:
        return Trim(mask, work_dtype=work_dtype)
    if mode == "inverse_density":
        return Trim(mask, divide=density if density > 0 else None, work_dtype=work_dtype)
    # Summed unit by unit, as a tensor merged in row blocks sums it.
    sums = L1Sums(magnitudes.numel())
    sums.add(magnitudes.reshape(-1), mask)
    return Trim(mask, multiply=sums.factor(), work_dtype=work_dtype)


def magnitude_mask(magnitudes: torch.Tensor, density: float, ties: TrimTies = "sort",
                   consume: bool = False) -> torch.Tensor:
    """True for the ``max(1, int(density * n))`` largest of the flat ``magnitudes``.

    Entries tied at the threshold make "the k largest" ambiguous; ``ties`` says which survive:

    - ``"sort"`` breaks them as ``torch.argsort(descending=True)`` does, which is what
      mergekit does, so merges match it entry for entry. The order among equal entries is
      whatever the device's sort gives; on the CPU only the partitions of the sort that decide
      it are replayed (see :mod:`sort_replay`), O(n) expected, elsewhere a full sort.
    - ``"index"`` keeps exactly k too, breaking ties by position (the lowest flat index
      first, the order of a stable sort). Found by selection in O(n): several times
      faster, and the same on every device.
    - ``"keep"`` keeps every entry at or above the k-th largest, as the TIES paper's code.

    ``consume`` lets an exact trim reorder ``magnitudes`` (see :func:`sorted_range`).
    """
    n = magnitudes.numel()
    if density <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    k = top_k_count(density, n)
    if ties != "sort":
        return top_k_mask(magnitudes.reshape(-1), k, ties)
    # A sort decides only which of the entries tied at the threshold are kept; when all of
    # them are, the O(n) selection gives the sort's mask (common for float32 task vectors).
    # It looks at the sort's keys: float64 magnitudes equal in float32 are ties to the sort.
    keys = magnitudes if magnitudes.dtype in EXACT_IN_FLOAT32 or magnitudes.device.type != "cpu" else magnitudes.float()
    exact = top_k_mask(keys.reshape(-1), k, "unambiguous") if n >= SORT_AVOIDABLE_MIN else None
    del keys
    if exact is not None:
        return exact
    return sorted_range(magnitudes.reshape(-1), 0, k, descending=True, consume=consume)


# Magnitudes whose float32 keys are exact: the selection may look at them as they are.
EXACT_IN_FLOAT32 = frozenset({torch.bfloat16, torch.float16, torch.float32})


def sort_order(magnitudes: torch.Tensor, descending: bool) -> torch.Tensor:
    """The permutation ``torch.argsort`` gives the flat ``magnitudes`` (on the CPU: their float32 keys,
    as mergekit sorts them), with the least memory and time it can.

    The permutation of an unstable sort depends only on the outcomes of its comparisons, so keys in
    the same order give it under the same algorithm. With the pinned torch build, sorting 16-bit
    integers descending runs the algorithm that sorts float32 keys (ascending takes another path,
    with another order among ties, and other builds may differ: the tests check the permutation,
    not this reasoning), so 16-bit magnitudes (non-negative, so their bit patterns order as their
    values) sort descending as 2-byte integers, a fifth faster than float32 keys and half their
    memory, unless a NaN is among them (NaNs are equal to a float sort, not their payloads).
    Otherwise a float32 copy is sorted in place, without the sorted copy ``argsort`` makes.
    """
    if magnitudes.device.type != "cpu":
        return torch.argsort(magnitudes, descending=descending)
    if (descending and magnitudes.dtype in (torch.bfloat16, torch.float16)
            and not bool(magnitudes.isnan().any())):
        return torch.argsort(magnitudes.view(torch.int16), descending=descending)
    keys = magnitudes.to(torch.float32, copy=True)
    order = torch.empty(keys.numel(), dtype=torch.int64)
    torch.sort(keys, descending=descending, out=(keys, order))
    return order


def breadcrumbs_mask(magnitudes: torch.Tensor, density: float, gamma: float, consume: bool = False) -> torch.Tensor:
    """Drops the largest ``gamma * n`` and the smallest ``n - density*n - gamma*n`` entries."""
    n = magnitudes.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        bottom, top = 0, n - keep
    return sorted_range(magnitudes.reshape(-1), bottom, n - top, descending=False, consume=consume)


def sorted_range(magnitudes: torch.Tensor, lo: int, hi: int, descending: bool, consume: bool = False) -> torch.Tensor:
    """True for the flat ``magnitudes`` that ``torch.argsort`` (on the CPU: of their float32 keys, as
    mergekit sorts them) puts at positions ``lo`` to ``hi - 1``.

    On the CPU the sort is replayed only where it decides that (see :mod:`sort_replay`), on keys in
    the float32 keys' order: 16-bit magnitudes as their int16 bit patterns (non-negative floats
    order as their bits). NaNs, a replay that would reach the sort's heap-sort fallback, and other
    devices sort in full. ``consume`` lets the replay reorder ``magnitudes`` (contiguous) in place of
    a copy of its keys: for a caller that does not need them afterwards.
    """
    magnitudes = magnitudes.reshape(-1)
    if magnitudes.device.type == "cpu" and replays_this_sort() and not bool(magnitudes.isnan().any()):
        converted = magnitudes.dtype not in EXACT_IN_FLOAT32  # the keys are a copy of our own
        keys = (magnitudes.float() if converted else magnitudes.view(torch.int16) if magnitudes.itemsize == 2
                else magnitudes)
        mask = sorted_range_mask(keys, lo, hi, descending,
                                 consume=converted or (consume and keys.is_contiguous()))
        if mask is not None:
            return mask
    order = sort_order(magnitudes, descending)
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    mask[order[lo:hi]] = True
    return mask
