"""Merges that amplify, extrapolate, underflow or mix dtypes say so (or refuse) instead of writing silently.

Where mergekit 0.1.5 computes, the numbers stay mergekit's: these guards only warn.
Where its result is meaningless (a sum of weights that float32 flushes to zero), the merge is
refused before any tensor is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from safetensors.torch import load_file

from mergekit_like.averaging.offline import run_average, swa_outputs
from mergekit_like.averaging.trajectory import from_paths
from mergekit_like.errors import IncompatibleModelsError, MergeError, RecipeError
from mergekit_like.merge.engine import planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe, recipe_from_cli
from mergekit_like.methods import get_method
from mergekit_like.methods.declaration import AMPLIFICATION_WARN, AmplificationLog, factor_text
from mergekit_like.methods.model_stock import stock_amplification

RECIPE_LOGGER = "mergekit_like.merge.recipe"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def merge(tmp_path: Path, method: str, models: list[Path], params: list[str], base: Path | None = None) -> Path:
    recipe = recipe_from_cli(method, [str(m) for m in models] + ([str(base)] if base else []),
                             base=str(base) if base else None, params=params)
    out = tmp_path / "out"
    with planned_merge(recipe) as plan:
        run_merge(plan, out)
    return out


def tensors(count: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(4, 8, generator=g) for i in range(count)}


# ---------------------------------------------------------------------------
# model_stock: nearly opposite task vectors
# ---------------------------------------------------------------------------


def opposite_deltas(one_plus_cos: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base and two task vectors of equal norm whose cosine is ``-1 + one_plus_cos`` (float64)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g, dtype=torch.float64)
    d1 = torch.randn(64, generator=g, dtype=torch.float64) * 0.01
    perp = torch.randn(64, generator=g, dtype=torch.float64)
    perp -= (perp @ d1) / (d1 @ d1) * d1
    perp *= d1.norm() / perp.norm()
    cos = -1 + one_plus_cos
    d2 = cos * d1 + (1 - cos * cos) ** 0.5 * perp
    return base, d1, d2


def mergekit_model_stock(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """mergekit 0.1.5's ModelStockMergeTask.execute (not filter-wise), as its source writes it."""
    w_0, ws = base.view(-1), [w.view(-1) for w in models]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    return (t * (sum(ws) / len(ws)) + (1 - t) * w_0).reshape(base.shape)


def test_model_stock_on_nearly_opposite_task_vectors_computes_mergekits_numbers() -> None:
    base, d1, d2 = opposite_deltas(2e-6)
    models = [base + d1, base + d2]
    ours = get_method("model_stock")(models, base=base)
    assert torch.equal(ours, mergekit_model_stock(base, models))


def test_model_stock_measures_how_far_nearly_opposite_task_vectors_move_the_base() -> None:
    base, d1, d2 = opposite_deltas(2e-6)
    models = [base + d1, base + d2]
    result = get_method("model_stock")(models, base=base)
    factor = stock_amplification(result, models, base=base)
    moved = ((result - base).norm() / d1.norm()).item()
    assert factor == pytest.approx(moved, rel=1e-6)
    assert factor > 500  # |t| ~ 1e6 times a mean task vector ~ 1e-3 of each
    # Ordinary fine-tunes (cosine ~ 0.5) move the base no farther than the farthest fine-tune.
    g = torch.Generator().manual_seed(1)
    common = torch.randn(64, generator=g, dtype=torch.float64)
    usual = [base + common + torch.randn(64, generator=g, dtype=torch.float64) for _ in range(2)]
    assert stock_amplification(get_method("model_stock")(usual, base=base), usual, base=base) <= 1


def test_model_stock_filter_wise_measures_the_worst_row() -> None:
    base, d1, d2 = opposite_deltas(2e-6)
    g = torch.Generator().manual_seed(2)
    calm = [torch.randn(64, generator=g, dtype=torch.float64) * 0.01 for _ in range(2)]
    rows = torch.stack([base, base])
    models = [torch.stack([base + calm[0], base + d1]), torch.stack([base + calm[1], base + d2])]
    result = get_method("model_stock")(models, base=rows, filter_wise=True)
    factor = stock_amplification(result, models, base=rows, filter_wise=True)
    assert factor == pytest.approx(((result[1] - base).norm() / d1.norm()).item(), rel=1e-6)


def test_model_stock_declares_its_amplification_for_the_engine() -> None:
    method = get_method("model_stock")
    assert method.amplification is not None and not method.elementwise
    base, d1, d2 = opposite_deltas(2e-6)
    models = [base + d1, base + d2]
    calm = [base + 0.01 * torch.ones(64, dtype=torch.float64), base + 0.02 * torch.ones(64, dtype=torch.float64)]
    log = AmplificationLog()
    for name, inputs in [("a", calm), ("worst", models), ("b", calm)]:
        log.observe(method, name, method(inputs, base=base), inputs, {"base": base})
    (line,) = log.warnings()
    assert line.startswith("model_stock: ") and "tensor 'worst'" in line
    assert factor_text(stock_amplification(method(models, base=base), models, base=base)) in line
    quiet = AmplificationLog()
    quiet.observe(method, "a", method(calm, base=base), calm, {"base": base})
    assert quiet.warnings() == []


