"""Study 7: does ``mergekit-like search`` beat a hand-picked grid on the multi-task setting?

The setting is study 4's (``multitask.py``): per seed a base trained on the three domains
(A: stdlib Python, B: license texts, C: C headers) and a fine-tune on each. Study 4 picks
task arithmetic's lambda and TIES's density and lambda from a small grid by the mean
validation loss. Here the same choice is made by the search command instead, through the
CLI, over more values than the grid has:

* task arithmetic: each fine-tune's weight in [0, 1] (3 values; lambda is their scale);
* TIES: each fine-tune's weight in [0, 1] and one density in [0.1, 1] (4 values);

each with ``--trials`` TPE trials scored by ``eval_cmd.py --domain all --split val`` (the
mean validation loss, the grid's criterion), ``--direction minimize``. Reported: the test
loss of the search's best against the grid's best on val, per seed, and the gap between the
validation loss each was chosen on and its test loss: a search picks among many more
candidates on the same validation split, so it is expected to fit that split more closely
(a larger val-to-test gap) than a four- or six-point grid.

    python benchmarks/evidence/search.py             # 3 seeds, 30 trials per method
    python benchmarks/evidence/search.py --quick     # smoke test

Writes benchmarks/results/search.md, search.png and search.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import multitask  # noqa: E402

METHODS = ("task_arithmetic", "ties")
WEIGHT = {"search": "uniform", "low": 0.0, "high": 1.0}
DENSITY = {"search": "uniform", "low": 0.1, "high": 1.0}


def space(method: str, base: Path, finetunes: list[Path]) -> dict:
    models = [{"model": str(path), "parameters": {"weight": dict(WEIGHT)}} for path in finetunes]
    parameters = {"density": dict(DENSITY)} if method == "ties" else {}
    return {"merge_method": method, "base_model": str(base), "parameters": parameters, "models": models}


def searched(method: str, base: Path, finetunes: list[Path], work: Path, trials: int, seed: int) -> dict:
    """The search's best (through the CLI), with its test and val scores and every trial's val loss."""
    space_file = work / f"space_{method}.yml"
    space_file.write_text(yaml.safe_dump(space(method, base, finetunes)))
    out = work / f"search_{method}"
    evaluate = f"{sys.executable} {HERE / 'eval_cmd.py'} {{path}} --domain all --split val"
    seconds = common.run_cli(["search", str(space_file), "--eval-cmd", evaluate, "--trials", str(trials),
                              "--direction", "minimize", "--seed", str(seed), "--no-plot", "-o", str(out), "-q"])
    summary = json.loads((out / "best" / "search.json").read_text())
    trials_seen = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    return {"values": summary["best_values"], "search_val": summary["best_score"], "seconds": seconds,
            "trial_val": [t["score"] for t in trials_seen], **multitask.scores(out / "best")}


def one_seed(seed: int, work: Path, base_steps: int, ft_steps: int, trials: int) -> dict:
    t0 = time.perf_counter()
    result, base, finetunes = multitask.train_models(seed, work, base_steps, ft_steps)
    result["grid"], result["search"] = {}, {}
    for method in METHODS:
        points = [(m, p) for m, p in multitask.grid() if m == method]
        merges = {multitask.label(m, p): multitask.merged_scores(m, p, base, finetunes,
                                                                 work / multitask.label(m, p), seed)
                  for m, p in points}
        best = min(merges, key=lambda k: multitask.mean_of(merges[k], "_val"))
        result["grid"][method] = {"label": best, "points": len(points), **merges[best]}
        result["search"][method] = searched(method, base, finetunes, work, trials, seed)
        print(f"[seed {seed}] {method}: grid {best} test {multitask.mean_of(merges[best]):.3f}, search test "
              f"{multitask.mean_of(result['search'][method]):.3f}", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    return result


# -- reporting --------------------------------------------------------------------------------


def report(results: list[dict], meta: dict) -> str:
    mean_of, fmt = multitask.mean_of, multitask.fmt
    lines = [f"# Study 7: merge search against a hand-picked grid (toy scale, {len(results)} seeds)", "",
             f"Setting: study 4's (byte-level GPT, {meta['params']:,} parameters; base {meta['base_steps']} steps, "
             f"fine-tunes {meta['ft_steps']} steps on A, B, C). Grid: study 4's (task arithmetic lambda "
             f"{list(multitask.LAMBDAS_TA)}; TIES density {list(multitask.DENSITIES)} x lambda "
             f"{list(multitask.LAMBDAS_TRIM)}, weights 1). Search: `mergekit-like search`, {meta['trials']} TPE "
             "trials per method over each fine-tune's weight in [0, 1] (and, for TIES, one density in [0.1, 1]), "
             "scored by the mean **val** loss over A, B, C. Both choose on val; every loss below is the **test** "
             f"loss in nats/byte, mean ± std over seeds {[r['seed'] for r in results]}.", "",
             "| method | chosen by | val loss (chosen on) | test A | test B | test C | test mean | val to test gap |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for how, key in (("grid", "grid"), (f"search, {meta['trials']} trials", "search")):
            entries = [r[key][method] for r in results]
            cells = [fmt([mean_of(e, "_val") for e in entries])]
            cells += [fmt([e[t] for e in entries]) for t in "ABC"]
            cells += [fmt([mean_of(e) for e in entries]), fmt([mean_of(e) - mean_of(e, "_val") for e in entries])]
            lines.append(f"| {method} | {how} | " + " | ".join(cells) + " |")
    lines += ["", "Values the search chose (per seed):", ""]
    for method in METHODS:
        for r in results:
            values = ", ".join(f"{k} = {v:.3f}" for k, v in r["search"][method]["values"].items())
            lines.append(f"- {method}, seed {r['seed']}: {values} (grid: {r['grid'][method]['label']})")
    lines += ["", "## The claims, as measured", "", *verdict(results, meta), "",
              f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def verdict(results: list[dict], meta: dict) -> list[str]:
    mean_of = multitask.mean_of
    lines = []
    for method in METHODS:
        val_better = sum(mean_of(r["search"][method], "_val") < mean_of(r["grid"][method], "_val") for r in results)
        test_better = sum(mean_of(r["search"][method]) < mean_of(r["grid"][method]) for r in results)
        gain_val = statistics.fmean(mean_of(r["grid"][method], "_val") - mean_of(r["search"][method], "_val")
                                    for r in results)
        gain_test = statistics.fmean(mean_of(r["grid"][method]) - mean_of(r["search"][method]) for r in results)
        lines.append(f"- {method}: the search's best is lower than the grid's on val in {val_better} of "
                     f"{len(results)} seeds (by {gain_val:+.3f} on average) and on test in {test_better} of "
                     f"{len(results)} (by {gain_test:+.3f}).")
    lines.append(f"- Overfitting to val: the search chose among {meta['trials']} candidates per method against the "
                 "grid's 4 or 6 on the same split; the val-to-test gap column shows how much of its val advantage "
                 "survives on test (a test split of about 300 KB per domain: differences of a few thousandths are "
                 "within what a different split would move).")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(6 * len(METHODS), 4.2), squeeze=False)
    for axis, method in zip(axes[0], METHODS):
        for i, r in enumerate(results):
            color = f"C{i}"
            val = [v for v in r["search"][method]["trial_val"] if v is not None]
            best = [min(val[:n + 1]) for n in range(len(val))]
            axis.plot(range(len(val)), best, color=color, label=f"seed {r['seed']}: search, best val so far")
            axis.axhline(multitask.mean_of(r["grid"][method], "_val"), color=color, linestyle="--",
                         label=f"seed {r['seed']}: grid's best val")
        axis.set_title(method)
        axis.set_xlabel("trial")
        axis.set_ylabel("mean val loss over A, B, C")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle("Merge search against the hand-picked grid (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 7: merge search against a hand-picked grid")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--trials", type=int, default=30)
    a = parser.parse_args()
    if a.quick:
        a.seeds, a.base_steps, a.finetune_steps, a.trials = a.seeds[:1], 60, 20, 4
    stem = "search_quick" if a.quick else "search"
    data = common.study_data(
        a, stem, "results",
        lambda work: [one_seed(s, work / f"seed{s}", a.base_steps, a.finetune_steps, a.trials) for s in a.seeds],
        base_steps=a.base_steps, ft_steps=a.finetune_steps, trials=a.trials)
    common.publish(a.out, stem, data, report(data["results"], data["meta"]),
                   lambda path: plot(data["results"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
