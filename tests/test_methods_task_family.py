"""Closed-form and mergekit-golden tests of della, della_linear, sce, ram and ramplus_tl.

Each kernel is called directly on small tensors whose merge can be worked out by hand
(the arithmetic is written next to each expected value), and on mergekit 0.1.5's own
kernel outputs stored in tests/data/mergekit_golden/kernels/ (see make_kernel_goldens.py
there), which they must equal bit for bit: for DELLA with a generator seeded as mergekit's
global one was.
"""

from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_like.methods.declaration import MergeMethod
from mergekit_like.methods.della import della
from mergekit_like.methods.della_linear import della_linear
from mergekit_like.methods.ram import ram
from mergekit_like.methods.ramplus_tl import epsilon_divides, ramplus_tl
from mergekit_like.methods.sce import energy_weights, sce, variance_top_k_mask
from mergekit_like.methods.task_vectors import (
    della_keep_probabilities,
    della_probabilities_in_range,
    della_probability_problem,
    della_trim,
    make_trims,
)

F32, BF16 = torch.float32, torch.bfloat16
KERNELS = Path(__file__).parent / "data" / "mergekit_golden" / "kernels"
METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (della, della_linear, sce, ram, ramplus_tl)
}


def vec(*values: float, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: list[float] | torch.Tensor) -> None:
    """A few float32 ulps: for expectations written as decimals."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


def golden_cases(file: str) -> list[dict[str, Any]]:
    with safe_open(KERNELS / f"{file}.safetensors", "pt") as f:
        return json.loads(f.metadata()["cases"])


def golden_tensors(file: str) -> dict[str, torch.Tensor]:
    return load_file(KERNELS / f"{file}.safetensors")


def run_golden(file: str, case: dict[str, Any], seed_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Our output for a stored case (its generator seeded ``seed_offset`` past the case's), and mergekit's."""
    t = golden_tensors(file)
    key = case["key"]
    base, models = t[f"{key}.base"], [t[f"{key}.model{j}"] for j in range(case["models"])]
    params = dict(case["params"])
    if case["kernel"] == "della_magprune":
        trim = della_trim(models[0], base, params["density"], params["epsilon"], rescale=params["rescale"],
                          generator=gen(case["seed"] + seed_offset))
        delta = models[0] - base
        ours = trim.apply_(delta.reshape(-1), slice(0, delta.numel())).reshape(delta.shape)
    else:
        method = METHODS[case["kernel"]]
        if "lambda" in params:
            params["lambda_"] = params.pop("lambda")
        if method.uses_generator:
            params["generator"] = gen(case["seed"] + seed_offset)
        ours = method.kernel(models, base=base, **params)
    return ours, t[f"{key}.out"]


def assert_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs), f"max difference {(ours.double() - theirs.double()).abs().max().item():g}"


def as_stored_equals_cast(method: MergeMethod, **kw: Any) -> None:
    """Models in bf16 beside a float32 base give what models cast to float32 give (inputs_as_stored)."""
    g = gen(321)
    base = torch.randn(6, 8, generator=g)
    models = [(base + torch.randn(6, 8, generator=g)).to(BF16) for _ in range(3)]
    extra = (lambda: {"generator": gen(4)}) if method.uses_generator else dict
    stored = method.kernel(models, base=base, **extra(), **kw)
    cast = method.kernel([m.float() for m in models], base=base, **extra(), **kw)
    assert method.inputs_as_stored
    assert torch.equal(stored, cast)


# ---------------------------------------------------------------------------
# della: the MAGPRUNE trim, then TIES' sign election
# ---------------------------------------------------------------------------

MAGPRUNE_CASES = [c for c in golden_cases("della") if c["kernel"] == "della_magprune"]
DELLA_CASES = [c for c in golden_cases("della") if c["kernel"] != "della_magprune"]


@pytest.mark.parametrize("case", MAGPRUNE_CASES, ids=lambda c: f"{c['key']}-{c['dtype']}")
def test_della_trim_is_mergekits_magprune_bit_for_bit(case: dict[str, Any]) -> None:
    ours, theirs = run_golden("della", case)
    assert_bits(ours, theirs)
    delta = golden_tensors("della")[f"{case['key']}.model0"] - golden_tensors("della")[f"{case['key']}.base"]
    assert 0 < int((ours == 0).sum()) < delta.numel()  # a real draw: some dropped, some kept


