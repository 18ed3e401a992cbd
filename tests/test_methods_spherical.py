"""Closed-form tests of the spherical and selection methods, and their numbers against mergekit's.

nuslerp, multislerp, karcher, nearswap, arcee_fusion and passthrough, each called
directly on small tensors whose result can be worked out by hand (orthogonal unit
vectors, whose spherical midpoints are known; entries whose distance is above or below
nearswap's t), plus edge cases: colinear inputs, zero vectors, a single model. The last
tests run every kernel on the inputs in tests/data/mergekit_golden/kernels/spherical.safetensors
and require mergekit 0.1.5's output to the bit (see make_spherical_goldens.py there).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_like.errors import MergeError
from mergekit_like.methods.arcee_fusion import QUANTILE_SAMPLE, arcee_fusion
from mergekit_like.methods.declaration import BaseUse, MergeMethod
from mergekit_like.methods.karcher import karcher
from mergekit_like.methods.multislerp import multislerp
from mergekit_like.methods.nearswap import nearswap
from mergekit_like.methods.nuslerp import nuslerp
from mergekit_like.methods.passthrough import passthrough

F32 = torch.float32
BF16 = torch.bfloat16
S = math.sqrt(0.5)  # cos 45 degrees = sin 45 degrees
GOLDEN = Path(__file__).parent / "data" / "mergekit_golden" / "kernels" / "spherical.safetensors"
METHODS = {m.name: m for m in (nuslerp, multislerp, karcher, nearswap, arcee_fusion, passthrough)}


def vec(*values: float, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


E0, E1, E2 = vec(1, 0, 0), vec(0, 1, 0), vec(0, 0, 1)


def close(actual: torch.Tensor, expected: torch.Tensor | list[Any], tol: float = 1e-6) -> None:
    """A few float32 ulps: the closed forms below are exact up to the kernels' rounding."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# nuslerp
# ---------------------------------------------------------------------------


def test_nuslerp_orthogonal_unit_vectors_equal_weights_give_the_midpoint() -> None:
    # theta = 90 degrees, t = 1/2: (sin 45 e0 + sin 45 e1) / sin 90
    close(nuslerp.kernel([E0, E1], weight=[1.0, 1.0]), [S, S, 0])


def test_nuslerp_t_is_the_second_weights_share() -> None:
    # t = 2 / (1 + 2) = 2/3 of the way round 90 degrees: 60 degrees from e0
    close(nuslerp.kernel([E0, E1], weight=[1.0, 2.0]), [0.5, math.sqrt(3) / 2, 0])
    # t = 0: sin(90)/sin(90) e0 + sin(0) e1
    close(nuslerp.kernel([E0, E1], weight=[3.0, 0.0]), E0)


def test_nuslerp_cancelling_weights_take_the_midpoint() -> None:
    # 1 + (-1) = 0: t = 0.5 rather than a division by zero
    close(nuslerp.kernel([E0, E1], weight=[1.0, -1.0]), [S, S, 0])


def test_nuslerp_keeps_each_vectors_length() -> None:
    # directions interpolate, lengths are not equalised: sin 45 * 1 e0 + sin 45 * 3 e1
    close(nuslerp.kernel([E0, 3 * E1], weight=[1.0, 1.0]), [S, 3 * S, 0])


def test_nuslerp_with_base_interpolates_the_task_vectors() -> None:
    base = vec(5, -3, 0.25)
    out = nuslerp.kernel([base + 2 * E0, base + 2 * E1], base=base, weight=[1.0, 1.0])
    # task vectors 2 e0, 2 e1: base + 2 (sin 45 e0 + sin 45 e1)
    close(out, base + vec(2 * S, 2 * S, 0))


@pytest.mark.parametrize(("scale", "expected"), [(3.0, 2.5), (-2.0, -1.25), (1.0, 1.0)])
def test_nuslerp_colinear_inputs_interpolate_linearly(scale: float, expected: float) -> None:
    v = vec(1, -2, 2)
    # t = 3/4: (1 - t) v + t (scale v) = (1/4 + 3/4 scale) v; slerp would divide by sin 0
    out = nuslerp.kernel([v, scale * v], weight=[1.0, 3.0])
    close(out, expected * v)
    assert torch.isfinite(out).all()


def test_nuslerp_zero_vector_is_a_right_angle_away() -> None:
    # |0| clamps to 1e-7, so cos = 0: theta = 90, and the zero end contributes nothing:
    # sin(t * 90) e1 with t = 1/2
    close(nuslerp.kernel([torch.zeros(3), E1], weight=[1.0, 1.0]), [0, S, 0])


