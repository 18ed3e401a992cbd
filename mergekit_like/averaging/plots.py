"""Pictures of averages, for people who would rather look than read (matplotlib, imported when used)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mergekit_like.averaging.offline import AverageOutput
from mergekit_like.averaging.posthoc import read_snapshot_info
from mergekit_like.averaging.trajectory import TrajectoryPoint
from mergekit_like.plotting import require_matplotlib


def plot_reconstruction(points: Sequence[TrajectoryPoint], outputs: Sequence[AverageOutput], path: Path) -> Path:
    """Each post-hoc EMA output's weights on the stored snapshots over training steps, one line per profile."""
    plt = require_matplotlib()
    gammas = [read_snapshot_info(p.path).gamma for p in points]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for output in outputs:
        if output.reconstruction is None:
            continue
        for gamma in sorted(set(gammas)):
            mine = [i for i, g in enumerate(gammas) if g == gamma]
            axes.plot([points[i].step for i in mine], [output.reconstruction.weights[i] for i in mine],
                      marker=".", label=f"{output.label} from the profile gamma={gamma:.3g} "
                                        f"(error {output.reconstruction.error:.1%})")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_xlabel("training step of the stored snapshot")
    axes.set_ylabel("weight in the reconstruction")
    axes.set_title("Post-hoc EMA: weights of the stored snapshots")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