def test_model_stock_merge_warns_once_with_the_worst_tensor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base, d1, d2 = opposite_deltas(2e-6)
    others = tensors(3, seed=5)
    models = []
    for name, delta in [("ft1", d1), ("ft2", d2)]:
        models.append(write_checkpoint(tmp_path / name, {"opposite": (base + delta).float(),
                                                         **{k: v + 0.01 for k, v in others.items()}}))
    base_dir = write_checkpoint(tmp_path / "base", {"opposite": base.float(), **others})
    with caplog.at_level(logging.WARNING):
        merge(tmp_path, "model_stock", models, [], base=base_dir)
    lines = [w for w in warnings_of(caplog) if w.startswith("model_stock:")]
    assert len(lines) == 1 and "tensor 'opposite'" in lines[0]
    # Merged whole, the tensor's factor comes from its pass's sums, as a row-blocked one's does: the
    # factor measured on the merged float32 tensor, but for that tensor's rounding.
    inputs = [(base + d).float() for d in (d1, d2)]
    method = get_method("model_stock")
    measured = stock_amplification(method(inputs, base=base.float()), inputs, base=base.float())
    logged = float(lines[0].split(" moves ")[1].split(" times")[0])
    assert logged == pytest.approx(measured, rel=0.02) and logged > 100


# ---------------------------------------------------------------------------
# linear: weights that nearly cancel, or underflow
# ---------------------------------------------------------------------------


def test_linear_weights_that_nearly_cancel_warn_once_with_the_factor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = write_checkpoint(tmp_path / "a", tensors(5, seed=1))
    b = write_checkpoint(tmp_path / "b", tensors(5, seed=2))
    with caplog.at_level(logging.WARNING):
        out = merge(tmp_path, "linear", [a, b], ["weight=1,-0.999999"])
    lines = [w for w in warnings_of(caplog) if w.startswith("linear:")]
    w32 = torch.tensor([1, -0.999999], dtype=torch.float32)
    factor = (w32.abs().sum() / w32.sum().abs()).item()
    assert lines == [f"linear: weights 1, -0.999999 sum to {w32.sum().item():.3g} in float32 and normalize "
                     f"divides by that sum: the output is scaled by up to {factor_text(factor)}"]
    assert factor_text(factor) == "1.97e6"
    # The numbers are still the kernel's (mergekit's): only a warning was added.
    merged = load_file(out / "model.safetensors")
    inputs_a, inputs_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name, value in merged.items():
        expected = get_method("linear")([inputs_a[name], inputs_b[name]], weight=[1.0, -0.999999])
        assert torch.equal(value, expected)


def test_linear_ordinary_weights_and_unnormalised_sums_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        recipe_from_cli("linear", ["a", "b"], params=["weight=0.3,0.7"])
        recipe_from_cli("linear", ["a", "b"], params=["weight=1,-0.5"])  # a 3x extrapolation: only a note
        recipe_from_cli("linear", ["a", "b"], params=["weight=1,-0.999999", "normalize=false"])
    assert not [w for w in warnings_of(caplog) if w.startswith("linear:")]
    assert AMPLIFICATION_WARN > 3


def test_linear_amplification_in_a_yaml_recipe_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    data = {"merge_method": "linear", "parameters": {"weight": 1.0},
            "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": -0.99}}]}
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        recipe = parse_recipe(data)
        recipe.with_defaults()
    lines = [w for w in warnings_of(caplog) if w.startswith("linear:")]
    assert len(lines) == 1 and "weights 1, -0.99" in lines[0]


def test_linear_amplification_in_slices_warns_once_for_the_recipe(caplog: pytest.LogCaptureFixture) -> None:
    sources = [[{"model": "a", "layer_range": r}, {"model": "b", "layer_range": r, "parameters": {"weight": -0.99}}]
               for r in ([0, 2], [2, 4])]
    data = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [{"sources": s} for s in sources]}
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        parse_recipe(data)
    assert len([w for w in warnings_of(caplog) if w.startswith("linear: weights 1, -0.99 ")]) == 1


