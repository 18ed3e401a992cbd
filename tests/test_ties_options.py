"""TIES trim options beyond mergekit's, and the two-phase (mask, then blocks) kernel."""

from __future__ import annotations

import pytest
import torch

import mergekit_like.methods.task_vectors as tv
from mergekit_like.methods import get_method
from mergekit_like.methods.task_vectors import magnitude_mask


def test_sort_keeps_exactly_k_and_keep_keeps_every_tie() -> None:
    magnitudes = torch.tensor([3.0, 2.0, 2.0, 1.0])
    assert magnitude_mask(magnitudes, 0.5, "sort").sum() == 2  # k = 2: 3 and one of the two 2s
    assert magnitude_mask(magnitudes, 0.5, "keep").tolist() == [True, True, True, False]


def test_keep_equals_sort_when_no_tie_straddles_the_cut() -> None:
    magnitudes = torch.randn(1000, generator=torch.Generator().manual_seed(0)).abs()
    assert torch.equal(magnitude_mask(magnitudes, 0.3, "sort"), magnitude_mask(magnitudes, 0.3, "keep"))


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": [0.3, 0.5, 0.7], "rescale": True}),
    ("breadcrumbs_ties", {"density": [0.6, 0.6, 0.6], "gamma": [0.05, 0.05, 0.05]}),
    ("dare_ties", {"density": [0.5, 0.5, 0.5]}),
])
def test_blocks_and_threads_do_not_change_a_bit(monkeypatch: pytest.MonkeyPatch, method: str, params: dict) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 70, generator=g).to(torch.bfloat16).float()
    models = [base + 0.01 * torch.randn(300, 70, generator=g) for _ in range(3)]
    kernel = get_method(method)

    def run() -> torch.Tensor:
        extra = {"generator": torch.Generator().manual_seed(5)} if method == "dare_ties" else {}
        return kernel(models, base=base, weight=[1.0, 0.6, 0.3], **params, **extra)

    monkeypatch.setattr(tv, "PARALLEL_MIN", 1 << 40)
    monkeypatch.setattr(tv, "BLOCK", 1 << 30)
    whole = run()
    monkeypatch.setattr(tv, "PARALLEL_MIN", 1)
    monkeypatch.setattr(tv, "BLOCK", 997)  # blocks that cut rows anywhere
    assert torch.equal(whole, run())
