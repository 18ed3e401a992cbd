"""Averaging during live training: a hook that snapshots the model to a sidecar process.

    from mergekit_like.hook import WeightAveraging, EMA, SWA, LAWA, SFA, PowerEMA, PostHocEMA
"""

from mergekit_like.averaging.ema import EMA
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.averaging.posthoc import PostHocEMA
from mergekit_like.averaging.power_ema import PowerEMA
from mergekit_like.averaging.swa import SWA
from mergekit_like.hook.weight_averaging import SFA, SnapshotCounts, WeightAveraging

__all__ = ["EMA", "LAWA", "SFA", "SWA", "PostHocEMA", "PowerEMA", "SnapshotCounts", "WeightAveraging"]