@pytest.mark.parametrize("case", DELLA_CASES, ids=lambda c: f"{c['key']}-{c['dtype']}")
def test_della_kernels_are_mergekits_bit_for_bit(case: dict[str, Any]) -> None:
    # della_linear's cases are among these too: one seeded stream, one draw per model in order.
    ours, theirs = run_golden("della", case)
    assert_bits(ours, theirs)


@pytest.mark.parametrize("case", [MAGPRUNE_CASES[0], DELLA_CASES[0]], ids=lambda c: c["key"])
def test_della_golden_needs_the_same_seed(case: dict[str, Any]) -> None:
    # The golden tests can fail: another seed draws other masks.
    ours, theirs = run_golden("della", case, seed_offset=1)
    assert not torch.equal(ours, theirs)


def test_della_keep_probabilities_rise_linearly_with_rank() -> None:
    delta = vec(3, -1, 2, 0.5)
    probs = della_keep_probabilities(delta, 0.5, 0.3, F32)
    # |delta| ranks (1 = smallest): [4, 2, 3, 1] ; (rank - 1) / 3 = [1, 1/3, 2/3, 0]
    # 0.2 + that * 2 * 0.3 = [0.8, 0.4, 0.6, 0.2]
    assert probs.shape == (1, 4)
    close(probs, [[0.8, 0.4, 0.6, 0.2]])


def test_della_keep_probabilities_rank_each_row_of_a_matrix() -> None:
    delta = torch.tensor([[1.0, -4.0, 2.0], [9.0, 8.0, -7.0]])
    probs = della_keep_probabilities(delta, 0.5, 0.25, F32)
    # row 0 ranks [1, 3, 2], row 1 ranks [3, 2, 1] ; (rank - 1)/2 * 0.5 + 0.25
    close(probs, [[0.25, 0.75, 0.5], [0.75, 0.5, 0.25]])


def test_della_lone_entry_rows_get_the_density() -> None:
    # mergekit divides 0 by 0 here and fails; a one-entry row has no rank to go by.
    probs = della_keep_probabilities(torch.ones(3, 1), 0.4, 0.1, F32)
    assert torch.equal(probs, torch.full((3, 1), 0.4))


def test_della_mask_is_the_generators_bernoulli_draw_of_those_probabilities() -> None:
    base = torch.zeros(2, 50)
    x = torch.arange(1, 101, dtype=F32).reshape(2, 50)
    trim = della_trim(x, base, 0.5, 0.3, rescale=False, generator=gen(9))
    expected = torch.bernoulli(della_keep_probabilities(x, 0.5, 0.3, F32), generator=gen(9)).bool()
    assert trim.mask is not None and torch.equal(trim.mask, expected.reshape(-1))
    assert trim.multiply is None  # no rescale asked for


def test_della_drops_small_entries_more_often_than_large_ones() -> None:
    base = torch.zeros(4000)
    x = torch.arange(1, 4001, dtype=F32)  # magnitude = rank
    trim = della_trim(x, base, 0.5, 0.4, generator=gen(0))
    assert trim.mask is not None
    low, high = trim.mask[:400].float().mean(), trim.mask[-400:].float().mean()
    # keep probability 0.1 to 0.14 among the smallest tenth, 0.86 to 0.9 among the largest
    assert low < 0.25 and high > 0.75
    assert 0.45 < trim.mask.float().mean() < 0.55  # density on average


def test_della_masks_are_drawn_in_model_order_even_with_an_executor() -> None:
    # Tensors this large get one model's mask per thread for the other trims; DELLA's draws
    # share one generator, so they must stay in model order.
    g = gen(10)
    base = torch.randn(256, 256, generator=g)
    models = [base + torch.randn(256, 256, generator=g) for _ in range(3)]
    kw: dict[str, Any] = dict(epsilons=[0.1, 0.2, 0.3], rescale=True)
    alone = make_trims(models, base, [0.5, 0.4, 0.6], "della", generator=gen(1), **kw)
    with ThreadPoolExecutor(3) as pool:
        pooled = make_trims(models, base, [0.5, 0.4, 0.6], "della", generator=gen(1), executor=pool, **kw)
    assert all(a.mask is not None and b.mask is not None and torch.equal(a.mask, b.mask)
               for a, b in zip(alone, pooled))


