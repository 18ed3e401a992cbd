"""Closed-form reference tests for every registered merge method and for parameter resolution.

Every kernel is called directly on small hand-made tensors whose merged value
can be worked out by hand; the arithmetic is written next to each expected
literal. The semantics are those of docs/methods.md (mergekit 0.1.5
where it differs in a detail).
"""

from __future__ import annotations

import ast
import math
import typing
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mergekit_like.errors import MergeError
from mergekit_like.merge.parameters import (
    LayerPosition,
    NoValue,
    interpolate_gradient,
    layer_count,
    layer_index,
    resolve_value,
)
from mergekit_like.methods import BaseUse, PerModel, Range, all_methods, get_method, merge_method, registry

F32 = torch.float32
F64 = torch.float64

# The methods this file checks in closed form (the registry may hold more).
COVERED = {
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
}


def vec(*values: float, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected: torch.Tensor | list, *, dtype: torch.dtype = F32) -> None:
    """Tight comparison: a few ulps of the dtype."""
    expected_t = torch.as_tensor(expected, dtype=dtype)
    tol = 1e-6 if dtype == F32 else 1e-13
    torch.testing.assert_close(actual, expected_t, rtol=tol, atol=tol)


def kernel(name: str):
    return get_method(name).kernel


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# linear, uniform_soup
# ---------------------------------------------------------------------------


def test_linear_normalized_unequal_weights() -> None:
    x1, x2 = vec(1, 2), vec(3, 6)
    out = kernel("linear")([x1, x2], weight=[1.0, 3.0], normalize=True)
    # (1*1 + 3*3)/4 = 2.5 ; (1*2 + 3*6)/4 = 5
    assert torch.equal(out, vec(2.5, 5.0))


def test_linear_normalize_is_the_default() -> None:
    out = kernel("linear")([vec(1, 2), vec(3, 6)], weight=[1.0, 3.0])
    assert torch.equal(out, vec(2.5, 5.0))


def test_linear_not_normalized() -> None:
    out = kernel("linear")([vec(1, 2), vec(3, 6)], weight=[1.0, 3.0], normalize=False)
    # 1*1 + 3*3 = 10 ; 1*2 + 3*6 = 20
    assert torch.equal(out, vec(10.0, 20.0))


def test_linear_fractional_weights() -> None:
    out = kernel("linear")([vec(0, 4), vec(8, 0), vec(4, 4)], weight=[0.5, 0.25, 0.25])
    # (0.5*0 + 0.25*8 + 0.25*4)/1 = 3 ; (0.5*4 + 0 + 0.25*4)/1 = 3
    assert torch.equal(out, vec(3.0, 3.0))


def test_linear_zero_weight_sum_with_normalize_raises() -> None:
    with pytest.raises(MergeError):
        kernel("linear")([vec(1, 2), vec(3, 4)], weight=[1.0, -1.0], normalize=True)


def test_linear_zero_weight_sum_without_normalize_is_fine() -> None:
    out = kernel("linear")([vec(1, 2), vec(3, 5)], weight=[1.0, -1.0], normalize=False)
    # 1 - 3 = -2 ; 2 - 5 = -3
    assert torch.equal(out, vec(-2.0, -3.0))


def test_linear_keeps_float64() -> None:
    out = kernel("linear")([vec(0.1, 0.2, dtype=F64), vec(0.3, 0.4, dtype=F64)], weight=[1.0, 1.0])
    assert out.dtype == F64
    close(out, [0.2, 0.3], dtype=F64)  # (0.1+0.3)/2, (0.2+0.4)/2


def test_uniform_soup_is_the_mean() -> None:
    out = kernel("uniform_soup")([vec(1, 0, -3), vec(2, 4, 0), vec(6, 2, 0)])
    # (1+2+6)/3 = 3 ; (0+4+2)/3 = 2 ; (-3+0+0)/3 = -1
    assert torch.equal(out, vec(3.0, 2.0, -1.0))


# ---------------------------------------------------------------------------
# task_arithmetic
# ---------------------------------------------------------------------------

TA_BASE = vec(1, 1)
TA_MODELS = [vec(2, 3), vec(0, 5)]  # d1 = [1, 2], d2 = [-1, 4]


def test_task_arithmetic_plain_sum() -> None:
    out = kernel("task_arithmetic")(TA_MODELS, base=TA_BASE, weight=[1.0, 2.0])
    # sum w d = [1 - 2, 2 + 8] = [-1, 10] ; + base = [0, 11]
    assert torch.equal(out, vec(0.0, 11.0))


def test_task_arithmetic_lambda() -> None:
    out = kernel("task_arithmetic")(TA_MODELS, base=TA_BASE, weight=[1.0, 2.0], lambda_=0.5)
    # 0.5 * [-1, 10] = [-0.5, 5] ; + base = [0.5, 6]
    assert torch.equal(out, vec(0.5, 6.0))


def test_task_arithmetic_lambda_and_normalize() -> None:
    out = kernel("task_arithmetic")(TA_MODELS, base=TA_BASE, weight=[1.0, 2.0], lambda_=0.5, normalize=True)
    # [-1, 10] / 3 * 0.5 = [-1/6, 5/3] ; + base = [5/6, 8/3]
    close(out, [5 / 6, 8 / 3])


def test_task_arithmetic_identical_models_give_the_model() -> None:
    x = vec(3, -2, 7)
    out = kernel("task_arithmetic")([x, x], base=vec(1, 1, 1), weight=[0.5, 0.5])
    # base + 0.5 d + 0.5 d = x
    assert torch.equal(out, x)