def test_linear_weights_that_underflow_in_float32_are_refused_before_reading(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", tensors(2, seed=1))
    b = write_checkpoint(tmp_path / "b", tensors(2, seed=2))
    recipe = recipe_from_cli("linear", [str(a), str(b)], params=["weight=1e-300,1e-300"])
    with pytest.raises(RecipeError, match=r"weights 1e-300, 1e-300 underflow to zero in float32") as refused:
        with planned_merge(recipe):
            pass
    assert "sum to zero" not in str(refused.value)


def test_linear_unnormalised_weights_that_underflow_are_refused_not_written_as_zeros(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", tensors(2, seed=1))
    b = write_checkpoint(tmp_path / "b", tensors(2, seed=2))
    recipe = recipe_from_cli("linear", [str(a), str(b)], params=["weight=1e-300,1e-300", "normalize=false"])
    with pytest.raises(RecipeError, match=r"underflow to zero in float32 .*all zeros"):
        with planned_merge(recipe):
            pass


def test_linear_weights_that_cancel_only_in_float32_are_refused_at_plan_time(tmp_path: Path) -> None:
    # 0.1 + 0.2 - 0.3 is 5.6e-17 in Python but 0 in float32, where the kernel adds them.
    models = [write_checkpoint(tmp_path / n, tensors(1, seed=i)) for i, n in enumerate("abc")]
    recipe = recipe_from_cli("linear", [str(m) for m in models], params=["weight=0.1,0.2,-0.3"])
    with pytest.raises(RecipeError, match=r"weights 0.1, 0.2, -0.3 sum to zero in float32"):
        with planned_merge(recipe):
            pass


def test_linear_exact_zero_sum_keeps_its_message_and_the_kernel_names_underflow() -> None:
    from mergekit_like.methods.linear import weights_hold_in_float32

    assert "the weights sum to zero" in (weights_hold_in_float32({"weight": [1.0, -1.0], "normalize": True}) or "")
    assert weights_hold_in_float32({"weight": [1.0, -1.0], "normalize": False}) is None
    assert weights_hold_in_float32({"weight": [0.0, 0.0], "normalize": False}) is None  # asked for zeros
    with pytest.raises(MergeError, match="underflow to zero in float32"):
        get_method("linear")([torch.ones(2), torch.ones(2)], weight=[1e-300, 1e-300])


# ---------------------------------------------------------------------------
# slerp: t outside [0, 1]
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", ["1.5", "-0.5", "[0, 1.5]"])
def test_slerp_outside_zero_one_warns_that_it_extrapolates(t: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        recipe_from_cli("slerp", ["a", "b"], base="a", params=[f"t={t}"])
    lines = [w for w in warnings_of(caplog) if "slerp extrapolates" in w]
    assert len(lines) == 1 and "outside [0, 1]" in lines[0]


def test_slerp_inside_zero_one_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        recipe_from_cli("slerp", ["a", "b"], base="a", params=["t=[0, 0.5, 1]"])
    assert warnings_of(caplog) == []


def test_slerp_extrapolation_computes_mergekits_formula() -> None:
    # mergekit does not clamp t: sin((1 - t) theta) / sin(theta) and sin(t theta) / sin(theta).
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = get_method("slerp")([v1], base=v0, t=1.5)
    theta = torch.tensor(torch.pi / 2)
    expected = torch.sin(-0.5 * theta) / torch.sin(theta) * v0 + torch.sin(1.5 * theta) / torch.sin(theta) * v1
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------
# average: one tensor floating in one checkpoint and integer in another
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(torch.float16, torch.int32), (torch.int32, torch.float16),
                                                (torch.int32, torch.int64)])
def test_average_refuses_a_tensor_of_another_kind_of_dtype(tmp_path: Path, first: torch.dtype,
                                                           second: torch.dtype) -> None:
    names = {torch.float16: "float16", torch.int32: "int32", torch.int64: "int64"}
    one = write_checkpoint(tmp_path / "one", {"w": torch.ones(4, dtype=first), "same": torch.ones(2)})
    two = write_checkpoint(tmp_path / "two", {"w": torch.ones(4, dtype=second), "same": torch.ones(2)})
    points = from_paths([one, two])
    with pytest.raises(IncompatibleModelsError) as refused:
        run_average(points, swa_outputs(points, None, None), tmp_path / "out")
    message = str(refused.value)
    assert (f"tensor 'w': {names[first]} in '{one}' but {names[second]} in '{two}' "
            "(average checkpoints whose tensors have the same kind of dtype)") in message
    assert not (tmp_path / "out").exists()


def test_average_still_takes_floating_tensors_of_different_precision(tmp_path: Path) -> None:
    one = write_checkpoint(tmp_path / "one", {"w": torch.ones(4, dtype=torch.float16)})
    two = write_checkpoint(tmp_path / "two", {"w": torch.full((4,), 3.0)})
    points = from_paths([one, two])
    (written,) = run_average(points, swa_outputs(points, None, None), tmp_path / "out")
    assert load_file(written.directory / "model.safetensors")["w"].tolist() == [2.0] * 4