def test_della_l1_rescale_restores_the_task_vectors_norm() -> None:
    base = torch.zeros(8)  # out - base is then exactly the merged delta
    d = vec(4, -3, 2, -1, 8, 7, -6, 5)
    out = della_linear.kernel([base + d], base=base, generator=gen(5), weight=[1.0], density=[0.5], epsilon=[0.3])
    merged = out - base
    kept = merged != 0
    assert 0 < int(kept.sum()) < 8
    # kept entries are d * (|d|_1 / |kept d|_1) = d * 36 / kept L1
    ratio = d.abs().sum() / d[kept].abs().sum()
    assert torch.equal(merged[kept], d[kept] * ratio)
    close(merged.abs().sum(), d.abs().sum())


def test_della_density_one_is_ties_and_draws_nothing() -> None:
    base, models = vec(1, 2, 3), [vec(2, 2, 5), vec(0, 4, 3)]  # d1 = [1, 0, 2], d2 = [-1, 2, 0]
    g = gen(0)
    state = g.get_state()
    out = della.kernel(models, base=base, generator=g, weight=[1.0, 0.5], density=[1.0, 1.0])
    # weighted: [1, 0, 2], [-0.5, 1, 0] ; sums [0.5, 1, 2]: all + ; agreeing [T,F,T], [F,T,F]
    # merged [1, 1, 2] / agreeing weights [1, 0.5, 1] = [1, 2, 2] ; + base = [2, 4, 5]
    assert torch.equal(out, vec(2, 4, 5))
    assert torch.equal(g.get_state(), state)


def test_della_elects_signs_by_weighted_sum() -> None:
    base = vec(0, 0)
    models = [vec(1, -2), vec(-3, 1)]
    out = della.kernel(models, base=base, generator=gen(0), weight=[1.0, 0.25], density=[1.0, 1.0])
    # weighted [1, -2], [-0.75, 0.25] ; sums [0.25, -1.75]: + then - ; entry 0 keeps model 1 (w 1)
    # entry 1 keeps model 1 too: [1/1, -2/1] (unweighted sums [-2, -1] would elect - at entry 0)
    assert torch.equal(out, vec(1, -2))


def test_della_density_zero_or_no_change_gives_the_base() -> None:
    g = gen(3)
    base = torch.randn(4, 6, generator=g)
    models = [base + torch.randn(4, 6, generator=g) for _ in range(2)]
    # every entry dropped: nothing agrees, the divisor 0 becomes 1, merged 0
    out = della.kernel(models, base=base, generator=gen(1), weight=[1.0, 1.0], density=[0.0, 0.0])
    assert torch.equal(out, base)
    # all-zero task vectors: no L1 rescale of a zero norm, nothing to add
    out = della.kernel([base.clone(), base.clone()], base=base, generator=gen(1), weight=[1.0, 1.0],
                       density=[0.5, 0.5])
    assert torch.equal(out, base)