# ---------------------------------------------------------------------------
# ties
# ---------------------------------------------------------------------------

TIES_BASE = vec(10, 10, 10, 10)
TIES_DELTAS = [vec(2, 1, 0, -3), vec(2, -1, 0, 1), vec(-1, 1, 0, 2)]
TIES_MODELS = [TIES_BASE + d for d in TIES_DELTAS]
TIES_WEIGHTS = [1.0, 1.0, 5.0]
# D_i = w_i d_i:  D1 = [2, 1, 0, -3], D2 = [2, -1, 0, 1], D3 = [-5, 5, 0, 10]
# sum D = [-1, 5, 0, 8]  -> elected sign (sum) = [-, +, + (0 >= 0), +]
# sign counts        = [+1, +1, 0, +1] -> elected sign (count) = [+, +, +, +]
# At entry 0 the weighted sum is negative but 2 of 3 models are positive.


def test_ties_sum_election_with_disjoint_mean() -> None:
    out = kernel("ties")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[1.0] * 3)
    # e0: only D3 agrees: -5/5 = -1        -> 9
    # e1: D1, D3 agree: (1 + 5)/(1 + 5) = 1 -> 11
    # e2: every model is 0: nothing agrees, divisor 0 -> 1, merged 0 -> base 10
    # e3: D2, D3 agree: (1 + 10)/(1 + 5) = 11/6 -> 10 + 11/6
    close(out, [9.0, 11.0, 10.0, 10 + 11 / 6])


def test_ties_count_election_differs_from_sum() -> None:
    out = kernel("ties")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[1.0] * 3, consensus="count")
    # e0: elected + (2 of 3): D1, D2: (2 + 2)/(1 + 1) = 2 -> 12
    # e1: elected +: D1, D3: 6/6 = 1 -> 11 ; e2: base 10 ; e3: D2, D3: 11/6
    close(out, [12.0, 11.0, 10.0, 10 + 11 / 6])


def test_ties_without_normalize() -> None:
    out = kernel("ties")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[1.0] * 3, normalize=False)
    # agreeing sums: [-5, 1 + 5, 0, 1 + 10] -> [5, 16, 10, 21]
    assert torch.equal(out, vec(5.0, 16.0, 10.0, 21.0))


def test_ties_lambda() -> None:
    out = kernel("ties")(
        TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[1.0] * 3, normalize=False, lambda_=0.5
    )
    # 0.5 * [-5, 6, 0, 11] = [-2.5, 3, 0, 5.5] -> [7.5, 13, 10, 15.5]
    assert torch.equal(out, vec(7.5, 13.0, 10.0, 15.5))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_zero_sum_elects_plus(consensus: str) -> None:
    out = kernel("ties")(
        [vec(2, 1), vec(0, 3)], base=vec(1, 2), weight=[1.0, 1.0], density=[1.0, 1.0], consensus=consensus
    )
    # d1 = [1, -1], d2 = [-1, 1]: sum 0 and count 0 -> elected + (>= 0)
    # e0: only d1 agrees: 1/1 -> 1 + 1 = 2 ; e1: only d2: 1 -> 2 + 1 = 3
    assert torch.equal(out, vec(2.0, 3.0))


def test_ties_all_models_zero_keeps_base() -> None:
    base = vec(1.5, -2.0, 3.25)
    out = kernel("ties")([base.clone(), base.clone()], base=base, weight=[1.0, 2.0], density=[0.5, 0.5])
    # every d_i = 0: no entry agrees, the divisor 0 becomes 1, merged = 0
    assert torch.equal(out, base)


def test_ties_trim_keeps_exactly_k_entries() -> None:
    base = torch.zeros(2, 5)
    d = torch.tensor([[0.5, -7.0, 0.1, 3.0, -0.2], [6.0, 0.3, -0.4, 0.05, -1.0]])
    out = kernel("ties")([base + d], base=base, weight=[1.0], density=[0.3])
    # k = int(0.3 * 10) = 3 over the whole tensor: -7, 6, 3 survive
    expected = torch.tensor([[0.0, -7.0, 0.0, 3.0, 0.0], [6.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(out, expected)
    assert int((out != 0).sum()) == 3


def test_ties_trim_keeps_at_least_one_entry() -> None:
    d = vec(0.5, -7.0, 0.1, 3.0, -0.2)
    out = kernel("ties")([d], base=torch.zeros(5), weight=[1.0], density=[0.1])
    # int(0.1 * 5) = 0 -> max(1, 0) = 1 entry: the largest |d|, -7
    assert torch.equal(out, vec(0, -7.0, 0, 0, 0))


def test_ties_density_per_model() -> None:
    d1, d2 = vec(4, 1, 0, 0), vec(0, 0, 1, 3)
    out = kernel("ties")([d1, d2], base=torch.zeros(4), weight=[1.0, 1.0], density=[0.25, 0.5], normalize=False)
    # model 1 keeps int(0.25*4) = 1 entry (4); model 2 keeps 2 (1, 3)
    assert torch.equal(out, vec(4.0, 0.0, 1.0, 3.0))


def test_ties_rescale_matches_l1() -> None:
    base = vec(1, 1, 1, 1, 1)
    d = vec(1, -5, 2, -1, 3)
    out = kernel("ties")([base + d], base=base, weight=[2.0], density=[0.5], rescale=True)
    # k = int(2.5) = 2: keep -5 and 3 ; L1 12 / kept L1 8 = 1.5 -> [0, -7.5, 0, 0, 4.5]
    # D = 2 * that, divisor 2 (normalize) -> + base
    assert torch.equal(out, base + vec(0, -7.5, 0, 0, 4.5))


# ---------------------------------------------------------------------------
# magnitude_prune
# ---------------------------------------------------------------------------


def test_magnitude_prune_adds_the_trimmed_vectors_without_election() -> None:
    out = kernel("magnitude_prune")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[0.5] * 3)
    # each keeps int(0.5 * 4) = 2 entries of largest |d_i|:
    # d1 = [2, 1, 0, -3] -> [2, 0, 0, -3] ; d2 = [2, -1, 0, 1] -> [2, -1, 0, 0] (1 and -1 tie: the first)
    # d3 = [-1, 1, 0, 2] -> [-1, 0, 0, 2] (|-1| = |1| tie: the first)
    # weighted sum, no election, no division: [2 + 2 - 5, -1, 0, -3 + 10] = [-1, -1, 0, 7]
    assert torch.equal(out, TIES_BASE + vec(-1.0, -1.0, 0.0, 7.0))


def test_magnitude_prune_at_density_one_is_task_arithmetic() -> None:
    prune = kernel("magnitude_prune")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, lambda_=0.5)
    arithmetic = kernel("task_arithmetic")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, lambda_=0.5)
    assert torch.equal(prune, arithmetic)