def test_nuslerp_rows_without_flatten() -> None:
    x0 = torch.stack([E0, vec(1, 1, 0)])
    x1 = torch.stack([E1, vec(2, 2, 0)])
    out = nuslerp.kernel([x0, x1], weight=[1.0, 1.0], nuslerp_flatten=False)
    # row 0: orthogonal -> midpoint ; row 1: parallel -> (x0 + x1) / 2 = (1.5, 1.5, 0)
    close(out, [[S, S, 0], [1.5, 1.5, 0]])
    flat = nuslerp.kernel([x0, x1], weight=[1.0, 1.0])
    assert not torch.allclose(flat, out)  # flattened, the rows share one angle


def test_nuslerp_row_wise_interpolates_columns() -> None:
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x1 = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    out = nuslerp.kernel([x0, x1], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    # column 0: e0 -> e1, the midpoint ; column 1: equal columns (2, 0), colinear -> (2, 0)
    close(out, [[S, 2.0], [S, 0.0]])


def test_nuslerp_flatten_wins_over_row_wise() -> None:
    x0, x1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.eye(3, 4)
    flat = nuslerp.kernel([x0, x1], weight=[1.0, 2.0])
    assert torch.equal(nuslerp.kernel([x0, x1], weight=[1.0, 2.0], nuslerp_row_wise=True), flat)


def test_nuslerp_declaration() -> None:
    assert nuslerp.base is BaseUse.OPTIONAL and (nuslerp.min_models, nuslerp.max_models) == (2, 2)
    assert nuslerp.params["weight"].per_model and nuslerp.params["weight"].required
    assert nuslerp.params["nuslerp_row_wise"].default is False and nuslerp.params["nuslerp_flatten"].default is True


# ---------------------------------------------------------------------------
# multislerp
# ---------------------------------------------------------------------------
# For any inputs the weighted tangent vectors at m = M/|M| (M = sum w_i u_i) sum to
# M - (M . m) m = 0, so the result is m times the weighted mean norm sum w_i |x_i|.


def test_multislerp_single_model_is_the_model() -> None:
    x = vec(1, 2, 3)
    assert multislerp.kernel([x], weight=[5.0]) is x
    assert multislerp.kernel([x], base=vec(9, 9, 9), weight=[5.0]) is x  # even with a base, as mergekit


def test_multislerp_orthogonal_pair_gives_the_midpoint() -> None:
    close(multislerp.kernel([E0, E1], weight=[1.0, 1.0]), [S, S, 0])


def test_multislerp_three_orthogonal_unit_vectors() -> None:
    r = 1 / math.sqrt(3)
    close(multislerp.kernel([E0, E1, E2], weight=[1.0, 1.0, 1.0]), [r, r, r])


def test_multislerp_weights_and_norms() -> None:
    # w = (1, 3)/4: m = (1, 3)/sqrt(10) ; mean norm 0.25 * 2 + 0.75 * 4 = 3.5
    out = multislerp.kernel([2 * E0, 4 * E1], weight=[1.0, 3.0])
    close(out, [3.5 / math.sqrt(10), 10.5 / math.sqrt(10), 0])


def test_multislerp_without_normalizing_scales_by_the_raw_weights() -> None:
    # same direction; norm 1 * 2 + 3 * 4 = 14
    out = multislerp.kernel([2 * E0, 4 * E1], weight=[1.0, 3.0], normalize_weights=False)
    close(out, [14 / math.sqrt(10), 42 / math.sqrt(10), 0], tol=1e-5)


def test_multislerp_with_base_interpolates_the_task_vectors() -> None:
    base = vec(1, 2, 3)
    out = multislerp.kernel([base + 2 * E0, base + 2 * E1], base=base, weight=[1.0, 1.0])
    close(out, base + vec(2 * S, 2 * S, 0))


def test_multislerp_colinear_inputs_average_the_norms() -> None:
    v = vec(0, 0.6, 0.8)
    # one direction; norm 0.5 * 1 + 0.5 * 3 = 2
    close(multislerp.kernel([v, 3 * v], weight=[1.0, 1.0]), 2 * v)


def test_multislerp_opposite_pair_falls_back_to_the_linear_mix() -> None:
    base = vec(1, -1, 2)
    out = multislerp.kernel([base + vec(1, 2, 3), base - vec(1, 2, 3)], base=base, weight=[1.0, 1.0])
    # unit directions cancel: 0.5 d - 0.5 d = 0 -> the base, not NaN
    assert torch.equal(out, base)
    out = multislerp.kernel([base + vec(1, 2, 3), base - vec(1, 2, 3)], base=base, weight=[3.0, 1.0])
    # 0.75 u - 0.25 u: the direction is u = d/|d|, the length 0.75 |d| + 0.25 |-d| = |d|
    close(out, base + vec(1, 2, 3))


def test_multislerp_three_cancelling_directions_raise() -> None:
    d = vec(1, 2, 3)
    # 0.25 d/|d| - 0.5 d/|d| + 0.25 d/|d| = 0: no direction to slerp around
    with pytest.raises(MergeError, match=r"weighted mean of the 3 models' directions is zero.*Change the weights"):
        multislerp.kernel([d, -d, d], weight=[1.0, 2.0, 1.0])


def test_multislerp_three_models_equal_to_the_base_raise() -> None:
    base = vec(1, 2, 3)
    with pytest.raises(MergeError, match="models equal to the base"):
        multislerp.kernel([base, base, base], base=base, weight=[1.0, 1.0, 1.0])


def test_multislerp_zero_weight_sum_is_refused() -> None:
    with pytest.raises(MergeError, match="weights sum to zero"):
        multislerp.kernel([E0, E1], weight=[1.0, -1.0])
    (check,) = multislerp.checks
    assert check({"weight": [1.0, -1.0], "normalize_weights": True}) is not None
    assert check({"weight": [1.0, -1.0], "normalize_weights": False}) is None
    assert check({"weight": [1.0, 1.0], "normalize_weights": True}) is None


def test_multislerp_declaration() -> None:
    assert multislerp.base is BaseUse.OPTIONAL and (multislerp.min_models, multislerp.max_models) == (1, None)
    assert multislerp.params["weight"].required and multislerp.params["eps"].default == 1e-8
    assert multislerp.params["normalize_weights"].default is True


# ---------------------------------------------------------------------------
# karcher
# ---------------------------------------------------------------------------


def test_karcher_single_model_is_the_model() -> None:
    x = vec(3, 4)
    assert karcher.kernel([x]) is x


def test_karcher_orthogonal_pair_gives_the_midpoint_scaled_by_the_mean_norm() -> None:
    close(karcher.kernel([E0, E1]), [S, S, 0])
    # norms 2 and 4: the same direction, length (2 + 4) / 2 = 3
    close(karcher.kernel([2 * E0, 4 * E1]), [3 * S, 3 * S, 0])


def test_karcher_three_orthogonal_unit_vectors() -> None:
    r = 1 / math.sqrt(3)
    close(karcher.kernel([E0, E1, E2]), [r, r, r])


def test_karcher_is_the_mean_angle_not_the_normalised_euclidean_mean() -> None:
    # angles 0, 0, 90 degrees on a circle: the Riemannian mean is at 30 degrees,
    # the normalised Euclidean mean (2, 1)/sqrt(5) at 26.6; no step (max_iter 0) gives the latter
    close(karcher.kernel([E0, E0, E1]), [math.sqrt(3) / 2, 0.5, 0], tol=1e-5)
    close(karcher.kernel([E0, E0, E1], max_iter=0), [2 / math.sqrt(5), 1 / math.sqrt(5), 0])


def test_karcher_zero_model_has_no_direction_but_counts_in_the_norm() -> None:
    # direction from 2 e0 and 2 e1 only; length (2 + 0 + 2) / 3
    close(karcher.kernel([2 * E0, torch.zeros(3), 2 * E1]), [4 / 3 * S, 4 / 3 * S, 0])


def test_karcher_all_zero_models_give_zero() -> None:
    out = karcher.kernel([torch.zeros(2, 3), torch.zeros(2, 3)])
    assert torch.equal(out, torch.zeros(2, 3)) and not out.signbit().any()


def test_karcher_colinear_models() -> None:
    v = vec(0.6, 0, 0.8)
    # one direction; length (1 + 3) / 2 = 2
    close(karcher.kernel([v, 3 * v]), 2 * v)


def test_karcher_keeps_shape_and_bf16() -> None:
    x = [torch.eye(2, 3, dtype=BF16), torch.eye(2, 3, dtype=BF16).flip(0)]
    out = karcher.kernel(x)
    assert out.shape == (2, 3) and out.dtype == BF16


def test_karcher_declaration() -> None:
    assert karcher.base is BaseUse.NONE and karcher.max_models is None
    assert karcher.params["max_iter"].kind is int and karcher.params["max_iter"].default == 10
    assert karcher.params["tol"].default == 1e-5


# ---------------------------------------------------------------------------
# nearswap
# ---------------------------------------------------------------------------


def test_nearswap_near_entries_swap_far_entries_lean_on_the_base() -> None:
    base = vec(0, 0, 0, 1)
    model = vec(0.05, 1.0, -2.0, 1.0)
    out = nearswap.kernel([model], base=base, t=0.1)
    # |d| = 0.05 < t: w = 2 clamps to 1 -> the model's 0.05
    # |d| = 1: w = 0.1 -> 0.1 * 1 ; |d| = 2: w = 0.05 -> 0.05 * -2
    # equal: |d| floors at 1e-6, w clamps to 1 -> 1
    close(out, [0.05, 0.1, -0.1, 1.0])


def test_nearswap_t_zero_is_the_base_and_large_t_the_model() -> None:
    base, model = vec(1, -2, 3), vec(4, 5, -6)
    assert torch.equal(nearswap.kernel([model], base=base, t=0.0), base)
    assert torch.equal(nearswap.kernel([model], base=base, t=100.0), model)


def test_nearswap_declaration() -> None:
    assert nearswap.base is BaseUse.REQUIRED and (nearswap.min_models, nearswap.max_models) == (1, 1)
    assert nearswap.params["t"].required and nearswap.elementwise


# ---------------------------------------------------------------------------
# arcee_fusion
# ---------------------------------------------------------------------------


def test_arcee_fusion_keeps_only_outlying_changes() -> None:
    base = torch.zeros(9)
    model = vec(1, -2, 3, -4, 5, -6, 7, -8, 100)
    # one row, so one KL > 0 scales every |d|: sorted |d| at indices int(q * 8) = 2, 4, 6 -> 3, 5, 7
    # threshold 5 + 1.5 * (7 - 3) = 11: only the 100 change is kept
    out = arcee_fusion.kernel([model], base=base)
    assert torch.equal(out, vec(0, 0, 0, 0, 0, 0, 0, 0, 100))


def test_arcee_fusion_weights_changes_by_their_rows_divergence() -> None:
    base = torch.zeros(2, 4)
    model = torch.tensor([[5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 40.0]])
    # row 0 shifts every logit alike: softmax unchanged, KL = 0, importance 0 despite |d| = 5
    # row 1: k |d| = k, 2k, 3k, 40k ; sorted [0, 0, 0, 0, k, 2k, 3k, 40k] at int(q * 7) = 1, 3, 5
    # threshold 0 + 1.5 * (2k - 0) = 3k: 3k (a tie, kept) and 40k
    out = arcee_fusion.kernel([model], base=base)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 40.0]]))


