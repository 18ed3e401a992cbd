"""Study 3, "Soups" (Wortsman et al., 2022, Model soups), at toy scale on CPU.

One base model is pre-trained briefly on domain A (stdlib Python source), then
fine-tuned several times on domain B (license and copyright texts) with
different learning rates and data-order seeds. We compare, on the held-out
*test* split of B (the target) and of A (the original domain):

* the best single fine-tune (chosen by B *validation* loss, as in the paper),
* the uniform soup (``mergekit-like soup R1 ... Rn -o OUT``),
* the greedy soup (``mergekit-like soup ... --greedy --eval-cmd
  'python eval_cmd.py {path} --domain B --split val' --lower-is-better``).

Greedy selection sees only the B validation split; all reported numbers are
on the test splits, which nothing was selected on. Both soups are made by the
real CLI in a subprocess. The whole study is repeated for several study seeds
(a new base and new fine-tunes each time).

    python benchmarks/evidence/soups.py            # 3 study seeds, ~10 min on 2 CPU cores
    python benchmarks/evidence/soups.py --quick    # smoke test, ~1 min

Writes benchmarks/results/soups.md, soups.png and soups.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

# (learning rate, data-order seed) of each fine-tune
RUN_SETS = {
    "mixed": [(3e-4, 0), (3e-4, 1), (1e-3, 0), (1e-3, 1), (3e-3, 0)],  # different lrs and seeds
    "same_lr": [(3e-3, 0), (3e-3, 1), (3e-3, 2), (3e-3, 3), (3e-3, 4)],  # one lr, five data orders
}
RUNS = RUN_SETS["mixed"]


def scores(model: common.TinyGPT) -> dict[str, float]:
    return {"B_test": common.evaluate(model, "licenses", "test"),
            "B_val": common.evaluate(model, "licenses", "val"),
            "A_test": common.evaluate(model, "python", "test")}


def one_study(seed: int, work: Path, pre_steps: int, ft_steps: int) -> dict:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[seed {seed}] pre-training the base on python for {pre_steps} steps", flush=True)
    base = common.new_model(1000 + seed)
    common.train(base, "python", TrainConfig(steps=pre_steps, lr=1e-3, warmup=50, seed=seed),
                 log_every=max(1, pre_steps // 4))
    base_dir = common.save_model(base, work / "base")
    out: dict = {"seed": seed, "base": scores(base), "runs": []}
    t_pre = time.perf_counter() - t0
    ft_dirs = []
    for j, (lr, data_seed) in enumerate(RUNS):
        model = common.load_model(base_dir)
        common.train(model, "licenses", TrainConfig(steps=ft_steps, lr=lr, warmup=max(1, ft_steps // 10),
                                                     seed=10_000 + 100 * seed + data_seed))
        d = common.save_model(model, work / f"ft{j}_lr{lr:g}_s{data_seed}")
        ft_dirs.append(d)
        s = scores(model)
        out["runs"].append({"name": d.name, "lr": lr, "data_seed": data_seed, **s})
        print(f"[seed {seed}] fine-tune {d.name}: B test {s['B_test']:.4f}  B val {s['B_val']:.4f}  "
              f"A test {s['A_test']:.4f}", flush=True)
    t_ft = time.perf_counter() - t0 - t_pre

    uniform_dir = work / "uniform_soup"
    t_uniform = common.run_cli(["soup", *map(str, ft_dirs), "-o", str(uniform_dir), "-q"])
    out["uniform"] = scores(common.load_model(uniform_dir))

    greedy_dir = work / "greedy_soup"
    eval_cmd = f"{sys.executable} {HERE / 'eval_cmd.py'} {{path}} --domain B --split val"
    t_greedy = common.run_cli(["soup", *map(str, ft_dirs), "-o", str(greedy_dir), "--greedy",
                        "--eval-cmd", eval_cmd, "--lower-is-better", "-q"])
    greedy_log = json.loads((greedy_dir / "soup_scores.json").read_text())
    kept = [Path(k).name for k in greedy_log["kept"]]
    out["greedy"] = {**scores(common.load_model(greedy_dir)), "kept": kept,
                     "val_score_reported_by_cli": greedy_log["score"]}

    best = min(out["runs"], key=lambda r: r["B_val"])
    out["best_single"] = dict(best)
    out["wall_s"] = {"pretrain": t_pre, "finetune": t_ft, "uniform_soup_cli": t_uniform,
                     "greedy_soup_cli": t_greedy, "total": time.perf_counter() - t0}
    print(f"[seed {seed}] best single {best['name']}: B test {best['B_test']:.4f} A test {best['A_test']:.4f}; "
          f"uniform: B test {out['uniform']['B_test']:.4f} A test {out['uniform']['A_test']:.4f}; "
          f"greedy ({len(kept)} kept): B test {out['greedy']['B_test']:.4f} A test {out['greedy']['A_test']:.4f}; "
          f"{out['wall_s']['total']:.0f}s", flush=True)
    return out


ROWS = [("base (pre-trained on A only)", "base"), ("fine-tunes, mean of 5", "runs_mean"),
        ("best single (by B val)", "best_single"), ("uniform soup (5)", "uniform"), ("greedy soup", "greedy")]


def row_values(study: dict, key: str) -> dict[str, float]:
    if key == "runs_mean":
        return {m: statistics.fmean(r[m] for r in study["runs"]) for m in ("B_test", "B_val", "A_test")}
    return study[key]


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(studies: list[dict], meta: dict) -> str:
    n = len(studies)
    lines = [f"# Study 3: model soups (toy scale, {n} study seed{'s' if n > 1 else ''})", "",
             "Data on this machine (file-level split by path hash; see benchmarks/README.md):", "",
             common.describe_domains(("python", "licenses")), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters (d={meta['cfg']['d_model']}, "
             f"{meta['cfg']['n_layer']} layers, context {meta['cfg']['n_ctx']}). Base: {meta['pre_steps']} steps "
             f"on A=python (lr 1e-3, batch 32). Fine-tunes: {meta['ft_steps']} steps on B=licenses, "
             f"(lr, data seed) = {', '.join(f'({lr:g}, {s})' for lr, s in RUNS)}. "
             "Loss = held-out next-byte cross-entropy in nats/byte (lower is better); "
             "best single and greedy selection use B **val**; every number below is on **test** splits.", "",
             f"Values are mean ± sample std over study seeds {[s['seed'] for s in studies]} "
             "(each seed: new base, new fine-tunes).", "",
             "| model | B test (target) | A test (original) | B val |", "|---|---|---|---|"]
    for label, key in ROWS:
        vals = [row_values(s, key) for s in studies]
        lines.append(f"| {label} | {fmt([v['B_test'] for v in vals])} | {fmt([v['A_test'] for v in vals])} | "
                     f"{fmt([v['B_val'] for v in vals])} |")
    lines += ["", "Per seed (differences are soup minus best single; negative = soup better):", "",
              "| seed | best single | B test: uniform − best | B test: greedy − best | "
              "A test: uniform − best | A test: greedy − best | greedy kept | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for s in studies:
        b = s["best_single"]
        lines.append(
            f"| {s['seed']} | {b['name']} | {s['uniform']['B_test'] - b['B_test']:+.4f} | "
            f"{s['greedy']['B_test'] - b['B_test']:+.4f} | {s['uniform']['A_test'] - b['A_test']:+.4f} | "
            f"{s['greedy']['A_test'] - b['A_test']:+.4f} | {', '.join(s['greedy']['kept'])} | "
            f"{s['wall_s']['total']:.0f} |")
    lines += ["", "Every fine-tune (B test / A test):", "", "| seed | " + " | ".join(
        f"lr {lr:g}, s{d}" for lr, d in RUNS) + " |", "|---" * (len(RUNS) + 1) + "|"]
    for s in studies:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{r['B_test']:.4f} / {r['A_test']:.4f}" for r in s["runs"])
                     + " |")
    lines += ["", f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def plot(studies: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 4.2), squeeze=False)
    for ax, s in zip(axes[0], studies):
        colors = {3e-4: "#9ecae1", 1e-3: "#4292c6", 3e-3: "#08306b"}
        for r in s["runs"]:
            ax.scatter(r["B_test"], r["A_test"], color=colors.get(r["lr"], "gray"), s=30,
                       label=f"fine-tune lr {r['lr']:g}")
        b = s["best_single"]
        ax.scatter(b["B_test"], b["A_test"], facecolors="none", edgecolors="red", s=140, linewidths=1.5,
                   label="best single (B val)")
        ax.scatter(s["uniform"]["B_test"], s["uniform"]["A_test"], marker="*", color="orange", s=200,
                   label="uniform soup (CLI)")
        ax.scatter(s["greedy"]["B_test"], s["greedy"]["A_test"], marker="P", color="green", s=140,
                   label=f"greedy soup (CLI, {len(s['greedy']['kept'])} kept)")
        # the base (far off, B ~2.97 / A ~1.86) is named in the title so the axes stay on the fine-tunes
        ax.set_title(f"study seed {s['seed']} (base: B {s['base']['B_test']:.2f}, A {s['base']['A_test']:.2f})",
                     fontsize=10)
        ax.set_xlabel("B = licenses, test loss (nats/byte)")
        ax.set_ylabel("A = python, test loss (nats/byte)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.suptitle("Model soups, toy scale (lower-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 3: model soups")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--runs", choices=sorted(RUN_SETS), default="mixed",
                        help="fine-tune set: mixed lrs (soups.*) or one lr, five data orders (soups_same_lr.*)")
    args = parser.parse_args()
    global RUNS
    RUNS = [tuple(r) for r in RUN_SETS[args.runs]]
    stem = ("soups_quick" if args.quick else "soups") + ("" if args.runs == "mixed" else f"_{args.runs}")
    if args.quick:
        args.seeds, args.pretrain_steps, args.finetune_steps = args.seeds[:1], 40, 10

    def run(work: Path) -> list:
        print(common.describe_domains(("python", "licenses")), flush=True)
        return [one_study(s, work / f"seed{s}", args.pretrain_steps, args.finetune_steps) for s in args.seeds]

    data = common.study_data(args, stem, "studies", run, runs=args.runs, pre_steps=args.pretrain_steps,
                             ft_steps=args.finetune_steps)
    common.publish(args.out, stem, data, report(data["studies"], data["meta"]),
                   lambda path: plot(data["studies"], path), save_json=not args.replot)


if __name__ == "__main__":
    main()