def test_magnitude_prune_normalized_divides_by_the_weight_sum() -> None:
    out = kernel("magnitude_prune")(TIES_MODELS, base=TIES_BASE, weight=TIES_WEIGHTS, density=[0.5] * 3,
                                    normalize=True)
    # [-1, -1, 0, 7] / (1 + 1 + 5)
    close(out, TIES_BASE + vec(-1.0, -1.0, 0.0, 7.0) / 7)


# ---------------------------------------------------------------------------
# dare_linear, dare_ties
# ---------------------------------------------------------------------------

DARE = ["dare_linear", "dare_ties"]


def _dare_inputs(n_models: int = 2, size: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = gen(1234)
    base = torch.randn(size, generator=g)
    return base, [base + torch.randn(size, generator=g) for _ in range(n_models)]


def _dare(name: str, seed: int, **kw: typing.Any) -> torch.Tensor:
    base, models = _dare_inputs()
    kw.setdefault("weight", [1.0, 1.0])
    kw.setdefault("density", [0.5, 0.5])
    return kernel(name)(models, base=base, generator=gen(seed), **kw)


@pytest.mark.parametrize("name", DARE)
def test_dare_same_seed_is_reproducible(name: str) -> None:
    assert torch.equal(_dare(name, 7), _dare(name, 7))


@pytest.mark.parametrize("name", DARE)
def test_dare_other_seed_differs(name: str) -> None:
    assert not torch.equal(_dare(name, 7), _dare(name, 8))


DARE_BASE = vec(1, 2, 3)
DARE_MODELS = [vec(2, 2, 5), vec(0, 4, 3)]  # d1 = [1, 0, 2], d2 = [-1, 2, 0]


def test_dare_linear_density_one_is_task_arithmetic() -> None:
    kw = dict(base=DARE_BASE, weight=[1.0, 0.5], lambda_=2.0)
    out = kernel("dare_linear")(DARE_MODELS, generator=gen(0), density=[1.0, 1.0], **kw)
    # sum w d = [1 - 0.5, 0 + 1, 2 + 0] = [0.5, 1, 2] ; * 2 = [1, 2, 4] ; + base = [2, 4, 7]
    assert torch.equal(out, vec(2.0, 4.0, 7.0))
    assert torch.equal(out, kernel("task_arithmetic")(DARE_MODELS, **kw))


def test_dare_ties_density_one_is_ties() -> None:
    kw = dict(base=DARE_BASE, weight=[1.0, 0.5], lambda_=2.0, normalize=False, density=[1.0, 1.0])
    out = kernel("dare_ties")(DARE_MODELS, generator=gen(0), **kw)
    # D1 = [1, 0, 2], D2 = [-0.5, 1, 0] ; sum = [0.5, 1, 2] -> all +
    # agreeing: [1, 1, 2] ; * 2 = [2, 2, 4] ; + base = [3, 4, 7]
    assert torch.equal(out, vec(3.0, 4.0, 7.0))
    assert torch.equal(out, kernel("ties")(DARE_MODELS, **kw))


@pytest.mark.parametrize("name", DARE)
def test_dare_l1_rescale_preserves_each_task_vector_norm(name: str) -> None:
    # Disjoint supports: entries 0..31 belong to d1 only, 32..63 to d2 only,
    # so each half of the merged delta is one rescaled task vector.
    g = gen(99)
    base = torch.randn(64, generator=g)
    d1 = torch.cat([torch.rand(32, generator=g) + 0.5, torch.zeros(32)])
    d2 = torch.cat([torch.zeros(32), -(torch.rand(32, generator=g) + 0.5)])
    out = kernel(name)([base + d1, base + d2], base=base, generator=gen(3), weight=[1.0, 1.0], density=[0.5, 0.5])
    merged = out - base
    for half, d in ((slice(0, 32), d1), (slice(32, 64), d2)):
        kept = merged[half]
        assert 0 < int((kept.abs() > 1e-6).sum()) < 32  # some dropped, some kept
        torch.testing.assert_close(kept.abs().sum(), d[half].abs().sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DARE)
@pytest.mark.parametrize("density", [0.5, 0.25])
def test_dare_inverse_density_rescale(name: str, density: float) -> None:
    g = gen(5)
    base = torch.zeros(48)
    d = torch.randint(1, 9, (48,), generator=g).float()  # positive integers: no zero, no sign conflict
    out = kernel(name)(
        [base + d], base=base, generator=gen(11), weight=[1.0], density=[density], rescale_mode="inverse_density"
    )
    kept = out != 0
    assert 0 < int(kept.sum()) < 48
    # kept entries are d / density exactly (a power of two), dropped ones 0
    assert torch.equal(out[kept], d[kept] / density)
    # the kept set: 32-bit draws below density * 2^32, from SFC64 seeded by the tensor's seed, model 0 and unit 0
    seed = zlib.crc32(b"11:0")
    draws = np.random.SFC64(zlib.crc32(f"{seed}:0".encode())).random_raw(24).view(np.uint32)
    assert torch.equal(kept, torch.from_numpy(draws < np.uint32(int(density * 2**32))))


@pytest.mark.parametrize("name", DARE)
def test_dare_without_rescale_keeps_kept_entries_unchanged(name: str) -> None:
    base = torch.zeros(40)
    d = torch.arange(1, 41, dtype=F32)
    out = kernel(name)([d], base=base, generator=gen(2), weight=[1.0], density=[0.5], rescale=False)
    kept = out != 0
    assert 0 < int(kept.sum()) < 40
    assert torch.equal(out[kept], d[kept])


# ---------------------------------------------------------------------------
# breadcrumbs, breadcrumbs_ties
# ---------------------------------------------------------------------------

# |d| ranks ascending: idx0 (1), 6 (2), 3 (3), 8 (4), 2 (5), 9 (6), 5 (7), 7 (8), 1 (9), 4 (10)
CRUMBS_D = vec(1, -9, 5, 3, -10, 7, -2, 8, 4, -6)
CRUMBS_BASE = torch.full((10,), 100.0)


def _kept_indices(out: torch.Tensor, base: torch.Tensor) -> list[int]:
    return torch.nonzero(out != base).flatten().tolist()


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        # keep int(0.5*10) = 5; top int(0.1*10) = 1 (idx4); bottom 10-5-1 = 4 (idx0,6,3,8)
        (0.5, 0.1, [1, 2, 5, 7, 9]),
        # keep 3; top 2 (idx4, 1); bottom 10-3-2 = 5 (idx0,6,3,8,2)
        (0.3, 0.2, [5, 7, 9]),
        # keep 5; top int(0.01*10) = 0; bottom 5: the 5 largest stay
        (0.5, 0.01, [1, 4, 5, 7, 9]),
        # keep 9; top 2 would leave bottom -1 < 0: top cut to 10-9 = 1 (idx4), bottom 0
        (0.9, 0.2, [0, 1, 2, 3, 5, 6, 7, 8, 9]),
        # density >= 1 keeps everything, whatever gamma
        (1.0, 0.2, list(range(10))),
    ],
)
def test_breadcrumbs_kept_entries(name: str, density: float, gamma: float, kept: list[int]) -> None:
    out = kernel(name)([CRUMBS_BASE + CRUMBS_D], base=CRUMBS_BASE, weight=[1.0], density=[density], gamma=[gamma])
    assert _kept_indices(out, CRUMBS_BASE) == kept
    expected = CRUMBS_BASE.clone()
    expected[kept] += CRUMBS_D[kept]
    assert torch.equal(out, expected)