def test_arcee_fusion_identical_models_give_the_base() -> None:
    base = vec(1, 2, 3, 4)
    # every importance 0, threshold 0: all kept, but every change is 0
    assert torch.equal(arcee_fusion.kernel([base.clone()], base=base), base)


def test_arcee_fusion_bf16_result_is_float32_as_mergekits() -> None:
    base = torch.zeros(9, dtype=BF16)
    out = arcee_fusion.kernel([vec(1, -2, 3, -4, 5, -6, 7, -8, 100, dtype=BF16)], base=base)
    assert out.dtype == F32 and out[-1] == 100


def test_arcee_fusion_samples_large_tensors_with_the_generator() -> None:
    n = QUANTILE_SAMPLE + 1
    # 30% |d| = 1, 50% = 2, 20% = 100: any sample of a million puts Q1 at 1 and the median
    # and Q3 at 2 (each far from a boundary), so the threshold is 2 + 1.5 * 1 = 3.5
    model = torch.ones(n)
    model[int(0.3 * n):] = 2.0
    model[int(0.8 * n):] = 100.0
    model = model[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    generator = torch.Generator().manual_seed(7)
    before = generator.get_state()
    out = arcee_fusion.kernel([model], base=torch.zeros(n), generator=generator)
    assert torch.equal(out, torch.where(model == 100, model, 0.0))
    assert not torch.equal(generator.get_state(), before)  # the draw came from our generator


def test_arcee_fusion_small_tensors_draw_nothing() -> None:
    generator = torch.Generator().manual_seed(7)
    before = generator.get_state()
    arcee_fusion.kernel([vec(1, 2, 3)], base=vec(0, 0, 0), generator=generator)
    assert torch.equal(generator.get_state(), before)


def test_arcee_fusion_declaration() -> None:
    assert arcee_fusion.base is BaseUse.REQUIRED and (arcee_fusion.min_models, arcee_fusion.max_models) == (1, 1)
    assert arcee_fusion.uses_generator and arcee_fusion.params == {}


# ---------------------------------------------------------------------------
# passthrough
# ---------------------------------------------------------------------------


def test_passthrough_without_scale_is_the_tensor_itself() -> None:
    x = vec(1, -0.0, float("nan"))
    assert passthrough.kernel([x]) is x


@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0])
def test_passthrough_scale_multiplies(scale: float) -> None:
    x = vec(1, -3, 8)
    assert torch.equal(passthrough.kernel([x], scale=scale), x * scale)
    assert torch.equal(passthrough.kernel([x], scale=[scale]), x * scale)


