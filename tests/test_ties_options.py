"""TIES trim options beyond mergekit's: ties at the threshold, and model-wide trimming."""

from __future__ import annotations

import torch

from mergekit_like.methods.task_vectors import magnitude_mask, sparse_task_vectors


def test_sort_keeps_exactly_k_and_keep_keeps_every_tie() -> None:
    delta = torch.tensor([3.0, 2.0, -2.0, 1.0])
    assert magnitude_mask(delta, 0.5, "sort").sum() == 2  # k = 2: 3 and one of the two 2s
    assert torch.equal(magnitude_mask(delta, 0.5, "keep"), torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_keep_equals_sort_when_no_tie_straddles_the_cut() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(magnitude_mask(delta, 0.3, "sort"), magnitude_mask(delta, 0.3, "keep"))


def test_parallel_sparsification_equals_sequential(monkeypatch) -> None:
    import mergekit_like.methods.task_vectors as tv

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=g)
    models = [base + torch.randn(64, 64, generator=g) for _ in range(3)]
    monkeypatch.setattr(tv, "PARALLEL_SPARSIFY", 1 << 40)
    sequential = sparse_task_vectors(models, base, [0.3, 0.5, 0.7], "magnitude")
    monkeypatch.setattr(tv, "PARALLEL_SPARSIFY", 1)
    parallel = sparse_task_vectors(models, base, [0.3, 0.5, 0.7], "magnitude")
    assert all(torch.equal(a, b) for a, b in zip(sequential, parallel))