# Second task vector: |d2| ranks ascending idx1 (1), 2, 3, 4, 5, 6, 7, 8, 9, 0 (10)
CRUMBS_D2 = vec(10, 1, -2, -3, 4, -5, 6, -7, 8, -9)
# density 0.5, gamma 0.1:  d1 keeps idx 1, 2, 5, 7, 9 -> [0, -9, 5, 0, 0, 7, 0, 8, 0, -6]
#                          d2 keeps idx 5, 6, 7, 8, 9 -> [0, 0, 0, 0, 0, -5, 6, -7, 8, -9]
CRUMBS_PAIR = dict(base=torch.zeros(10), weight=[1.0, 1.0], density=[0.5, 0.5], gamma=[0.1, 0.1])


def test_breadcrumbs_two_models_sum() -> None:
    out = kernel("breadcrumbs")([CRUMBS_D, CRUMBS_D2], **CRUMBS_PAIR)
    # entrywise sum: idx5 7-5 = 2, idx7 8-7 = 1, idx9 -6-9 = -15
    assert torch.equal(out, vec(0, -9, 5, 0, 0, 2, 6, 1, 8, -15))


def test_breadcrumbs_ties_two_models_election() -> None:
    out = kernel("breadcrumbs_ties")([CRUMBS_D, CRUMBS_D2], **CRUMBS_PAIR)
    # sum signs: idx5 (2) +: keep 7 ; idx7 (1) +: keep 8 ; idx9 both -: -15 (normalize off)
    assert torch.equal(out, vec(0, -9, 5, 0, 0, 7, 6, 8, 8, -15))