def test_passthrough_scale_is_an_optional_per_model_number() -> None:
    spec = passthrough.params["scale"]
    assert spec.per_model and spec.optional and spec.kind is float and spec.default is None
    assert not spec.required
    assert spec.leaf_problem(None) is None and spec.leaf_problem(2) is None
    assert spec.leaf_problem("x") is not None
    assert spec.coerce(None) is None and spec.coerce(2) == 2.0 and isinstance(spec.coerce(2), float)
    # a parameter not declared X | None still refuses None
    t = nearswap.params["t"]
    assert not t.optional and t.leaf_problem(None) is not None


def test_passthrough_declaration() -> None:
    assert passthrough.base is BaseUse.NONE and (passthrough.min_models, passthrough.max_models) == (1, 1)


# ---------------------------------------------------------------------------
# mergekit's numbers, bit for bit
# ---------------------------------------------------------------------------


def _golden_cases() -> dict[str, dict[str, Any]]:
    with safe_open(GOLDEN, "pt") as f:
        metadata = f.metadata()
    return {case: json.loads(text) for case, text in sorted(metadata.items())}


CASES = _golden_cases()


def test_the_goldens_cover_every_method_in_both_dtypes() -> None:
    covered = {(case["method"], name.rsplit("_", 1)[1]) for name, case in CASES.items()}
    assert covered == {(method, tag) for method in METHODS for tag in ("f32", "bf16")}


