"""Exact top-k selection without a sort: every path equals a stable sort's choice."""

from __future__ import annotations

import pytest
import torch

import mergekit_like.methods.topk as topk
from mergekit_like.methods import get_method
from mergekit_like.methods.task_vectors import magnitude_mask


def stable_top_k(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    keys = magnitudes.float() if magnitudes.dtype != torch.float64 else magnitudes
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[torch.argsort(keys, descending=True, stable=True)[:k]] = True
    return mask


def magnitudes_of(kind: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if kind == "quantised":  # differences of bf16 weights: few distinct values, big tie groups
        base = torch.randn(n, generator=g).bfloat16()
        values = ((base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16().float() - base.float()).abs()
    elif kind == "one_value_block":
        values = torch.randn(n, generator=g).abs()
        values[n // 10 : n // 2] = values[0]
    else:
        values = torch.randn(n, generator=g).abs()
    values = values.to(dtype)
    if n > 10:
        values[3] = float("nan")  # a sort puts NaN first; so must the selection
        values[7] = 0.0
    return values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["plain", "quantised", "one_value_block"])
@pytest.mark.parametrize("n", [1, 5, 1000, 300_007])
def test_index_ties_equal_a_stable_sort_and_keep_adds_only_ties(dtype: torch.dtype, kind: str, n: int) -> None:
    magnitudes = magnitudes_of(kind, n, dtype)
    for density in (1e-4, 0.1, 0.5, 0.97):
        k = max(1, int(density * n))
        expected = stable_top_k(magnitudes, k)
        assert torch.equal(magnitude_mask(magnitudes, density, "index"), expected), (density, k)
        kept = magnitude_mask(magnitudes, density, "keep")
        extra = kept & ~expected
        assert (kept | ~expected).all()  # keep is a superset ...
        if extra.any():  # ... adding only entries equal to the smallest kept magnitude
            smallest = magnitudes[expected].float().nan_to_num(float("inf")).min()
            assert (magnitudes[extra].float() == smallest).all()


def test_the_bracket_and_the_radix_fallback_give_the_same_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    magnitudes = magnitudes_of("plain", 300_007, torch.float32)  # distinct values: the guess misses
    k = 120_000
    expected = stable_top_k(magnitudes, k)
    bracket_calls: list[int | None] = []
    bracketed = topk._bracketed_kth_largest

    def spy(*args: object) -> int | None:
        bracket_calls.append(bracketed(*args))  # type: ignore[arg-type]
        return bracket_calls[-1]

    monkeypatch.setattr(topk, "_bracketed_kth_largest", spy)
    assert torch.equal(topk.top_k_mask(magnitudes, k), expected)
    assert bracket_calls and bracket_calls[0] is not None  # found inside the bracket
    monkeypatch.setattr(topk, "_bracketed_kth_largest", lambda *args: None)  # a missed bracket
    assert torch.equal(topk.top_k_mask(magnitudes, k), expected)
    monkeypatch.setattr(topk, "SAMPLED_MIN", 1 << 40)  # radix selection only
    assert torch.equal(topk.top_k_mask(magnitudes, k), expected)


def test_kth_largest_bits_is_the_sorted_value() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        values = magnitudes_of("quantised", 5000, dtype)
        values[3] = 0.5  # no NaN here: compare values
        for k in (1, 2, 2500, 5000):
            bits = topk.kth_largest_bits(values, k)
            expected = values.float().sort(descending=True).values[k - 1] if dtype != torch.float64 else \
                values.sort(descending=True).values[k - 1]
            as_value = torch.tensor(bits, dtype=topk.magnitude_bits(values).dtype).view(dtype)
            assert float(as_value) == float(expected), (dtype, k)


def test_bad_k_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        topk.top_k_mask(torch.ones(4), 5)
    with pytest.raises(TypeError, match="floating"):
        topk.magnitude_bits(torch.ones(4, dtype=torch.int32))


def test_position_of_nth_counts_across_chunks() -> None:
    flags = torch.zeros(3_000_000, dtype=torch.bool)
    where = torch.tensor([5, 17, 1_048_575, 1_048_576, 2_999_999])
    flags[where] = True
    for nth, index in enumerate(where.tolist(), 1):
        assert topk.position_of_nth(flags, nth) == index


def test_ties_with_index_trim_is_ties_with_a_stable_sort() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 300, generator=g).bfloat16().float()
    models = [(base + 0.02 * torch.randn(200, 300, generator=g)).bfloat16().float() for _ in range(3)]
    weights, density = [1.0, 0.6, 0.3], 0.4
    got = get_method("ties")(models, base=base, weight=weights, density=density, trim_ties="index")
    trimmed = torch.stack([
        w * (x - base).reshape(-1) * stable_top_k((x - base).abs().reshape(-1), int(density * base.numel()))
        for x, w in zip(models, weights)
    ])
    agree = trimmed.sign() == torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    divisor = (torch.tensor(weights).reshape(-1, 1) * agree).sum(0)
    merged = (trimmed * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(got, base + merged.reshape(base.shape), rtol=1e-6, atol=1e-6)
    assert (got != base).float().mean() > 0.3  # the merge did something


def unstable_top_k(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's mask: whatever torch's (unstable) descending argsort puts first."""
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[torch.argsort(magnitudes.float(), descending=True)[:k]] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["plain", "quantised", "one_value_block"])
def test_sort_ties_skip_the_sort_only_when_no_tie_decides(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kind: str
) -> None:
    magnitudes = magnitudes_of(kind, 300_007, dtype)
    k = int(0.3 * magnitudes.numel())
    expected = unstable_top_k(magnitudes, k)
    threshold = magnitudes.float().sort(descending=True).values[k - 1]
    ambiguous = int((magnitudes.float() == threshold).sum()) > 1 and bool(
        (magnitudes.float() == threshold).sum() + (magnitudes.float() > threshold).sum() != k)
    sorted_ = [0]
    for name in ("argsort", "sort"):  # 16-bit magnitudes argsort their bits; wider ones sort a copy in place
        real = getattr(torch, name)

        def counting(*args, real=real, **kwargs):
            sorted_[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, counting)
    mask = magnitude_mask(magnitudes, 0.3, "sort")
    assert torch.equal(mask, expected)
    assert sorted_[0] == (1 if ambiguous else 0)


def test_sort_ties_with_the_kth_value_ending_a_tie_group_need_no_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    magnitudes = torch.arange(10_000, dtype=torch.float32).flip(0) // 10  # groups of 10 equal values
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: pytest.fail("sorted"))
    mask = magnitude_mask(magnitudes, 0.5, "sort")  # k = 5,000 ends a group of ten
    assert torch.equal(mask, magnitudes >= magnitudes.sort(descending=True).values[4999])
    assert int(mask.sum()) == 5000


def test_sort_ties_on_float64_follow_the_sorts_float32_keys() -> None:
    # Two float64 magnitudes that round to one float32 are a tie to mergekit's CPU sort.
    g = torch.Generator().manual_seed(2)
    magnitudes = torch.rand(5000, generator=g, dtype=torch.float64)
    k = 2500
    kth = magnitudes.sort(descending=True).values[k - 1]
    magnitudes[magnitudes == kth] = kth.float().double()
    magnitudes[17] = kth.float().double() + 1e-12  # equal to the k-th in float32 only
    expected = unstable_top_k(magnitudes, k)
    assert torch.equal(magnitude_mask(magnitudes, k / 5000, "sort"), expected)


def test_nan_payloads_tie_at_a_nan_threshold() -> None:
    # Three NaNs of different payloads above 1.0: at a NaN threshold they are one value, tied.
    magnitudes = torch.tensor([0x7FC0, 0x7FFF, 0x3F80, 0x7FC1], dtype=torch.int16).view(torch.bfloat16)
    assert topk.top_k_mask(magnitudes, 2, "index").tolist() == [True, True, False, False]
    assert topk.top_k_mask(magnitudes, 2, "keep").tolist() == [True, True, False, True]
    assert topk.top_k_mask(magnitudes, 3, "unambiguous") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("nan", [False, True])
def test_sort_order_is_the_float32_argsort_of_mergekit(dtype: torch.dtype, descending: bool, nan: bool) -> None:
    """Many ties (a coarse grid): the unstable sort's order among them must be argsort's of float32 keys."""
    from mergekit_like.methods.task_vectors import sort_order

    g = torch.Generator().manual_seed(9)
    magnitudes = (torch.randn(200_003, generator=g) * 16).round().abs().div(16).to(dtype)
    if nan:
        magnitudes[::97] = float("nan")
        bits = magnitudes.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize])
        bits[5::193] = bits[0] + 1  # a NaN of another payload: equal to a float sort, not as bits
    expected = torch.argsort(magnitudes.float(), descending=descending)
    assert torch.equal(sort_order(magnitudes, descending), expected)