def test_breadcrumbs_ties_two_models_normalized() -> None:
    out = kernel("breadcrumbs_ties")([CRUMBS_D, CRUMBS_D2], normalize=True, **CRUMBS_PAIR)
    # only idx9 has two agreeing models: -15 / 2 = -7.5 ; the others divide by 1
    assert torch.equal(out, vec(0, -9, 5, 0, 0, 7, 6, 8, 8, -7.5))


def test_breadcrumbs_gamma_per_model() -> None:
    out = kernel("breadcrumbs")(
        [CRUMBS_D, CRUMBS_D2], base=torch.zeros(10), weight=[1.0, 1.0], density=[0.5, 0.3], gamma=[0.1, 0.2]
    )
    # d1 as above; d2 keeps 3, top 2 (idx0, 9), bottom 5 (idx1..5): idx 6, 7, 8 -> [.., 6, -7, 8, 0]
    assert torch.equal(out, vec(0, -9, 5, 0, 0, 7, 6, 1, 8, -6))


# ---------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------


def test_slerp_t0_is_base_exactly() -> None:
    base, other = vec(0.3, -1.7, 2.2), vec(1.1, 0.4, -0.9)
    assert torch.equal(kernel("slerp")([other], base=base, t=0.0), base)


def test_slerp_t1_is_other_exactly() -> None:
    base, other = vec(0.3, -1.7, 2.2), vec(1.1, 0.4, -0.9)
    assert torch.equal(kernel("slerp")([other], base=base, t=1.0), other)


def test_slerp_orthogonal_pair_at_half() -> None:
    out = kernel("slerp")([vec(0, 3)], base=vec(2, 0), t=0.5)
    # theta = pi/2 ; both coefficients sin(pi/4)/sin(pi/2) = cos(pi/4) = sqrt(2)/2
    # sqrt(2)/2 * [2, 0] + sqrt(2)/2 * [0, 3] = [sqrt 2, 1.5 sqrt 2]
    close(out, [math.sqrt(2), 1.5 * math.sqrt(2)])


def test_slerp_float64_path() -> None:
    out = kernel("slerp")([vec(0, 3, dtype=F64)], base=vec(2, 0, dtype=F64), t=1 / 3)
    # theta = pi/2: (1-t) theta = pi/3 -> sin = sqrt(3)/2 ; t theta = pi/6 -> sin = 1/2
    # [2 sqrt(3)/2, 3/2] = [sqrt 3, 1.5]
    assert out.dtype == F64
    close(out, [math.sqrt(3), 1.5], dtype=F64)


def test_slerp_keeps_shape() -> None:
    base = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    other = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    out = kernel("slerp")([other], base=base, t=0.5)
    assert out.shape == (2, 2)
    close(out, [[math.sqrt(2), 1.5 * math.sqrt(2)], [0.0, 0.0]])


@pytest.mark.parametrize("other", [vec(2, 4), vec(-2, -4), vec(1, 2.04)], ids=["parallel", "antiparallel", "near"])
def test_slerp_colinear_falls_back_to_lerp(other: torch.Tensor) -> None:
    base = vec(1, 2)
    out = kernel("slerp")([other], base=base, t=0.3)
    # |cos| > 0.9995 (near: cos([1,2],[1,2.04]) = 5.08/5.08018 = 0.99996): 0.7 * base + 0.3 * other
    close(out, 0.7 * base + 0.3 * other)