def test_della_same_seed_same_merge_other_seed_other_merge() -> None:
    g = gen(8)
    base = torch.randn(16, 16, generator=g)
    models = [base + torch.randn(16, 16, generator=g) for _ in range(2)]
    kw: dict[str, Any] = dict(base=base, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert torch.equal(della.kernel(models, generator=gen(1), **kw), della.kernel(models, generator=gen(1), **kw))
    assert not torch.equal(della.kernel(models, generator=gen(1), **kw), della.kernel(models, generator=gen(2), **kw))


def test_della_defaults_are_mergekits() -> None:
    p = della.params
    assert (p["normalize"].default, p["rescale"].default, p["lambda"].default) == (True, True, 1.0)
    assert (p["density"].default, p["epsilon"].default) == (1.0, 0.15)
    assert p["weight"].required and p["weight"].per_model and p["epsilon"].per_model
    assert "int8_mask" in della.ignored_params and della.uses_generator


@pytest.mark.parametrize(("density", "epsilon", "refused"), [
    (0.9, 0.15, True),  # up to 1.05
    (0.1, 0.1, True),  # down to 0: mergekit refuses <= 0
    (0.5, 0.5, True),
    (0.5, -0.6, True),  # mergekit's test passes it, but 1.1 and -0.1 are no probabilities
    (0.5, 0.15, False),
    (0.1, -0.1, False),  # 0.2 down to 0: mergekit runs it
    (1.0, 0.5, False),  # density 1 draws nothing
    (0.0, 0.5, False),  # nor does density 0
])
def test_della_refuses_probabilities_outside_the_unit_interval(density: float, epsilon: float,
                                                                refused: bool) -> None:
    problem = della_probability_problem(density, epsilon)
    assert (problem is not None) == refused
    if problem is not None:
        assert "\n" not in problem and f"density {density:g} with epsilon {epsilon:g}" in problem
        with pytest.raises(ValueError, match="keep probabilities"):
            della_trim(vec(1, 2, 3), vec(0, 0, 0), density, epsilon, generator=gen(0))


def test_della_recipe_check_names_the_model_and_values() -> None:
    assert della_probabilities_in_range in della.checks
    params = {"weight": [1.0, 1.0], "density": [0.5, 0.9], "epsilon": [0.15, 0.15]}
    assert della_probabilities_in_range(params) == (
        "model 2: density 0.9 with epsilon 0.15 gives keep probabilities from 0.75 to 1.05, which must lie "
        "in (0, 1) (use 0 <= epsilon < 0.1)")
    assert della_probabilities_in_range({**params, "density": [0.5, 0.8]}) is None
    both = della_probabilities_in_range({**params, "density": [0.05, 0.9]})  # every model's problem, one line
    assert both is not None and both.startswith("model 1: density 0.05 ") and "; model 2: density 0.9 " in both


def test_della_takes_models_as_stored() -> None:
    as_stored_equals_cast(della, weight=[1.0, 0.5, 0.3], density=[0.5, 0.6, 0.7])


# ---------------------------------------------------------------------------
# della_linear: the MAGPRUNE trim, then task arithmetic
# ---------------------------------------------------------------------------


def test_della_linear_density_one_is_task_arithmetic() -> None:
    base, models = vec(1, 2, 3), [vec(2, 2, 5), vec(0, 4, 3)]  # d1 = [1, 0, 2], d2 = [-1, 2, 0]
    out = della_linear.kernel(models, base=base, generator=gen(0), weight=[1.0, 0.5], lambda_=2.0)
    # sum w d = [1 - 0.5, 0 + 1, 2 + 0] = [0.5, 1, 2] ; * 2 = [1, 2, 4] ; + base = [2, 4, 7]
    assert torch.equal(out, vec(2, 4, 7))


def test_della_linear_normalize_divides_by_the_weight_sum() -> None:
    base, models = vec(0, 0), [vec(2, 4), vec(4, -2)]
    out = della_linear.kernel(models, base=base, generator=gen(0), weight=[1.0, 3.0], normalize=True)
    # (1*[2, 4] + 3*[4, -2]) / 4 = [14, -2] / 4 ; no sign election: opposite signs both count
    assert torch.equal(out, vec(3.5, -0.5))


def test_della_linear_defaults_are_mergekits() -> None:
    p = della_linear.params
    assert (p["normalize"].default, p["rescale"].default, p["epsilon"].default) == (False, True, 0.15)
    assert della_probabilities_in_range in della_linear.checks


def test_della_linear_without_rescale_keeps_kept_entries_unchanged() -> None:
    base = torch.zeros(40)
    d = torch.arange(1, 41, dtype=F32)
    out = della_linear.kernel([d], base=base, generator=gen(2), weight=[1.0], density=[0.5], rescale=False)
    kept = out != 0
    assert 0 < int(kept.sum()) < 40
    assert torch.equal(out[kept], d[kept])


def test_della_linear_takes_models_as_stored() -> None:
    as_stored_equals_cast(della_linear, weight=[1.0, 0.5, 0.3], density=[0.5, 0.6, 0.7])


# ---------------------------------------------------------------------------
# sce
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", golden_cases("sce"), ids=lambda c: f"{c['key']}-{c['dtype']}")
def test_sce_is_mergekits_bit_for_bit(case: dict[str, Any]) -> None:
    assert_bits(*run_golden("sce", case))


SCE_BASE = vec(1, 1, 1, 1)


def test_sce_weights_by_mean_square_and_erases_minority_signs() -> None:
    d1, d2 = vec(2, -2, 2, 0), vec(1, 1, -1, 0)
    out = sce.kernel([SCE_BASE + d1, SCE_BASE + d2], base=SCE_BASE)
    # mean squares 12/4 = 3 and 3/4 = 0.75 -> weights 0.8, 0.2
    # sums [3, -1, 1, 0] elect [+, -, +, +]: model 1 agrees at [T, T, T, F], model 2 at [T, F, F, F]
    # [(2*0.8 + 1*0.2) / 1, -2*0.8 / 0.8, 2*0.8 / 0.8, 0 / 1e-6] = [1.8, -2, 2, 0]
    close(out, SCE_BASE + vec(1.8, -2, 2, 0))


def test_sce_select_topk_keeps_the_highest_variance_entries() -> None:
    d1, d2 = vec(2, -2, 2, 0), vec(1, 1, -2, 0)
    models = [SCE_BASE + d1, SCE_BASE + d2]
    # variances ((a - b) / 2)^2 = [0.25, 2.25, 4, 0]: 3 nonzero
    # k = int(3 * 0.5) = 1: entry 2 only -> [0, 0, 2, 0] and [0, 0, -2, 0], weights 0.5, 0.5
    # the sum 0 elects +: model 1's 2 * 0.5 / 0.5
    assert torch.equal(sce.kernel(models, base=SCE_BASE, select_topk=0.5), SCE_BASE + vec(0, 0, 2, 0))
    # k = int(3 * 0.67) = 2: entries 1 and 2 -> sums [0, -1, 0, 0] elect [+, -, +, +]; model 2
    # disagrees at both, so each is model 1's entry, its weight cancelling
    assert torch.equal(sce.kernel(models, base=SCE_BASE, select_topk=0.67), SCE_BASE + vec(0, -2, 2, 0))


def test_sce_variance_mask_counts_only_nonzero_variances() -> None:
    tvs = torch.stack([vec(1, 0, 3, 5), vec(1, 0, 1, 0)])
    # variances [0, 0, 1, 6.25]: 2 nonzero, int(2 * 0.6) = 1 -> the largest only
    assert torch.equal(variance_top_k_mask(tvs, 0.6), vec(0, 0, 0, 1))
    assert torch.equal(variance_top_k_mask(tvs, 0.4), vec(0, 0, 0, 0))  # int(0.8) = 0


def test_sce_top_k_count_is_a_float32_product() -> None:
    # 50 * 0.58 is 28.999999999999996 in double but 29 in float32, mergekit's (a count tensor
    # times the fraction): it keeps 29 entries.
    tvs = torch.stack([torch.arange(1, 51, dtype=F32), torch.zeros(50)])  # 50 distinct variances
    mask = variance_top_k_mask(tvs, 0.58)
    assert int(mask.sum()) == 29 and torch.equal(mask[-29:], torch.ones(29))


def test_sce_select_topk_zero_or_no_change_gives_the_base() -> None:
    g = gen(4)
    base = torch.randn(3, 5, generator=g)
    models = [base + torch.randn(3, 5, generator=g) for _ in range(3)]
    # nothing selected: zero task vectors, nothing agrees, 0 / 1e-6
    assert torch.equal(sce.kernel(models, base=base, select_topk=0.0), base)
    assert torch.equal(sce.kernel([base.clone(), base.clone()], base=base), base)


def test_sce_zero_energy_weights_are_uniform() -> None:
    assert torch.equal(energy_weights(torch.zeros(4, 3)), torch.full((4,), 0.25))
    # 1e-4 squared is below 1e-6 in total too
    assert torch.equal(energy_weights(torch.full((2, 3), 1e-4)), vec(0.5, 0.5))


def test_sce_one_model_is_that_model() -> None:
    x = vec(3, -1, 2, 1)
    # its own sign is elected wherever it changes the base; weight 1 / 1
    assert torch.equal(sce.kernel([x], base=SCE_BASE), x)


def test_sce_takes_models_as_stored() -> None:
    as_stored_equals_cast(sce, select_topk=0.5)


# ---------------------------------------------------------------------------
# ram
# ---------------------------------------------------------------------------

RAM_CASES = golden_cases("ram")


@pytest.mark.parametrize("case", [c for c in RAM_CASES if c["kernel"] == "ram"], ids=lambda c: c["key"])
def test_ram_is_mergekits_bit_for_bit(case: dict[str, Any]) -> None:
    assert_bits(*run_golden("ram", case))


def test_ram_adds_unique_entries_and_averages_shared_ones() -> None:
    base = vec(1, 1, 1, 1, 1)
    d1, d2, d3 = vec(1, 2, 0, 3e-6, 6), vec(3, 0, 0, 5, 3), vec(2, 0, 0, 0, 0)
    out = ram.kernel([base + d1, base + d2, base + d3], base=base)
    # contributors (|d| > 1e-5): [3, 1, 0, 1, 2] -> [(1+3+2)/3, 2, 0, 5 (d1's 3e-6 left out), (6+3)/2]
    close(out, base + vec(2, 2, 0, 5, 4.5))


def test_ram_threshold_is_strict() -> None:
    base = vec(0, 0)
    out = ram.kernel([vec(0.5, 1), vec(0.5, 0.25)], base=base, epsilon=0.5)
    # 0.5 is not above 0.5: entry 0 has no contributor; entry 1 only model 1 (0.25 < 0.5)
    assert torch.equal(out, vec(0, 1))


def test_ram_no_change_gives_the_base() -> None:
    base = vec(1, -2, 3)
    assert torch.equal(ram.kernel([base.clone(), base.clone()], base=base), base)


def test_ram_is_elementwise() -> None:
    # Declared elementwise (the engine may merge it in row blocks): halves merge as the whole.
    g = gen(6)
    base = torch.randn(8, 4, generator=g)
    models = [base + torch.randn(8, 4, generator=g) * (torch.rand(8, 4, generator=g) < 0.5) for _ in range(3)]
    whole = ram.kernel(models, base=base)
    halves = [ram.kernel([m[rows] for m in models], base=base[rows]) for rows in (slice(0, 3), slice(3, 8))]
    assert ram.elementwise and torch.equal(whole, torch.cat(halves))


def test_ram_keeps_the_dtype() -> None:
    out = ram.kernel([vec(1, 2, dtype=BF16)], base=vec(0, 0, dtype=BF16))
    assert out.dtype == BF16 and torch.equal(out, vec(1, 2, dtype=BF16))


def test_ram_takes_models_as_stored() -> None:
    as_stored_equals_cast(ram)


# ---------------------------------------------------------------------------
# ramplus_tl
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in RAM_CASES if c["kernel"] == "ramplus_tl"], ids=lambda c: c["key"])
def test_ramplus_tl_is_mergekits_bit_for_bit(case: dict[str, Any]) -> None:
    assert_bits(*run_golden("ram", case))


