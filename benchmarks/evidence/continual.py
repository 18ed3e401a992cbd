"""Study 1, continual learning ("Soup to go", SFA; Kleiman et al., 2025), at toy scale on CPU.

The claim tested: sequential fine-tuning with averaging (SFA: every ceil(p*T) steps of a
task, the live model is pulled halfway back to the model at the task's start) keeps the
earlier tasks far better than plain sequential fine-tuning, at a small cost on the new
task; about as well as a replay buffer; better than merging after the fact; and averaging
during training (p < 1) keeps more than one merge at the end (p = 1).

Per seed, the byte-level GPT of ``common.py`` is trained on task A (stdlib Python) from
scratch, then fine-tuned on B (license texts), then on C (C headers), the same number of
steps, learning rate and data order per task for every method:

* **plain**: sequential fine-tuning, nothing else.
* **SFA p=0.1 / 0.25 / 1.0, beta 0.5**: the same, through the tool's training hook,
  ``WeightAveraging(model, [SFA(beta=0.5, p=p, steps_per_task=T)])`` with ``start_task()``
  at each task's start, ``step()`` after every optimizer step and ``end_task()`` at its end.
* **L2**: plain plus (lambda/2) * ||theta - theta_prev||^2, theta_prev the model at the
  task's start.
* **replay 1%**: a buffer holding 1% of every earlier task's training bytes (random
  256-byte windows); 4 of each batch's 32 windows are drawn from it.
* **WiSE-FT**: ``mergekit-like merge --method wise_ft`` of plain's model after each task
  with the task-A model (alpha 0.5; 0.25 and 0.75 in the JSON, from the same read pass).
* **task arithmetic / TIES**: B and C are fine-tuned separately from the task-A model
  (B's run is plain's first stage); after B the merge holds B's task vector, after C both:
  ``merge --method task_arithmetic --base A ... -p lambda=0.5`` and
  ``merge --method ties --base A ... -p density=0.5``.

Reported: held-out test loss (nats/byte) on every task after each task, mean ± std over
seeds, and the loss on earlier tasks against the loss on the newest.

    python benchmarks/evidence/continual.py            # 3 seeds, ~20 min on 2 CPU cores
    python benchmarks/evidence/continual.py --quick    # smoke test, ~2 min

Writes benchmarks/results/continual.md, continual.png and continual.json (``continual_quick.*``
with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

TASKS = ("python", "licenses", "c_headers")  # A, B, C
LETTER = dict(zip(TASKS, "ABC"))
SFA_PS = (0.1, 0.25, 1.0)
SFA_BETA = 0.5
REPLAY_FRACTION = 0.01
REPLAY_WINDOW = 256
REPLAY_PER_BATCH = 4
WISE_ALPHAS = (0.25, 0.5, 0.75)
TA_LAMBDA = 0.5
TIES_DENSITY = 0.5


def scores(model: common.TinyGPT) -> dict[str, float]:
    return {LETTER[t]: common.evaluate(model, t, "test") for t in TASKS}


def loaded_scores(directory: Path) -> dict[str, float]:
    return scores(common.load_model(directory))


# -- the ways to fine-tune on the next task ------------------------------------------------


def l2_penalty(model: torch.nn.Module, weight: float) -> Callable[[], torch.Tensor]:
    """(weight / 2) * ||theta - theta_start||^2, theta_start the weights now."""
    start = [p.detach().clone() for p in model.parameters()]

    def penalty() -> torch.Tensor:
        return 0.5 * weight * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))

    return penalty


def replay_buffer(earlier: tuple[str, ...], seed: int) -> torch.Tensor:
    """REPLAY_FRACTION of each earlier task's training bytes, as random windows."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for task in earlier:
        data = common.load_split(task, "train")
        windows = max(1, int(REPLAY_FRACTION * len(data)) // REPLAY_WINDOW)
        starts = torch.randint(0, len(data) - REPLAY_WINDOW, (windows,), generator=gen)
        parts += [data[s : s + REPLAY_WINDOW] for s in starts.tolist()]
    return torch.cat(parts)


def sequence(method: str, start: Path, work: Path, seed: int, cfg: TrainConfig, l2: float) -> dict:
    """Fine-tunes the task-A model on B, then C, one way; saves and scores the model after each."""
    from mergekit_like.hook import SFA, WeightAveraging

    model = common.load_model(start)
    hook = None
    if method.startswith("sfa"):
        p = float(method.split("_p")[1])
        hook = WeightAveraging(model, [SFA(beta=SFA_BETA, p=p, steps_per_task=cfg.steps)])
    out: dict = {}
    for position, task in enumerate(TASKS[1:], 1):
        task_cfg = TrainConfig(**{**cfg.__dict__, "seed": 1000 * seed + position})  # same data order for all
        kwargs: dict = {}
        if hook is not None:
            hook.start_task()
            kwargs["after_step"] = lambda _step: hook.step()
        if method == "l2":
            kwargs["penalty"] = l2_penalty(model, l2)
        if method == "replay":
            kwargs["replay"] = replay_buffer(TASKS[:position], seed=7 + seed)
            kwargs["replay_per_batch"] = REPLAY_PER_BATCH
        common.train(model, task, task_cfg, **kwargs)
        if hook is not None:
            hook.end_task()
        directory = common.save_model(model, work / method / f"after_{LETTER[task]}")
        out[LETTER[task]] = {"dir": str(directory), **scores(model)}
    if hook is not None:
        hook.close()
    return out


def separate(start: Path, work: Path, seed: int, cfg: TrainConfig, plain: dict) -> dict[str, Path]:
    """Task-specific models from the task-A model: B is plain's first stage; C is trained here."""
    model = common.load_model(start)
    common.train(model, "c_headers", TrainConfig(**{**cfg.__dict__, "seed": 1000 * seed + 2}))
    return {"B": Path(plain["B"]["dir"]), "C": common.save_model(model, work / "separate" / "C")}


# -- the merges after the fact, through the CLI ----------------------------------------------


def post_hoc(start: Path, work: Path, plain: dict, tasks: dict[str, Path]) -> dict:
    out: dict = {"wise_ft": {}, "task_arithmetic": {}, "ties": {}}
    for after in ("B", "C"):
        wise = work / "wise_ft" / f"after_{after}"
        common.run_cli(["merge", "--method", "wise_ft", "--base", str(start), plain[after]["dir"],
                        "-p", "alpha=" + ",".join(map(str, WISE_ALPHAS)), "-o", str(wise), "-q"])
        out["wise_ft"][after] = {f"{a:g}": loaded_scores(wise / f"alpha_{a:g}") for a in WISE_ALPHAS}
        members = [str(tasks[t]) for t in ("B", "C")[: 1 if after == "B" else 2]]
        ta = work / "task_arithmetic" / f"after_{after}"
        common.run_cli(["merge", "--method", "task_arithmetic", "--base", str(start), *members,
                        "-p", "weight=" + ",".join("1" for _ in members), "-p", f"lambda={TA_LAMBDA}",
                        "-o", str(ta), "-q"])
        out["task_arithmetic"][after] = loaded_scores(ta)
        ties = work / "ties" / f"after_{after}"
        common.run_cli(["merge", "--method", "ties", "--base", str(start), *members,
                        "-p", "weight=" + ",".join("1" for _ in members), "-p", f"density={TIES_DENSITY}",
                        "-o", str(ties), "-q"])
        out["ties"][after] = loaded_scores(ties)
    return out


def one_seed(seed: int, work: Path, a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    print(f"[seed {seed}] task A ({TASKS[0]}) from scratch, {a.pretrain_steps} steps", flush=True)
    model = common.new_model(1000 + seed)
    common.train(model, TASKS[0], TrainConfig(steps=a.pretrain_steps, lr=a.lr, warmup=a.pretrain_steps // 10,
                                              seed=1000 * seed), log_every=max(1, a.pretrain_steps // 4))
    start = common.save_model(model, work / "after_A")
    result: dict = {"seed": seed, "after_A": scores(model), "methods": {}}
    print(f"[seed {seed}] after A: {result['after_A']}", flush=True)
    cfg = TrainConfig(steps=a.task_steps, lr=a.lr, warmup=max(1, a.task_steps // 10))
    methods = ["plain", *(f"sfa_p{p:g}" for p in SFA_PS), "l2", "replay"]
    for method in methods:
        t = time.perf_counter()
        result["methods"][method] = sequence(method, start, work, seed, cfg, a.l2)
        after = result["methods"][method]
        print(f"[seed {seed}] {method:<10} after B: A {after['B']['A']:.3f} B {after['B']['B']:.3f} | after C: "
              f"A {after['C']['A']:.3f} B {after['C']['B']:.3f} C {after['C']['C']:.3f} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    tasks = separate(start, work, seed, cfg, result["methods"]["plain"])
    result["separate_C"] = loaded_scores(tasks["C"])
    merges = post_hoc(start, work, result["methods"]["plain"], tasks)
    result["wise_ft_alphas"] = merges["wise_ft"]
    result["methods"]["wise_ft"] = {t: merges["wise_ft"][t]["0.5"] for t in ("B", "C")}
    result["methods"]["task_arithmetic"] = merges["task_arithmetic"]
    result["methods"]["ties"] = merges["ties"]
    for method in ("wise_ft", "task_arithmetic", "ties"):
        after = result["methods"][method]
        print(f"[seed {seed}] {method:<10} after B: A {after['B']['A']:.3f} B {after['B']['B']:.3f} | after C: "
              f"A {after['C']['A']:.3f} B {after['C']['B']:.3f} C {after['C']['C']:.3f}", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    return result


# -- reporting --------------------------------------------------------------------------------

LABELS = {
    "plain": "plain sequential fine-tuning",
    "sfa_p0.1": "SFA p=0.1, beta 0.5 (hook)",
    "sfa_p0.25": "SFA p=0.25, beta 0.5 (hook)",
    "sfa_p1": "SFA p=1 (one merge per task end)",
    "l2": "L2 toward the task's start",
    "replay": "replay buffer, 1% of earlier data",
    "wise_ft": "WiSE-FT(A, plain), alpha 0.5",
    "task_arithmetic": f"task arithmetic, lambda {TA_LAMBDA:g}",
    "ties": f"TIES, density {TIES_DENSITY:g}",
}


def values(results: list[dict], method: str, after: str, task: str) -> list[float]:
    if task == "mean":
        return [statistics.fmean(r["methods"][method][after][t] for t in "ABC"[: "ABC".index(after) + 1])
                for r in results]
    return [r["methods"][method][after][task] for r in results]


def fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def verdict(results: list[dict]) -> list[str]:
    """The paper's claims, each checked against the means (and per seed where it matters)."""
    def mean(method: str, after: str, task: str) -> float:
        return statistics.fmean(values(results, method, after, task))

    def per_seed(better: Callable[[dict], bool]) -> str:
        return f"{sum(better(r) for r in results)} of {len(results)} seeds"

    lines = []
    best_sfa = min((m for m in LABELS if m.startswith("sfa_p") and m != "sfa_p1"),
                   key=lambda m: mean(m, "C", "mean"))
    kept_a = mean("plain", "C", "A") - mean(best_sfa, "C", "A")
    cost_c = mean(best_sfa, "C", "C") - mean("plain", "C", "C")
    lines.append(f"- Earlier tasks kept: after C, {LABELS[best_sfa]} has A loss {mean(best_sfa, 'C', 'A'):.3f} "
                 f"vs plain {mean('plain', 'C', 'A'):.3f} ({kept_a:+.3f} nats/byte better) and B loss "
                 f"{mean(best_sfa, 'C', 'B'):.3f} vs {mean('plain', 'C', 'B'):.3f}; the cost on the new task C is "
                 f"{cost_c:+.3f} ({mean(best_sfa, 'C', 'C'):.3f} vs {mean('plain', 'C', 'C'):.3f}). Lower mean "
                 f"over A, B, C than plain in " + per_seed(
                     lambda r: statistics.fmean(r["methods"][best_sfa]["C"][t] for t in "ABC")
                     < statistics.fmean(r["methods"]["plain"]["C"][t] for t in "ABC")) + ".")
    lines.append(f"- Against replay (1%): mean after C {mean(best_sfa, 'C', 'mean'):.3f} (SFA) vs "
                 f"{mean('replay', 'C', 'mean'):.3f} (replay); A {mean(best_sfa, 'C', 'A'):.3f} vs "
                 f"{mean('replay', 'C', 'A'):.3f}.")
    post = {m: mean(m, "C", "mean") for m in ("wise_ft", "task_arithmetic", "ties")}
    best_post = min(post, key=post.get)  # type: ignore[arg-type]
    lines.append(f"- Against merging after the fact: mean after C {mean(best_sfa, 'C', 'mean'):.3f} (SFA) vs "
                 + ", ".join(f"{post[m]:.3f} ({LABELS[m]})" for m in post)
                 + f"; SFA better than the best of them ({LABELS[best_post]}) in " + per_seed(
                     lambda r: statistics.fmean(r["methods"][best_sfa]["C"][t] for t in "ABC")
                     < statistics.fmean(r["methods"][best_post]["C"][t] for t in "ABC")) + ".")
    lines.append("- Averaging during training vs once at the end: mean after C "
                 + ", ".join(f"p={m.split('_p')[1]} {mean(m, 'C', 'mean'):.3f}" for m in LABELS
                             if m.startswith("sfa_p"))
                 + "; A after C " + ", ".join(f"p={m.split('_p')[1]} {mean(m, 'C', 'A'):.3f}" for m in LABELS
                                               if m.startswith("sfa_p")) + ".")
    return lines


def report(results: list[dict], meta: dict) -> str:
    n = len(results)
    lines = [f"# Study 1: continual learning, A → B → C (toy scale, {n} seed{'s' if n > 1 else ''})", "",
             "Data on this machine (file-level split by path hash; see benchmarks/README.md):", "",
             common.describe_domains(TASKS), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters. Task A: {meta['pretrain_steps']} steps from "
             f"scratch; B and C: {meta['task_steps']} steps each; AdamW, peak lr {meta['lr']:g}, warm-up then "
             f"cosine, batch 32 x 64 bytes, the same data order per task for every method. L2 weight "
             f"{meta['l2']:g}. Loss: held-out **test** next-byte cross-entropy, nats/byte (lower is better); "
             f"mean ± sample std over seeds {[r['seed'] for r in results]}.", "",
             f"After A (every method starts here): A {fmt([r['after_A']['A'] for r in results])}, "
             f"B {fmt([r['after_A']['B'] for r in results])}, C {fmt([r['after_A']['C'] for r in results])}.", "",
             "| method | after B: A | after B: B | after C: A | after C: B | after C: C | after C: mean |",
             "|---|---|---|---|---|---|---|"]
    for method, label in LABELS.items():
        cells = [fmt(values(results, method, "B", t)) for t in ("A", "B")]
        cells += [fmt(values(results, method, "C", t)) for t in ("A", "B", "C", "mean")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"C fine-tuned alone from A (the task-C member of the merges): C "
              f"{fmt([r['separate_C']['C'] for r in results])}, A {fmt([r['separate_C']['A'] for r in results])}.",
              "", "WiSE-FT alphas (after C; A / B / C):", ""]
    for alpha in (f"{a:g}" for a in WISE_ALPHAS):
        cells = [fmt([r["wise_ft_alphas"]["C"][alpha][t] for r in results]) for t in "ABC"]
        lines.append(f"- alpha {alpha}: " + " / ".join(cells))
    lines += ["", "## The claims, as measured", "", *verdict(results), "",
              f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, trade) = plt.subplots(1, 2, figsize=(14, 5))
    methods = list(LABELS)
    width = 0.27
    for i, task in enumerate("ABC"):
        means = [statistics.fmean(values(results, m, "C", task)) for m in methods]
        errs = [statistics.stdev(values(results, m, "C", task)) if len(results) > 1 else 0 for m in methods]
        bars.bar([j + (i - 1) * width for j in range(len(methods))], means, width, yerr=errs, capsize=2,
                 label=f"task {task} ({TASKS[i]})")
    bars.set_xticks(range(len(methods)), [LABELS[m].split(",")[0].replace(" (hook)", "") for m in methods],
                    rotation=35, ha="right", fontsize=8)
    bars.set_ylabel("test loss after task C (nats/byte)")
    bars.set_ylim(bottom=min(statistics.fmean(values(results, m, "C", t)) for m in methods for t in "ABC") * 0.9)
    bars.legend(fontsize=8)
    bars.set_title("Every task's loss at the end of the sequence")
    for m in methods:
        x = statistics.fmean(values(results, m, "C", "C"))
        y = statistics.fmean(statistics.fmean(r["methods"][m]["C"][t] for t in "AB") for r in results)
        trade.scatter(x, y, s=60, marker="*" if m.startswith("sfa") else "o")
        trade.annotate(LABELS[m].split(",")[0], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    trade.set_xlabel("new task C, test loss after C")
    trade.set_ylabel("earlier tasks A and B, mean test loss after C")
    trade.set_title("Forgetting vs learning (lower-left is better)")
    trade.grid(alpha=0.3)
    fig.suptitle("Continual learning A → B → C, toy scale (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 1: continual learning (SFA)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps on task A")
    parser.add_argument("--task-steps", type=int, default=300, help="steps on each of B and C")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--l2", type=float, default=0.01, help="weight of the L2 penalty")
    a = parser.parse_args()
    if a.quick:
        a.seeds, a.pretrain_steps, a.task_steps = a.seeds[:1], 60, 30
    stem = "continual_quick" if a.quick else "continual"
    data = common.study_data(a, stem, "results", lambda work: [one_seed(s, work / f"seed{s}", a) for s in a.seeds],
                             pretrain_steps=a.pretrain_steps, task_steps=a.task_steps, lr=a.lr, l2=a.l2)
    common.publish(a.out, stem, data, report(data["results"], data["meta"]),
                   lambda path: plot(data["results"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
