"""Merge search: recipes whose values are ranges, sampled by Optuna, trials run here or on a Ray cluster."""

from mergekit_like.search.runner import SearchResult, SearchSettings, TrialRecord, run_search
from mergekit_like.search.space import Range, SearchSpace, load_space, space_from

__all__ = ["Range", "SearchResult", "SearchSettings", "SearchSpace", "TrialRecord", "load_space", "run_search",
           "space_from"]
