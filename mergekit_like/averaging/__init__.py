"""Averages over training trajectories (EMA, SWA, LAWA, SFA): one implementation for the
offline `average` command and the training hook's sidecar."""

from mergekit_like.averaging.base import Averager, Snapshot
from mergekit_like.averaging.ema import EMA, decay_from_half_life
from mergekit_like.averaging.lawa import LAWA, lawa_selection
from mergekit_like.averaging.sfa import sfa_merge
from mergekit_like.averaging.swa import SWA, UniformMean

__all__ = ["EMA", "LAWA", "SWA", "Averager", "Snapshot", "UniformMean", "decay_from_half_life",
           "lawa_selection", "sfa_merge"]
