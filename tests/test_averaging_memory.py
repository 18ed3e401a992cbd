"""An average's update and result hold one float32 state (per snapshot LAWA keeps) plus a bounded group of
tensors, never a second float32 copy of the model: peak RSS measured in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