def test_slerp_just_below_threshold_is_spherical() -> None:
    base, other = vec(1, 0), vec(1, 0.05)
    out = kernel("slerp")([other], base=base, t=0.5)
    # cos = 1/sqrt(1.0025) = 0.99875 < 0.9995: theta = atan(0.05), c = sin(theta/2)/sin(theta)
    theta = math.atan(0.05)
    c = math.sin(theta / 2) / math.sin(theta)
    close(out, [c * 2, c * 0.05])
    assert not torch.allclose(out, 0.5 * base + 0.5 * other, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tiny", [0.0, 1e-9])
def test_slerp_tiny_base_norm_counts_as_one(tiny: float) -> None:
    out = kernel("slerp")([vec(3, 4)], base=vec(tiny, 0), t=0.5)
    # |base| <= 1e-8 -> 1: dot = 0.6 * tiny ~ 0, theta = pi/2 -> sin(pi/4) * (base + [3, 4])
    # (dividing by the true norm would give dot 0.6 and another result)
    close(out, [3 * math.sqrt(0.5), 4 * math.sqrt(0.5)])


# ---------------------------------------------------------------------------
# wise_ft
# ---------------------------------------------------------------------------

WISE_BASE, WISE_FT = vec(0, 4, -2), vec(4, 0, 2)


def test_wise_ft_alpha_zero_is_base() -> None:
    assert torch.equal(kernel("wise_ft")([WISE_FT], base=WISE_BASE, alpha=0.0), WISE_BASE)


def test_wise_ft_alpha_one_is_finetuned() -> None:
    assert torch.equal(kernel("wise_ft")([WISE_FT], base=WISE_BASE, alpha=1.0), WISE_FT)


def test_wise_ft_alpha_quarter() -> None:
    out = kernel("wise_ft")([WISE_FT], base=WISE_BASE, alpha=0.25)
    # 0.75 * [0, 4, -2] + 0.25 * [4, 0, 2] = [1, 3, -1]
    assert torch.equal(out, vec(1.0, 3.0, -1.0))


def test_wise_ft_default_alpha_is_half() -> None:
    out = kernel("wise_ft")([WISE_FT], base=WISE_BASE)
    assert torch.equal(out, vec(2.0, 2.0, 0.0))


# ---------------------------------------------------------------------------
# model_stock
# ---------------------------------------------------------------------------

# Row 0: base [1,1,1,1], d1 = [1,1,1,1], d2 = [1,1,1,-1]: cos = 2/(2*2) = 0.5
# Row 1: base 0, d1 = d2 = [1,2,3,4]: cos = 1
STOCK_BASE = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
STOCK_X1 = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
STOCK_X2 = torch.tensor([[2.0, 2.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]])


def test_model_stock_known_cosine() -> None:
    out = kernel("model_stock")([STOCK_X1[0], STOCK_X2[0]], base=STOCK_BASE[0])
    # cos 0.5 -> t = 2*0.5/(1 + 0.5) = 2/3 ; mean = [2,2,2,1]
    # 2/3 * [2,2,2,1] + 1/3 * [1,1,1,1] = [5/3, 5/3, 5/3, 1]
    close(out, [5 / 3, 5 / 3, 5 / 3, 1.0])


def test_model_stock_whole_tensor() -> None:
    out = kernel("model_stock")([STOCK_X1, STOCK_X2], base=STOCK_BASE)
    # flattened: d1.d2 = 1+1+1-1 + 1+4+9+16 = 32 ; |d1|^2 = |d2|^2 = 4 + 30 = 34
    # cos = 16/17 -> t = (32/17)/(33/17) = 32/33
    # row 0: (32*[2,2,2,1] + [1,1,1,1])/33 = [65/33, 65/33, 65/33, 1]
    # row 1: 32/33 * [1,2,3,4]
    expected = [[65 / 33, 65 / 33, 65 / 33, 1.0], [32 / 33, 64 / 33, 96 / 33, 128 / 33]]
    close(out, expected)


def test_model_stock_filter_wise_per_row() -> None:
    out = kernel("model_stock")([STOCK_X1, STOCK_X2], base=STOCK_BASE, filter_wise=True)
    # row 0: t = 2/3 as above ; row 1: cos 1 -> t = 2/2 = 1 -> the mean [1,2,3,4]
    close(out, [[5 / 3, 5 / 3, 5 / 3, 1.0], [1.0, 2.0, 3.0, 4.0]])


def test_model_stock_filter_wise_on_a_vector_is_whole_tensor() -> None:
    kw = dict(base=STOCK_BASE[0])
    a = kernel("model_stock")([STOCK_X1[0], STOCK_X2[0]], filter_wise=True, **kw)
    assert a.shape == (4,)
    close(a, [5 / 3, 5 / 3, 5 / 3, 1.0])


def test_model_stock_orthogonal_deltas_keep_base() -> None:
    base = vec(5, -3, 0.25)
    out = kernel("model_stock")([base + vec(1, 0, 0), base + vec(0, 2, 0)], base=base)
    # cos = 0 -> t = 0/(1 + 0) = 0 -> base
    assert torch.equal(out, base)


def test_model_stock_singular_denominator_two_models() -> None:
    base = vec(5, -3)
    out = kernel("model_stock")([base + vec(1, 2), base - vec(1, 2)], base=base)
    # cos = -1 -> 1 + (2-1)(-1) = 0: t = 0 -> base
    assert torch.equal(out, base)


def test_model_stock_singular_denominator_three_models() -> None:
    base = vec(1, 2, dtype=F64)
    s = math.sqrt(3) / 2
    deltas = [vec(1, 0, dtype=F64), vec(-0.5, s, dtype=F64), vec(-0.5, -s, dtype=F64)]
    out = kernel("model_stock")([base + d for d in deltas], base=base)
    # 120 degrees apart: mean cos = -1/2 -> 1 + 2 * (-1/2) = 0: t = 0 -> base
    assert torch.equal(out, base)


def test_model_stock_three_models_known_cosine() -> None:
    base = torch.zeros(3)
    deltas = [vec(1, 0, 0), vec(0, 1, 0), vec(1, 1, 0)]
    out = kernel("model_stock")(deltas, base=base)
    # cos12 = 0, cos13 = cos23 = 1/sqrt2 -> mean c = sqrt2/3
    # t = 3c/(1 + 2c) ; mean = [2/3, 2/3, 0]
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    close(out, [t * 2 / 3, t * 2 / 3, 0.0])


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


def test_registry_holds_every_covered_method() -> None:
    assert COVERED <= set(all_methods())


def test_every_registered_method_has_a_closed_form_test() -> None:
    # A closed-form test of method NAME is named test_NAME_...; a method added to the registry
    # without one fails here.
    # A test counts for the method with the longest matching name (test_breadcrumbs_ties_...
    # is breadcrumbs_ties', not breadcrumbs').
    # Closed-form tests live here and in tests/test_methods_*.py (one file per family of methods).
    methods = sorted(all_methods(), key=len, reverse=True)
    names = set(globals())
    for path in Path(__file__).parent.glob("test_methods_*.py"):
        names |= {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    tested = {next((m for m in methods if name.startswith(f"test_{m}_")), None) for name in names}
    untested = [m for m in all_methods() if m not in tested]
    assert untested == [], f"registered methods without a closed-form test: {untested}"


def test_registry_duplicate_name_raises() -> None:
    def dummy(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    declared = merge_method("closed_form_dummy", paper="https://example.org", description="d")(dummy)
    with pytest.raises(ValueError, match="registered twice"):
        registry.build_registry((declared, declared))
    linear_again = merge_method("linear", paper="https://example.org", description="d")(dummy)
    with pytest.raises(ValueError, match="registered twice"):
        registry.build_registry((get_method("linear"), linear_again))


def test_registry_ignores_only_parameters_mergekit_leaves_unused() -> None:
    def dummy(tensors: list[torch.Tensor], *, density: float = 1.0) -> torch.Tensor:
        return tensors[0]

    with pytest.raises(TypeError, match="ignored parameter 'epsilon' is not one of"):
        merge_method("closed_form_eps", paper="https://example.org", description="d",
                     ignored_params=("epsilon",))(dummy)
    with pytest.raises(TypeError, match="'density' is both a kernel parameter and ignored"):
        merge_method("closed_form_both", paper="https://example.org", description="d",
                     ignored_params=("density",))(dummy)
    assert get_method("task_arithmetic").ignored_params == {"int8_mask", "rescale", "density"}


def test_a_per_model_default_must_say_each() -> None:
    def scalar_default(tensors: list[torch.Tensor], *, weight: PerModel[float] = 1.0) -> torch.Tensor:  # type: ignore[assignment]
        return tensors[0]

    with pytest.raises(TypeError, match=r"per-model default is written each\(value\)"):
        merge_method("closed_form_scalar", paper="https://example.org", description="d")(scalar_default)


def test_declared_markers_reach_the_parameter_specs() -> None:
    ties = get_method("ties")
    assert ties.params["density"].per_model and ties.params["density"].default == 1.0
    assert ties.params["density"].bounds == Range(0, 1)
    assert ties.params["weight"].typical is not None and ties.params["weight"].required
    assert get_method("task_arithmetic").params["weight"].typical is None
    assert get_method("wise_ft").sweep_param == "alpha" and get_method("ties").sweep_param is None
    assert ties.prepass is not None and get_method("linear").prepass is None


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_has_a_paper_link(name: str) -> None:
    paper = get_method(name).paper
    assert paper.startswith("https://") and len(paper) > len("https://x.y")


# Non-default values that exercise each method's sparsification in the smoke test.
SMOKE_OVERRIDES: dict[str, dict[str, typing.Any]] = {
    "ties": {"density": 0.5},
    "magnitude_prune": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "slerp": {"t": 0.3},
}


def _smoke_kwargs(name: str, n: int) -> dict[str, typing.Any]:
    method = get_method(name)
    overrides = SMOKE_OVERRIDES.get(name, {})
    kwargs: dict[str, typing.Any] = {}
    for key, spec in method.params.items():
        if key in overrides:
            value = overrides[key]
        elif not spec.required:
            value = spec.default
        elif spec.kind in (float, int):
            value = spec.kind(0.5 if spec.kind is float else 1)
        else:
            pytest.skip(f"{name}: no smoke value for required parameter {key}")
        kwargs[spec.name] = [value] * n if spec.per_model else value
    return kwargs


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_runs_on_random_tensors(name: str) -> None:
    method = get_method(name)
    n = max(method.min_models, 1 if method.max_models == 1 else 2)
    g = gen(0)
    base = torch.randn(4, 8, generator=g)
    tensors = [base + 0.1 * torch.randn(4, 8, generator=g) for _ in range(n)]
    kwargs = _smoke_kwargs(name, n)
    if method.base is not BaseUse.NONE:
        kwargs["base"] = base
    if method.uses_generator:
        kwargs["generator"] = gen(1)
    out = method.kernel(tensors, **kwargs)
    assert out.shape == base.shape and out.dtype == F32
    assert torch.isfinite(out).all()


# Per-model parameters left out (scalar defaults) or given as one scalar for all models.
# d1 = [1, 1, 1], d2 = [2, 2, 2]; density 1 keeps everything, all signs agree:
# ties normalises by default: (1 + 2)/2 = 1.5 ; the others sum: 1 + 2 = 3
PER_MODEL_DEFAULTS = {"ties": 1.5, "magnitude_prune": 3.0, "dare_linear": 3.0, "dare_ties": 3.0, "breadcrumbs": 3.0,
                      "breadcrumbs_ties": 3.0}


@pytest.mark.parametrize(("name", "shift"), sorted(PER_MODEL_DEFAULTS.items()))
def test_kernel_per_model_defaults_broadcast(name: str, shift: float) -> None:
    method = get_method(name)
    base = vec(1, 2, 3)
    kwargs: dict[str, typing.Any] = {"base": base, "weight": [1.0, 1.0]}
    if method.uses_generator:
        kwargs["generator"] = gen(0)
    assert torch.equal(method.kernel([base + 1, base + 2], **kwargs), base + shift)


def test_kernel_per_model_scalar_value_broadcasts() -> None:
    base = torch.zeros(4)
    d1, d2 = vec(4, 1, 0, 0), vec(0, 0, 1, 3)
    out = kernel("ties")([d1, d2], base=base, weight=1.0, density=0.5, normalize=False)
    # weight 1 and density 0.5 for both: each keeps int(0.5*4) = 2 entries -> [4, 1, 1, 3]
    assert torch.equal(out, vec(4.0, 1.0, 1.0, 3.0))


# ---------------------------------------------------------------------------
# parameters: gradients and filters
# ---------------------------------------------------------------------------


def _pos(index: int | None, count: int) -> LayerPosition:
    return LayerPosition(index, count)


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0)])
def test_interpolate_gradient_linear(t: float, expected: float) -> None:
    assert interpolate_gradient([0.0, 0.5, 1.0], t) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75), (1.0, 0.5)])