@functools.cache
def _golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


def _digest(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).digest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_match_mergekit_bit_for_bit(case: str) -> None:
    spec = CASES[case]
    method: MergeMethod = METHODS[spec["method"]]
    kwargs = dict(spec["params"])
    stored = _golden_tensors()
    if "generated" in spec:
        # too large to store: remade from the seed, mergekit's global draw remade with our generator
        dtype, made = getattr(torch, spec["dtype"]), spec["generated"]
        model, base = (torch.randn(made["shape"], generator=torch.Generator().manual_seed(made["seed"] + i)).to(dtype)
                       for i in range(2))
        out = method.kernel([model], base=base, generator=torch.Generator().manual_seed(spec["sample_seed"]))
        assert _digest(out) == bytes(stored[f"{case}/expected_sha256"].tolist())
        return
    models = [stored[f"{case}/model{i}"] for i in range(spec["models"])]
    if spec["base"]:
        kwargs["base"] = stored[f"{case}/base"]
    inputs = [*models, *([kwargs["base"]] if spec["base"] else [])]
    untouched = [x.clone() for x in inputs]
    out = method.kernel(models, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(inputs, untouched)), "the kernel changed an input"
    expected = stored[f"{case}/expected"]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    differ = int((out != expected).sum())
    assert torch.equal(out, expected), f"{differ} of {expected.numel()} entries differ from mergekit"


def test_model_stock_in_place_combination_keeps_mergekits_bits_signed_zeros_included() -> None:
    from mergekit_like.methods.model_stock import model_stock, stock_ratio

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    models = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(3)]
    for x in models:
        x[0, 0] = -0.0  # sum() from 0 turns the first -0.0 into +0.0; so must the in-place sum
    base[0, 0] = -0.0
    t = stock_ratio([x.reshape(-1) - base.reshape(-1) for x in models])
    expected = t * (sum(models) / len(models)) + (1 - t) * base
    got = model_stock(models, base=base)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
