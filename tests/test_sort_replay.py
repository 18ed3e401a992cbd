"""The sort replay: the entries a CPU ``torch.sort`` puts at a range of positions, found without the
sort, must be the sort's own (ties of every kind decide which entries those are)."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.methods import sort_replay
from mergekit_like.methods.sort_replay import sorted_range_mask
from mergekit_like.methods.task_vectors import breadcrumbs_mask, magnitude_mask, sorted_range


def keys_of(kind: str, n: int, seed: int) -> torch.Tensor:
    """Non-negative float32 keys with the tie patterns a trim meets."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16_deltas":  # |x - base| of bf16 weights: few distinct values, large tie groups
        base = torch.randn(n, generator=g).bfloat16()
        return ((base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16().float() - base.float()).abs()
    if kind == "two_values":
        return torch.randint(0, 2, (n,), generator=g).float()
    if kind == "all_equal":
        return torch.ones(n)
    if kind == "ascending":
        return torch.randint(0, 40, (n,), generator=g).sort().values.float()
    if kind == "descending":
        return torch.randint(0, 40, (n,), generator=g).sort(descending=True).values.float()
    if kind == "organ_pipe":
        half = torch.arange(n // 2, dtype=torch.float32) // 3
        return torch.cat([half, half.flip(0), torch.zeros(n - 2 * (n // 2))])
    return torch.rand(n, generator=g)  # "distinct"


def argsort_mask(keys: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[torch.argsort(keys.float(), descending=descending)[lo:hi]] = True
    return mask


KINDS = ["bf16_deltas", "two_values", "all_equal", "ascending", "descending", "organ_pipe", "distinct"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("n", [1, 16, 17, 100, 5_003, 200_001])
def test_replay_keeps_the_entries_argsort_puts_in_range(kind: str, descending: bool, n: int) -> None:
    keys = keys_of(kind, n, seed=n)
    for lo, hi in [(0, n // 2), (n // 3, n), (n // 5, n - n // 7), (n // 2, n // 2 + 1), (0, n), (0, 0)]:
        got = sorted_range_mask(keys, lo, hi, descending)
        if got is None:
            # Organ pipes defeat the median of three: there std::sort itself falls back to a heap sort.
            assert kind == "organ_pipe" and n > 1000
            continue
        assert torch.equal(got, argsort_mask(keys, lo, hi, descending)), (lo, hi)


@pytest.mark.parametrize("descending", [True, False])
def test_replay_on_16_bit_patterns_is_the_sort_of_float32_keys(descending: bool) -> None:
    # bf16 magnitudes replayed as their int16 bit patterns: the order of the float32 keys.
    magnitudes = keys_of("bf16_deltas", 300_007, seed=3).bfloat16()
    k = int(0.4 * magnitudes.numel())
    got = sorted_range_mask(magnitudes.view(torch.int16), 0, k, descending)
    assert got is not None and torch.equal(got, argsort_mask(magnitudes, 0, k, descending))


def test_replay_reads_several_chunks_from_each_end() -> None:
    n = 3 * sort_replay.CHUNK + 11
    keys = keys_of("bf16_deltas", n, seed=5)
    got = sorted_range_mask(keys, 0, n // 2, True)
    assert got is not None and torch.equal(got, argsort_mask(keys, 0, n // 2, True))


def test_a_replay_that_would_heap_sort_gives_up_and_the_trim_sorts(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = keys_of("bf16_deltas", 10_000, seed=7)
    monkeypatch.setattr(sort_replay, "depth_limit", lambda n: 1)
    assert sorted_range_mask(keys, 0, 5_000, True) is None
    assert torch.equal(sorted_range(keys, 0, 5_000, True), argsort_mask(keys, 0, 5_000, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_exact_trims_are_the_masks_of_mergekits_argsort(dtype: torch.dtype) -> None:
    magnitudes = keys_of("bf16_deltas", 120_011, seed=11).to(dtype)
    n = magnitudes.numel()
    k = int(0.3 * n)
    assert torch.equal(magnitude_mask(magnitudes, 0.3, "sort"), argsort_mask(magnitudes, 0, k, True))
    keep, top = int(0.5 * n), int(0.01 * n)
    expected = argsort_mask(magnitudes, n - keep - top, n - top, False)
    assert torch.equal(breadcrumbs_mask(magnitudes, 0.5, 0.01), expected)


def test_replay_refuses_other_devices() -> None:
    with pytest.raises(ValueError, match="CPU"):
        sorted_range_mask(torch.ones(4, device="meta"), 0, 2, True)


@pytest.mark.parametrize("organ_pipe", [False, True])
def test_a_consumed_replay_reorders_its_keys_or_gives_them_back(organ_pipe: bool) -> None:
    keys = keys_of("organ_pipe" if organ_pipe else "bf16_deltas", 50_001, seed=13)
    original = keys.clone()
    got = sorted_range_mask(keys, 0, 20_000, True, consume=True)
    if organ_pipe:
        assert got is None and torch.equal(keys, original)  # given up: the caller's sort needs them
    else:
        assert got is not None and torch.equal(got, argsort_mask(original, 0, 20_000, True))
        assert not torch.equal(keys, original)
    assert torch.equal(sorted_range(keys if organ_pipe else original.clone(), 0, 20_000, True, consume=True),
                       argsort_mask(original, 0, 20_000, True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("descending", [True, False])
def test_chunks_of_eight_flags_give_the_same_entries(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                     descending: bool) -> None:
    # Small chunks: every scan crosses chunk ends, and the right scan starts in a partial chunk.
    monkeypatch.setattr(sort_replay, "CHUNK", 8)
    keys = keys_of(kind, 3_001, seed=17)
    got = sorted_range_mask(keys, 500, 2_200, descending)
    if got is not None or kind != "organ_pipe":
        assert got is not None and torch.equal(got, argsort_mask(keys, 500, 2_200, descending))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_integer_keys_replay_as_their_values(dtype: torch.dtype) -> None:
    # The final insertion sort orders descending runs without negating (unsigned keys, the smallest int).
    keys = torch.randint(0, 3, (2_000,), generator=torch.Generator().manual_seed(19)).to(dtype)
    for descending in (True, False):
        got = sorted_range_mask(keys, 0, 777, descending)
        assert got is not None and torch.equal(got, argsort_mask(keys, 0, 777, descending))


def test_this_torch_sorts_as_the_replay_assumes_else_trims_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    if sys.platform.startswith("linux"):
        assert sort_replay.replays_this_sort()
    keys = keys_of("bf16_deltas", 10_000, seed=23)
    import mergekit_like.methods.task_vectors as task_vectors

    monkeypatch.setattr(task_vectors, "replays_this_sort", lambda: False)
    monkeypatch.setattr(task_vectors, "sorted_range_mask", lambda *a, **k: pytest.fail("replayed"))
    assert torch.equal(sorted_range(keys, 0, 4_000, True), argsort_mask(keys, 0, 4_000, True))
