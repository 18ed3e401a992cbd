"""An average's update and result hold one float32 state (per snapshot LAWA keeps) plus a bounded group of
tensors, never a second float32 copy of the model: peak RSS measured in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from mergekit_like.averaging import EMA, LAWA, SWA, AnchorPull, PowerEMA, RunningAverage
from mergekit_like.averaging.base import FOLD_GROUP_BYTES

TENSORS, ELEMENTS = 80, 2_500_000  # 800 MB in float32: many fold groups
MODEL_F32 = TENSORS * ELEMENTS * 4

SCRIPT = """
import resource, sys, torch
from mergekit_like.averaging import EMA, LAWA, SWA

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

kind, tensors, elements = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
snapshot = {f"t{i}": torch.randn(elements).to(torch.bfloat16) for i in range(tensors)}
averager = {"ema": lambda: EMA(0.9), "swa": lambda: SWA(), "lawa": lambda: LAWA(k=2)}[kind]()
averager.update(snapshot, 1)  # the first snapshot becomes the state (LAWA: the first one kept)
if kind == "lawa":
    averager.update(snapshot, 2)
    before = peak()
    result = averager.result()
    for name in result:  # as the sidecar's writer reads it: a tensor at a time
        value = result[name]
        del value
else:
    before = peak()
    averager.update(snapshot, 2)
print(peak() - before)
"""


@pytest.mark.parametrize("kind", ["ema", "swa", "lawa"])
def test_folding_and_reading_an_average_adds_no_copy_of_the_model(kind: str) -> None:
    grown = int(subprocess.run([sys.executable, "-c", SCRIPT, kind, str(TENSORS), str(ELEMENTS)], check=True,
                               capture_output=True, text=True, timeout=120).stdout)
    # A fold holds a group's float32 copies (SWA a difference too): measured 30-210 MiB, the allocator's
    # reuse of freed blocks varying; a whole float32 copy of the model (as before) is 763 MiB and more.
    assert 2 * FOLD_GROUP_BYTES < MODEL_F32 / 4
    assert grown < MODEL_F32 / 2, f"peak RSS grew {grown / 2**20:.0f} MiB"


def snapshots_of_mixed_sizes(count: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3,), "b": (4, 5), "c": (2,), "d": (7, 2), "n": ()}
    return [{name: (torch.randn(shape, generator=g) if name != "n" else torch.tensor(step))
             for name, shape in shapes.items()} for step in range(count)]


@pytest.mark.parametrize("make", [lambda: EMA(0.9), lambda: EMA(0.99, warmup="inv_gamma"), lambda: SWA(),
                                  lambda: PowerEMA(0.1), lambda: AnchorPull(0.3)],
                         ids=["ema", "ema warm-up", "swa", "power ema", "sfa anchor pull"])
def test_every_running_average_folds_in_groups_bit_for_bit(make: Callable[[], RunningAverage],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for group_bytes in (FOLD_GROUP_BYTES, 16):  # one group; a group per tensor (tensors of other sizes)
        monkeypatch.setattr("mergekit_like.averaging.base.FOLD_GROUP_BYTES", group_bytes)
        averager = make()
        for step, snapshot in enumerate(snapshots_of_mixed_sizes(5), 1):
            averager.update(snapshot, step)
        results.append((averager.result_copy(), averager.state_dict()))
    (whole, whole_state), (grouped, grouped_state) = results
    assert whole.keys() == grouped.keys()
    assert all(torch.equal(whole[n], grouped[n]) for n in whole)
    tensors = [k for k, v in whole_state.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(whole_state[k], grouped_state[k]) for k in tensors)  # SFA's anchor too


def test_lawa_reads_as_the_mean_of_its_chosen_snapshots_and_is_empty_before_any() -> None:
    lawa = LAWA(k=2)
    assert dict(lawa.result()) == {}
    for step, snapshot in enumerate(snapshots_of_mixed_sizes(3), 1):
        lawa.update(snapshot, step)
    assert len(lawa.kept) == 2  # the oldest went before the newest was copied
    last, newest = snapshots_of_mixed_sizes(3)[1:]
    result = lawa.result()
    assert "a" in result and "zz" not in result and len(result) == 5
    assert torch.equal(result["b"], last["b"] + (newest["b"] - last["b"]) / 2)
    assert torch.equal(result["n"], newest["n"])