def test_interpolate_gradient_non_monotonic(t: float, expected: float) -> None:
    # [0, 1, 0.5] at t*(3-1): 0.5 -> 0.5 ; 1 -> 1 ; 1.5 -> (1 + 0.5)/2 ; 2 -> 0.5
    assert interpolate_gradient([0.0, 1.0, 0.5], t) == pytest.approx(expected, abs=1e-15)


def test_interpolate_gradient_single_value() -> None:
    assert interpolate_gradient([0.7], 0.0) == 0.7
    assert interpolate_gradient([0.7], 1.0) == 0.7


def test_gradient_over_three_layers() -> None:
    # t = l/2 -> 0, 0.5, 1
    got = [resolve_value([0, 0.5, 1], f"model.layers.{layer}.mlp.up_proj.weight", _pos(layer, 3)) for layer in range(3)]
    assert got == pytest.approx([0.0, 0.5, 1.0], abs=1e-15)


def test_gradient_over_five_layers() -> None:
    # t = l/4 -> 0, 0.25, 0.5, 0.75, 1 ; value at t*2 on [0, 0.5, 1] = t
    got = [resolve_value([0, 0.5, 1], f"model.layers.{layer}.mlp.up_proj.weight", _pos(layer, 5)) for layer in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-15)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
def test_gradient_outside_layers_uses_t0(name: str) -> None:
    assert layer_index(name) is None
    assert resolve_value([0.2, 0.5, 1], name, _pos(None, 5)) == pytest.approx(0.2)


