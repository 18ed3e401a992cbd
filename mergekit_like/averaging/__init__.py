"""Averages over training trajectories (EMA, power EMA, post-hoc EMA, SWA, LAWA, SFA): one
implementation for the offline `average` command and the training hook's sidecar."""

from mergekit_like.averaging.base import Averager, RunningAverage, Snapshot
from mergekit_like.averaging.batchnorm import update_bn
from mergekit_like.averaging.ema import EMA, decay_from_half_life
from mergekit_like.averaging.lawa import LAWA, lawa_selection
from mergekit_like.averaging.plan import AverageListing, AveragePlan, AverageSettings, list_average, plan_average
from mergekit_like.averaging.posthoc import PostHocEMA, reconstruct
from mergekit_like.averaging.power_ema import PowerEMA, sigma_rel_to_gamma
from mergekit_like.averaging.sfa import AnchorPull, sfa_merge, sfa_pull
from mergekit_like.averaging.swa import SWA, UniformMean

__all__ = ["EMA", "LAWA", "SWA", "AnchorPull", "AverageListing", "AveragePlan", "AverageSettings", "Averager",
           "PostHocEMA", "PowerEMA", "RunningAverage", "Snapshot", "UniformMean", "decay_from_half_life",
           "lawa_selection", "list_average", "plan_average", "reconstruct", "sfa_merge", "sfa_pull",
           "sigma_rel_to_gamma", "update_bn"]
