"""Study 4, multi-task merging (task arithmetic, TIES, DARE), at toy scale on CPU.

The claim tested (Ilharco et al., 2023; Yadav et al., 2023; Yu et al., 2024): adding the
task vectors of models fine-tuned separately from one base gives one model that does well
on every task, and TIES (trim, elect signs, disjoint mean) and DARE (random drop and
rescale) merge with less interference than plain task arithmetic.

Per seed, a base is trained on a mix of the three domains (A: stdlib Python, B: license
texts, C: C headers), then fine-tuned separately on each. The three fine-tunes are merged
through the CLI, ``mergekit-like merge --method M --base BASE FT_A FT_B FT_C -p ...``, over
a small grid:

* task_arithmetic: lambda in {0.3, 0.5, 0.7, 1.0} (weights 1);
* ties: density in {0.2, 0.5, 0.8} x lambda in {0.5, 1.0} (weights 1, normalised
  disjoint mean, so lambda 1 keeps the agreeing entries' mean);
* dare_ties: the same grid, seeded.

Reported: held-out test loss (nats/byte) of the base, each fine-tune and each merge on
every domain; per method, the best grid point by mean validation loss over the three
domains (chosen on val, reported on test).

    python benchmarks/evidence/multitask.py            # 3 seeds, ~12 min on 2 CPU cores
    python benchmarks/evidence/multitask.py --quick    # smoke test, ~1 min

Writes benchmarks/results/multitask.md, multitask.png and multitask.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

TASKS = ("python", "licenses", "c_headers")
LETTER = dict(zip(TASKS, "ABC"))
LAMBDAS_TA = (0.3, 0.5, 0.7, 1.0)
DENSITIES = (0.2, 0.5, 0.8)
LAMBDAS_TRIM = (0.5, 1.0)


def scores(directory: Path) -> dict[str, float]:
    model = common.load_model(directory)
    out = {LETTER[t]: common.evaluate(model, t, "test") for t in TASKS}
    out |= {f"{LETTER[t]}_val": common.evaluate(model, t, "val") for t in TASKS}
    return out


def grid() -> list[tuple[str, dict[str, float]]]:
    points = [("task_arithmetic", {"lambda": lam}) for lam in LAMBDAS_TA]
    for method in ("ties", "dare_ties"):
        points += [(method, {"density": d, "lambda": lam}) for d in DENSITIES for lam in LAMBDAS_TRIM]
    return points


def label(method: str, params: dict[str, float]) -> str:
    return method + "".join(f"_{k}{v:g}" for k, v in params.items())


def train_base(seed: int, steps: int, directory: Path) -> Path:
    """A base trained on the three domains in turn, a third of the steps each, then mixed."""
    model = common.new_model(2000 + seed)
    third = max(1, steps // 3)
    for i, task in enumerate(TASKS):
        common.train(model, task, TrainConfig(steps=third, lr=1e-3, warmup=third // 10, seed=100 * seed + i))
    return common.save_model(model, directory)


def train_models(seed: int, work: Path, base_steps: int, ft_steps: int) -> tuple[dict, Path, list[Path]]:
    """The base and its three fine-tunes, with their test and val scores."""
    print(f"[seed {seed}] base: {base_steps} steps over A, B, C", flush=True)
    base = train_base(seed, base_steps, work / "base")
    result: dict = {"seed": seed, "base": scores(base), "finetunes": {}}
    finetunes = []
    for i, task in enumerate(TASKS):
        model = common.load_model(base)
        common.train(model, task, TrainConfig(steps=ft_steps, lr=1e-3, warmup=max(1, ft_steps // 10),
                                              seed=1000 * seed + 10 + i))
        finetunes.append(common.save_model(model, work / f"ft_{LETTER[task]}"))
        result["finetunes"][LETTER[task]] = scores(finetunes[-1])
        print(f"[seed {seed}] fine-tune on {LETTER[task]}: " + " ".join(
            f"{t} {result['finetunes'][LETTER[task]][t]:.3f}" for t in "ABC"), flush=True)
    return result, base, finetunes


def merged_scores(method: str, params: dict[str, float], base: Path, finetunes: list[Path], out: Path,
                  seed: int) -> dict:
    """One grid point merged through the CLI (weights 1), with its test and val scores."""
    args = ["merge", "--method", method, "--base", str(base), *map(str, finetunes), "-p", "weight=1,1,1",
            *(arg for k, v in params.items() for arg in ("-p", f"{k}={v:g}")), "-o", str(out), "-q"]
    if method == "dare_ties":
        args += ["--seed", str(seed)]
    common.run_cli(args)
    return {"method": method, "params": params, **scores(out)}


def one_seed(seed: int, work: Path, base_steps: int, ft_steps: int) -> dict:
    t0 = time.perf_counter()
    result, base, finetunes = train_models(seed, work, base_steps, ft_steps)
    result["merges"] = {label(m, p): merged_scores(m, p, base, finetunes, work / label(m, p), seed)
                        for m, p in grid()}
    result["wall_s"] = time.perf_counter() - t0
    print(f"[seed {seed}] {len(grid())} merges done ({result['wall_s']:.0f}s)", flush=True)
    return result


# -- reporting --------------------------------------------------------------------------------


def mean_of(entry: dict, suffix: str = "") -> float:
    return statistics.fmean(entry[t + suffix] for t in "ABC")


def best_by_val(result: dict, method: str) -> str:
    """The grid point of ``method`` with the lowest mean validation loss over the domains."""
    return min((k for k, v in result["merges"].items() if v["method"] == method),
               key=lambda k: mean_of(result["merges"][k], "_val"))


def fmt(vals: list[float]) -> str:
    return f"{vals[0]:.3f}" if len(vals) == 1 else f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def rows(results: list[dict]) -> list[tuple[str, list[dict]]]:
    out = [("base (A, B, C in turn)", [r["base"] for r in results])]
    out += [(f"fine-tuned on {t} only", [r["finetunes"][t] for r in results]) for t in "ABC"]
    out.append(("best single fine-tune per domain (oracle: 3 models)",
                [{t: r["finetunes"][t][t] for t in "ABC"} for r in results]))
    for method in ("task_arithmetic", "ties", "dare_ties"):
        chosen = [r["merges"][best_by_val(r, method)] for r in results]
        picks = sorted({label(c["method"], c["params"]).removeprefix(method + "_") for c in chosen})
        out.append((f"{method}, best on val ({', '.join(picks)})", chosen))
    return out


def report(results: list[dict], meta: dict) -> str:
    lines = [f"# Study 4: multi-task merging (toy scale, {len(results)} seeds)", "",
             common.describe_domains(TASKS), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters. Base: {meta['base_steps']} steps, a third on "
             f"each of A, B, C in turn; fine-tunes: {meta['ft_steps']} steps on one domain each (lr 1e-3). Merges: "
             f"base + 3 task vectors through `mergekit-like merge`, weights 1; grid: task arithmetic lambda "
             f"{list(LAMBDAS_TA)}; TIES and DARE-TIES density {list(DENSITIES)} x lambda {list(LAMBDAS_TRIM)}. "
             "The best grid point per method is chosen on the mean **val** loss over A, B, C; every number "
             f"below is **test** loss in nats/byte, mean ± std over seeds {[r['seed'] for r in results]}.", "",
             "| model | A | B | C | mean |", "|---|---|---|---|---|"]
    for name, entries in rows(results):
        cells = [fmt([e[t] for e in entries]) for t in "ABC"] + [fmt([mean_of(e) for e in entries])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Every grid point (test loss, mean over seeds; A / B / C / mean):", ""]
    for key in results[0]["merges"]:
        entries = [r["merges"][key] for r in results]
        lines.append(f"- {key}: " + " / ".join(f"{statistics.fmean(e[t] for e in entries):.3f}" for t in "ABC")
                     + f" / {statistics.fmean(mean_of(e) for e in entries):.3f}")
    lines += ["", "## The claims, as measured", "", *verdict(results), "",
              f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    def chosen_mean(r: dict, method: str) -> float:
        return mean_of(r["merges"][best_by_val(r, method)])

    def count(better: Callable[[dict], bool]) -> str:
        return f"{sum(better(r) for r in results)} of {len(results)} seeds"

    best_single = [min(mean_of(r["finetunes"][t]) for t in "ABC") for r in results]
    oracle = statistics.fmean(statistics.fmean(r["finetunes"][t][t] for t in "ABC") for r in results)
    lines = ["- One merged model against the best single fine-tune (by mean over A, B, C): "
             + ", ".join(f"{m} {statistics.fmean(chosen_mean(r, m) for r in results):.3f}"
                         for m in ("task_arithmetic", "ties", "dare_ties"))
             + f" vs {statistics.fmean(best_single):.3f}; task arithmetic better in "
             + count(lambda r: chosen_mean(r, "task_arithmetic") < min(mean_of(r["finetunes"][t]) for t in "ABC"))
             + ".",
             "- Against the base: task arithmetic better on the mean in "
             + count(lambda r: chosen_mean(r, "task_arithmetic") < mean_of(r["base"])) + ".",
             "- TIES against task arithmetic (each at its best grid point): better in "
             + count(lambda r: chosen_mean(r, "ties") < chosen_mean(r, "task_arithmetic"))
             + "; DARE-TIES better in "
             + count(lambda r: chosen_mean(r, "dare_ties") < chosen_mean(r, "task_arithmetic")) + ".",
             f"- The oracle (each domain scored by its own fine-tune) is the bound no single model is "
             f"expected to reach: mean {oracle:.3f}."]
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"task_arithmetic": "tab:blue", "ties": "tab:orange", "dare_ties": "tab:green"}
    for key in results[0]["merges"]:
        method = results[0]["merges"][key]["method"]
        x = statistics.fmean(mean_of(r["merges"][key], "_val") for r in results)
        y = statistics.fmean(mean_of(r["merges"][key]) for r in results)
        ax.scatter(x, y, color=colors[method], s=30, label=method)
    for t in "ABC":
        ax.scatter(statistics.fmean(mean_of(r["finetunes"][t], "_val") for r in results),
                   statistics.fmean(mean_of(r["finetunes"][t]) for r in results), marker="s", color="gray", s=40,
                   label="single fine-tunes")
        ax.annotate(f"ft {t}", (statistics.fmean(mean_of(r["finetunes"][t], "_val") for r in results),
                                statistics.fmean(mean_of(r["finetunes"][t]) for r in results)), fontsize=8)
    ax.scatter(statistics.fmean(mean_of(r["base"], "_val") for r in results),
               statistics.fmean(mean_of(r["base"]) for r in results), marker="x", color="black", s=60, label="base")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("mean val loss over A, B, C (selection)")
    ax.set_ylabel("mean test loss over A, B, C")
    ax.set_title("Multi-task merges of three fine-tunes, every grid point (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 4: multi-task merging")
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=300)
    a = parser.parse_args()
    if a.quick:
        a.seeds, a.base_steps, a.finetune_steps = a.seeds[:1], 60, 20
    stem = "multitask_quick" if a.quick else "multitask"
    data = common.study_data(
        a, stem, "results",
        lambda work: [one_seed(s, work / f"seed{s}", a.base_steps, a.finetune_steps) for s in a.seeds],
        base_steps=a.base_steps, ft_steps=a.finetune_steps)
    common.publish(a.out, stem, data, report(data["results"], data["meta"]),
                   lambda path: plot(data["results"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