RP_BASE = vec(0, 0, 0, 0)
RP_MODELS = [vec(1, 2, 4, 0), vec(3, 0, 0, 6)]
# contributors [2, 1, 1, 1]: shared entry 0; model 1 shares 1 and owns 2, model 2 shares 1 and owns 1


def test_ramplus_tl_reinforces_unique_entries_by_the_overlap_ratio() -> None:
    out = ramplus_tl.kernel(RP_MODELS, base=RP_BASE, r=1.0, alpha=0.8)
    # ratios shared/unique 1/2 and 1/1, clamped to 0.8: 0.5, 0.8 -> factors 1.5, 1.8
    # [(1+3)/2, 2*1.5, 4*1.5, 6*1.8] = [2, 3, 6, 10.8]
    close(out, [2, 3, 6, 10.8])


def test_ramplus_tl_defaults() -> None:
    out = ramplus_tl.kernel(RP_MODELS, base=RP_BASE)
    # ratios 0.5 and 1 clamp to alpha 0.2: both factors 1 + 0.1*0.2 = 1.02
    close(out, [2, 2 * 1.02, 4 * 1.02, 6 * 1.02])
    assert (ramplus_tl.params["r"].default, ramplus_tl.params["alpha"].default) == (0.1, 0.2)
    assert ramplus_tl.params["epsilon"].default == 1e-5


