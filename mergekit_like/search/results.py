"""What a search leaves for people to look at: the best model with its card, and a plot of the trials."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_like.card import merge_outputs
from mergekit_like.io.sidefiles import has_config
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.plotting import require_matplotlib
from mergekit_like.search.runner import TRIALS_FILE, SearchResult, SearchSettings, TrialRecord
from mergekit_like.search.space import SearchSpace

logger = logging.getLogger(__name__)
BEST_DIR = "best"
PLOT_FILE = "search.png"


def write_best(space: SearchSpace, result: SearchResult, output: Path, settings: SearchSettings,
               *, options: MergeOptions | None = None, paths: Mapping[str, Path] | None = None) -> Path:
    """Merges the best trial's recipe into ``output/best`` (atomically), its card recording the search."""
    assert result.best_values is not None
    recipe = space.recipe(result.best_values)
    scored = sum(r.score is not None for r in result.records)
    values = ", ".join(f"{name} = {value:.6g}" if isinstance(value, float) else f"{name} = {value}"
                       for name, value in result.best_values.items())
    note = (f"Found by `mergekit-like search`: the best of {len(result.records)} trials ({scored} scored; "
            f"sampler {settings.sampler}, {settings.direction}, seed {settings.seed}) was trial "
            f"{result.best_number} with score {result.best_score:.6g} at {values}. Every trial is in "
            f"`{TRIALS_FILE}` beside this directory.")
    target = output / BEST_DIR
    with planned_merge(recipe, options or MergeOptions()) as plan:
        outputs = merge_outputs(recipe, [None], title=f"{output.name} (best of a search)",
                                has_config=has_config(plan.side_file_dir), paths=paths, note=note,
                                files={"search.json": json.dumps(_summary(result, settings), indent=2) + "\n"})
        written = run_merge(plan, target, outputs=outputs, overwrite=True)
    for note in filter(None, (w.nonfinite_note() for w in written.outputs)):
        logger.warning("%s", note)
    return target


def _summary(result: SearchResult, settings: SearchSettings) -> dict[str, Any]:
    return {"best_trial": result.best_number, "best_score": result.best_score, "best_values": result.best_values,
            "trials": len(result.records), "sampler": settings.sampler, "direction": settings.direction,
            "seed": settings.seed}


def plot_search(records: Sequence[TrialRecord], names: Sequence[str], path: Path, direction: str) -> Path:
    """Score over trials (with the best so far), and the score against each searched value."""
    plt = require_matplotlib()
    scored = [r for r in records if r.score is not None]
    scores = [r.score for r in scored if r.score is not None]
    columns = 1 + len(names)
    figure, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.6), squeeze=False)
    over = axes[0][0]
    over.scatter([r.number for r in scored], [r.score for r in scored], s=12, label="trial")
    best = [r for r in records if r.best is not None]
    over.step([r.number for r in best], [r.best for r in best], where="post", color="C1", label="best so far")
    failed = [r.number for r in records if r.score is None]
    if failed:
        over.scatter(failed, [min(scores, default=0.0)] * len(failed), marker="x", color="C3",
                     label="failed")
    over.set_xlabel("trial")
    over.set_ylabel(f"score ({direction})")
    over.legend(fontsize="small")
    for axis, name in zip(axes[0][1:], names):
        axis.scatter([r.values[name] for r in scored], [r.score for r in scored], s=12,
                     c=[r.number for r in scored], cmap="viridis")
        axis.set_xlabel(name, fontsize="small")
    figure.suptitle("merge search: score over trials and against each searched value (colour: trial)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