def test_layer_index_and_count() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.11.self_attn.q_proj.weight"]
    assert [layer_index(n) for n in names] == [None, 0, 11]
    assert layer_count(names) == 12
    assert _pos(3, 1).t == 0.0 and _pos(2, 5).t == 0.5


def test_scalar_value_resolves_to_itself() -> None:
    assert resolve_value(0.3, "model.layers.1.mlp.w", _pos(1, 4)) == 0.3
    assert resolve_value(True, "x", _pos(None, 4)) is True


FILTERS = [
    {"filter": "self_attn", "value": 0.3},
    {"filter": "attn", "value": 0.9},
    {"value": 0.5},
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", 0.3),  # matches both 'self_attn' and 'attn': first wins
        ("model.layers.0.cross_attn.q_proj.weight", 0.9),
        ("model.layers.0.mlp.up_proj.weight", 0.5),  # no filter matches: the default entry
    ],
)
def test_filter_list_first_match_wins(name: str, expected: float) -> None:
    assert resolve_value(FILTERS, name, _pos(0, 2)) == expected


def test_filter_entry_without_filter_wins_when_first() -> None:
    value = [{"value": 1.0}, {"filter": "mlp", "value": 2.0}]
    assert resolve_value(value, "model.layers.0.mlp.w", _pos(0, 2)) == 1.0


def test_filter_list_without_default_and_no_match_raises() -> None:
    with pytest.raises(NoValue):
        resolve_value([{"filter": "mlp", "value": 2.0}], "model.layers.0.self_attn.w", _pos(0, 2))


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        (r"re:layers\.[01]\.mlp", "model.layers.1.mlp.up_proj.weight", True),
        (r"re:layers\.[01]\.mlp", "model.layers.2.mlp.up_proj.weight", False),
        (r"re:^lm_head", "lm_head.weight", True),
        ("glob:*.mlp.*", "model.layers.3.mlp.up_proj.weight", True),
        ("glob:mlp", "model.layers.3.mlp.up_proj.weight", False),  # a glob matches the whole name
        ("glob:model.layers.?.self_attn.*", "model.layers.7.self_attn.o_proj.weight", True),
        ("glob:model.layers.?.self_attn.*", "model.layers.17.self_attn.o_proj.weight", False),
        ("mlp", "model.layers.3.mlp.up_proj.weight", True),  # plain form: substring
    ],
)
def test_filter_regex_and_glob_forms(pattern: str, name: str, matches: bool) -> None:
    value = [{"filter": pattern, "value": 1.0}, {"value": 0.0}]
    assert resolve_value(value, name, _pos(None, 1)) == (1.0 if matches else 0.0)


def test_gradient_nested_inside_filter_value() -> None:
    value = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.2}]
    # self_attn at layer l of 5: t = l/4 ; the other tensors 0.2
    got = [resolve_value(value, f"model.layers.{layer}.self_attn.q_proj.weight", _pos(layer, 5)) for layer in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-15)
    assert resolve_value(value, "model.layers.3.mlp.up_proj.weight", _pos(3, 5)) == 0.2
    # a non-layer tensor that matches the filter takes the gradient at t = 0
    assert resolve_value(value, "model.self_attn_pool.weight", _pos(None, 5)) == 0.0


def test_filter_list_nested_inside_filter_value() -> None:
    value = [{"filter": "layers.1.", "value": [{"filter": "mlp", "value": 7.0}, {"value": 3.0}]}, {"value": 1.0}]
    assert resolve_value(value, "model.layers.1.mlp.w", _pos(1, 3)) == 7.0
    assert resolve_value(value, "model.layers.1.self_attn.w", _pos(1, 3)) == 3.0
    assert resolve_value(value, "model.layers.2.mlp.w", _pos(2, 3)) == 1.0