def test_ramplus_tl_r_zero_is_ram() -> None:
    g = gen(7)
    base = torch.randn(5, 6, generator=g)
    models = [base + torch.randn(5, 6, generator=g) * (torch.rand(5, 6, generator=g) < 0.5) for _ in range(3)]
    assert torch.equal(ramplus_tl.kernel(models, base=base, r=0.0), ram.kernel(models, base=base))


def test_ramplus_tl_models_without_unique_entries_stay_finite() -> None:
    base = vec(0, 0, 0)
    # model 2 owns nothing (shares 1: 1 / epsilon, clamped to alpha); model 3 changes nothing (0 / epsilon)
    out = ramplus_tl.kernel([vec(2, 5, 0), vec(4, 0, 0), vec(0, 0, 0)], base=base)
    # [(2+4)/2, 5 * (1 + 0.1 * min(1/1, 0.2)), 0]
    close(out, [3, 5 * 1.02, 0])


def test_ramplus_tl_refuses_an_epsilon_that_is_zero_in_float32() -> None:
    assert epsilon_divides in ramplus_tl.checks
    assert epsilon_divides({"epsilon": 1e-5}) is None
    for epsilon in (0.0, 1e-50):
        problem = epsilon_divides({"epsilon": epsilon})
        assert problem is not None and f"epsilon {epsilon:g}" in problem and "\n" not in problem


def test_ramplus_tl_16_bit_inputs_merge_in_float32_as_mergekit() -> None:
    out = ramplus_tl.kernel([m.to(BF16) for m in RP_MODELS], base=RP_BASE.to(BF16))
    # the reinforcement factor is a float32 tensor, so the sum is float32: factors 1.02 as in
    # test_ramplus_tl_defaults, and no bf16 rounding of the products
    assert out.dtype == F32
    close(out, [2, 2 * 1.02, 4 * 1.02, 6 * 1.02])


def test_ramplus_tl_takes_models_as_stored() -> None:
    as_stored_equals_cast(ramplus_tl)


def test_dares_mask_is_drawn_unit_by_unit_the_same_in_any_number_of_threads() -> None:
    from mergekit_like.methods.task_vectors import DRAW_UNIT, bernoulli_mask

    class CountingPool(ThreadPoolExecutor):
        def __init__(self, workers: int) -> None:
            super().__init__(workers)
            self.mapped = 0

        def map(self, fn, *iterables, **kwargs):  # type: ignore[no-untyped-def, override]
            self.mapped += 1
            return super().map(fn, *iterables, **kwargs)

    numel, density, seed = 2 * DRAW_UNIT + DRAW_UNIT // 2, 0.3, 4
    cpu = torch.device("cpu")
    alone = bernoulli_mask(numel, density, seed, cpu)
    for workers in (2, 3):
        with CountingPool(workers) as pool:
            assert torch.equal(bernoulli_mask(numel, density, seed, cpu, pool), alone)
        assert pool.mapped == 1  # the units went to the pool
    # The third unit: its own stream, SFC64's raw outputs as pairs of 32-bit draws below density * 2^32.
    last = np.random.SFC64(zlib.crc32(f"{seed}:2".encode())).random_raw(DRAW_UNIT // 4).view(np.uint32)
    assert torch.equal(alone[2 * DRAW_UNIT:], torch.from_numpy(last < np.uint32(int(density * 2**32))))
    assert not torch.equal(alone[:DRAW_UNIT], alone[DRAW_UNIT:2 * DRAW_UNIT])
    assert abs(alone.float().mean().item() - density) < 2e-3  # 7 standard deviations of a fair draw
    assert not torch.equal(alone, bernoulli_mask(numel, density, seed + 1, cpu))
    assert torch.equal(bernoulli_mask(DRAW_UNIT + 1, density, seed, cpu), alone[:DRAW_UNIT + 1])  # a prefix
    assert bernoulli_mask(0, density, seed, cpu).numel() == 0
    assert not bernoulli_mask(numel, 0.0, seed, cpu).any()
    assert bernoulli_mask(numel, 1.0, seed, cpu).all()  # density 1 keeps every entry, as torch.rand < 1 does


def test_a_dare_models_mask_does_not_depend_on_the_other_models() -> None:
    from mergekit_like.methods.dare_linear import dare_linear

    base, x = torch.zeros(64), torch.arange(1.0, 65.0)
    merged = [dare_linear([x, x], base=base, generator=gen(3), weight=[0.0, 1.0], density=[first, 0.5],
                          rescale=False) for first in (0.5, 1.0)]  # model 0 draws, or keeps all and draws nothing
    assert torch.equal(merged[0], merged[1])  # model 1 keeps the same entries either way
    assert 0 < int((merged[0] != 0).sum()) < 64


def _election_by_masks(base, deltas, weights, consensus, scale=1.0):
    """TIES' disjoint mean with bool masks, as mergekit computes it: the reference for the float election."""
    w = [torch.full((), x, dtype=deltas[0].dtype) for x in weights]
    weighted = [d * wi for d, wi in zip(deltas, w)]
    votes = torch.stack(weighted if consensus == "sum" else [x.sign() for x in weighted]).sum(0)
    elected = (votes >= 0).to(deltas[0].dtype) * 2 - 1
    agree = [x.sign() == elected for x in weighted]
    merged = torch.stack([x * a for x, a in zip(weighted, agree)]).sum(0)
    divisor = torch.stack([wi * a for wi, a in zip(w, agree)]).sum(0)
    divisor[divisor == 0] = 1
    mixed = merged / divisor
    return base + (mixed * scale if scale != 1 else mixed)


def _assert_same_bits_but_nan_payloads(out: torch.Tensor, expected: torch.Tensor) -> None:
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.dtype.itemsize]
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.view(bits)[~out.isnan()], expected.view(bits)[~expected.isnan()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("models", [4, 5, 6])  # summed in order, then stacked as the reference
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_the_float_election_is_the_bool_masks_one(dtype: torch.dtype, consensus: str, models: int,
                                                  scale: float) -> None:
    from mergekit_like.methods.task_vectors import combine_task_vectors_

    g = torch.Generator().manual_seed(1)
    base = torch.randn(4096, generator=g).to(dtype)
    base[::13] = -0.0
    deltas = [(torch.randn(4096, generator=g) * 0.01).round(decimals=2).to(dtype) for _ in range(models)]
    deltas[0][::101] = float("nan")
    deltas[1][::7] = -0.0
    deltas[2][::203] = float("inf")
    deltas[3][::9] = -float("inf")
    # Votes that overflow to a NaN whose sign bit is clear: -max, -max, +inf elect -1 all the same.
    for d, v in zip(deltas, [-3e38, -3e38, float("inf")]):
        d[:3] = v
    weights = [1.0, 0.7, 0.4, 0.2, 0.1, 0.05][:models]
    # Opposite weights whose agreeing entries cancel: a zero divisor that is not a lack of agreement.
    weights = [1.0, -1.0, 0.4, 0.2, 0.1, 0.05][:models] if models == 4 else weights
    # Every weighted term -0 on a -0 base: the stacked sum starts from +0, so the entry is +0.
    base[4094] = -0.0
    for d, wi in zip(deltas, weights):
        d[4094] = -0.0 if wi > 0 else 0.0
    expected = _election_by_masks(base, deltas, weights, consensus, scale)
    out = combine_task_vectors_(base, deltas, weights, consensus=consensus, normalize=True, scale=scale)
    _assert_same_bits_but_nan_payloads(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("models", [1, 2, 4, 6])  # one model: the sum is its term; six: stacked
@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (True, 0.7), (False, 1.0), (False, 0.7)])
def test_the_sum_without_consensus_is_the_stacked_sum(dtype: torch.dtype, models: int, normalize: bool,
                                                      scale: float) -> None:
    """Task arithmetic's and DARE-linear's sum, as mergekit forms it: the weighted deltas stacked and
    summed, divided by the summed weights (1 where they cancel), scaled, added to the base."""
    from mergekit_like.methods.task_vectors import combine_task_vectors_

    g = torch.Generator().manual_seed(2)
    base = torch.randn(4096, generator=g).to(dtype)
    deltas = [(torch.randn(4096, generator=g) * 0.01).round(decimals=2).to(dtype) for _ in range(models)]
    weights = [0.9, 0.6, 0.3, -0.2, 0.15, 0.05][:models]
    if models == 2:
        weights = [0.5, -0.5]  # they cancel: the divisor is 1
    deltas[0][::101] = float("nan")
    deltas[-1][::203] = float("inf")
    # Every weighted term -0 on a -0 base: the stacked sum starts from +0, so the entry is +0.
    base[4094] = -0.0
    for d, wi in zip(deltas, weights):
        d[4094] = -0.0 if wi > 0 else 0.0
    w = torch.tensor(weights, dtype=dtype)
    mixed = (torch.stack(deltas) * w.unsqueeze(-1)).sum(0)
    if normalize:
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        mixed = mixed / divisor
    expected = base + (mixed * scale if scale != 1 else mixed)
    out = combine_task_vectors_(base, [d.clone() for d in deltas], weights, consensus=None, normalize=normalize,
                                scale=scale)
    _assert_same_bits_but_nan_payloads(out, expected)
    if dtype == torch.float16 and models == 2 and normalize:
        # 1e-8 is 0 in float16, so weights that cancel divide by 0 there, in mergekit as here.
        assert not out.isfinite().any()
    else:
        assert out[4094].item() == 0 and not out[4094].signbit()
