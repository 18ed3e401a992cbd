"""Study 2, "Early weight averaging (LAWA)" (Kaddour, 2022; Sanyal et al., 2023), at toy scale on CPU.

The claim tested: averaging the latest k checkpoints (LAWA) improves on the
current checkpoint most *early* in training and at *high* learning rates.

The byte-level GPT of ``common.py`` is trained from scratch on domain A (stdlib
Python source) at a high and a low peak learning rate (same init and data
order per seed, so the two runs differ only in the learning rate). Along
training we compare, on the held-out *test* split of A:

* **raw**: the current checkpoint ``run/checkpoint-N/`` (saved every ``nu``
  steps, plain safetensors),
* **LAWA** (k=5, checkpoints ``nu`` apart): ``mergekit-like average run
  --method lawa --k 5 --nu NU --every-step -o OUT`` (the real CLI, in a
  subprocess; one output per checkpoint: the LAWA curve),
* **EMA** and **SWA**: from the training hook, ``WeightAveraging(model,
  [LAWA(k=5, nu=NU), EMA(decay), SWA(start=warmup)], snapshot_every=NU,
  save_every=EVAL_EVERY, keep_last=...)``, which writes
  ``hook/<label>/step_N/`` while training runs.

The hook snapshots exactly the weights of the saved checkpoints (every ``nu``
steps), so its LAWA must equal the CLI's at every evaluated step, and its final
EMA and SWA must equal ``mergekit-like average --method ema`` / ``--method swa``
over the same checkpoints; the script checks both (max |difference|) and
reports them.

    python benchmarks/evidence/lawa.py            # 2 lrs x 3 seeds, ~10 min on 2 CPU cores
    python benchmarks/evidence/lawa.py --quick    # smoke test, ~1 min

Writes benchmarks/results/lawa.md, lawa.png and lawa.json (``lawa_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

DOMAIN = "python"
METHODS = ("raw", "lawa", "ema", "swa")


def state_of(directory: Path) -> dict[str, torch.Tensor]:
    from mergekit_like.io import open_checkpoint

    with open_checkpoint(directory) as ckpt:
        return {n: ckpt.read(n).to(torch.float32) for n in ckpt.names()}


def max_diff(a: Path, b: Path) -> float:
    sa, sb = state_of(a), state_of(b)
    if sa.keys() != sb.keys():
        return float("inf")
    return max((sa[n] - sb[n]).abs().max().item() for n in sa)


def train_run(work: Path, lr: float, seed: int, steps: int, warmup: int, nu: int, k: int, decay: float,
              eval_every: int) -> dict:
    """Trains one run with the hook attached and a checkpoint every ``nu`` steps."""
    from mergekit_like.hook import EMA, LAWA, SWA, WeightAveraging

    run_dir, hook_dir = work / "run", work / "hook"
    cfg = TrainConfig(steps=steps, lr=lr, warmup=warmup, seed=seed)
    model = common.new_model(1000 + seed)  # same init and data order for every lr of a seed
    averages = [LAWA(k=k, nu=nu), EMA(decay=decay), SWA(start=warmup)]
    labels = {"lawa_hook": averages[0].label, "ema": averages[1].label, "swa": averages[2].label}
    avg = WeightAveraging(model, averages, snapshot_every=nu, out_dir=hook_dir, save_every=eval_every,
                          keep_last=100_000, strict=True)

    def after_step(step: int) -> None:
        avg.step()
        if step % nu == 0:
            common.save_model(model, run_dir / f"checkpoint-{step}")

    t0 = time.perf_counter()
    print(f"    [lr {lr:g} seed {seed}] training {steps} steps", flush=True)
    losses = common.train(model, DOMAIN, cfg, log_every=max(1, steps // 4), after_step=after_step)
    counts = avg.close()
    return {"labels": labels, "train_loss": losses, "train_s": time.perf_counter() - t0,
            "snapshots": {"taken": counts.taken, "skipped": counts.skipped, "restarts": counts.sidecar_restarts}}


def one_run(work: Path, lr: float, seed: int, a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    trained = train_run(work, lr, seed, a.steps, a.warmup, a.nu, a.k, a.decay, a.eval_every)
    labels = trained["labels"]
    run_dir, hook_dir, lawa_dir = work / "run", work / "hook", work / "lawa_cli"

    # The LAWA curve through the CLI: one output per checkpoint.
    t_cli = common.run_cli(["average", str(run_dir), "--method", "lawa", "--k", str(a.k), "--nu", str(a.nu),
                     "--every-step", "-o", str(lawa_dir), "-q"])
    # Final EMA / SWA through the CLI, to check against the hook's.
    t_cli += common.run_cli(["average", str(run_dir), "--method", "ema", "--decay", f"{a.decay:g}",
                      "-o", str(work / "ema_cli"), "-q"])
    t_cli += common.run_cli(["average", str(run_dir), "--method", "swa", "--start", str(a.warmup),
                      "-o", str(work / "swa_cli"), "-q"])

    eval_steps = list(range(a.eval_every, a.steps + 1, a.eval_every))
    dirs = {"raw": lambda s: run_dir / f"checkpoint-{s}",
            "lawa": lambda s: lawa_dir / f"step_{s}",
            "ema": lambda s: hook_dir / labels["ema"] / f"step_{s}",
            "swa": lambda s: hook_dir / labels["swa"] / f"step_{s}"}
    t_eval = time.perf_counter()
    curves: dict[str, list[float | None]] = {m: [] for m in METHODS}
    for s in eval_steps:
        for m in METHODS:
            d = dirs[m](s)
            curves[m].append(common.evaluate(common.load_model(d), DOMAIN, "test") if d.exists() else None)
    t_eval = time.perf_counter() - t_eval

    hook_vs_cli = {
        "lawa_max_abs_diff_over_eval_steps": max(
            max_diff(hook_dir / labels["lawa_hook"] / f"step_{s}", lawa_dir / f"step_{s}") for s in eval_steps),
        "ema_final_max_abs_diff": max_diff(hook_dir / labels["ema"] / f"step_{a.steps}", work / "ema_cli"),
        "swa_final_max_abs_diff": max_diff(hook_dir / labels["swa"] / f"step_{a.steps}", work / "swa_cli"),
    }
    out = {"lr": lr, "seed": seed, "eval_steps": eval_steps, "curves": curves, "labels": labels,
           "hook_vs_cli": hook_vs_cli, "snapshots": trained["snapshots"],
           "train_loss_last": statistics.fmean(trained["train_loss"][-a.nu:]),
           "wall_s": {"train_with_hook": trained["train_s"], "cli": t_cli, "eval": t_eval,
                      "total": time.perf_counter() - t0}}
    last = {m: curves[m][-1] for m in METHODS}
    print(f"[lr {lr:g} seed {seed}] final test loss raw {last['raw']:.4f} lawa {last['lawa']:.4f} "
          f"ema {last['ema']:.4f} swa {last['swa']:.4f}; hook vs CLI max |diff| "
          f"lawa {hook_vs_cli['lawa_max_abs_diff_over_eval_steps']:.1e} "
          f"ema {hook_vs_cli['ema_final_max_abs_diff']:.1e} "
          f"swa {hook_vs_cli['swa_final_max_abs_diff']:.1e}; {out['wall_s']['total']:.0f}s", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are not kept (a few hundred MB per run)
    return out


# --------------------------------------------------------------------------- analysis
def phases(steps: int) -> dict[str, tuple[int, int]]:
    third = steps / 3
    return {"early": (0, third), "mid": (third, 2 * third), "late": (2 * third, steps)}


def gain(run: dict, method: str, lo: float, hi: float) -> float:
    """Mean of raw − method over the evaluated steps in (lo, hi]: positive = the average is better."""
    vals = [r - m for s, r, m in zip(run["eval_steps"], run["curves"]["raw"], run["curves"][method])
            if lo < s <= hi and m is not None]
    return statistics.fmean(vals) if vals else float("nan")


def fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:+.{digits}f}"
    return f"{statistics.fmean(values):+.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def fmt_loss(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def by_lr(runs: list[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in runs:
        out.setdefault(r["lr"], []).append(r)
    return dict(sorted(out.items(), reverse=True))


def verdict(runs: list[dict], meta: dict) -> list[str]:
    ph = phases(meta["steps"])
    groups = by_lr(runs)
    lines = []
    for lr, rs in groups.items():
        early = [gain(r, "lawa", *ph["early"]) for r in rs]
        late = [gain(r, "lawa", *ph["late"]) for r in rs]
        n_early_gt = sum(e > z for e, z in zip(early, late))
        steps = rs[0]["eval_steps"]
        mean = [statistics.fmean(r["curves"]["raw"][i] - r["curves"]["lawa"][i] for r in rs) for i in range(len(steps))]
        best = max(range(len(steps)), key=lambda i: mean[i])
        lines.append(f"- lr {lr:g}: LAWA gain early {fmt(early)} vs late {fmt(late)} nats/byte; "
                     f"early > late in {n_early_gt} of {len(rs)} seeds; the mean gain peaks at step "
                     f"{steps[best]} ({mean[best]:+.4f}) and is negative at {sum(g < 0 for g in mean)} of "
                     f"{len(steps)} evaluated steps.")
    if len(groups) >= 2:
        items = list(groups.items())
        (hi, rh), (lo, rl) = items[0], items[-1]
        for phase in ("early", "mid", "late"):
            pairs = [(gain(a, "lawa", *ph[phase]), gain(b, "lawa", *ph[phase]))
                     for a in rh for b in rl if a["seed"] == b["seed"]]
            n = sum(x > y for x, y in pairs)
            lines.append(f"- {phase}: LAWA gain at lr {hi:g} minus at lr {lo:g}: "
                         f"{fmt([x - y for x, y in pairs])}; larger at the high lr in {n} of {len(pairs)} seeds.")
    return lines


def report(runs: list[dict], meta: dict) -> str:
    ph = phases(meta["steps"])
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Study 2: early weight averaging, LAWA (toy scale, {len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
             "",
             "Data on this machine (file-level split by path hash; see benchmarks/README.md):", "",
             common.describe_domains((DOMAIN,)), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters (d={meta['cfg']['d_model']}, "
             f"{meta['cfg']['n_layer']} layers, context {meta['cfg']['n_ctx']}), trained from scratch on "
             f"A=python for {meta['steps']} steps (batch 32, AdamW, {meta['warmup']} warm-up steps, cosine "
             f"decay to 10 % of the peak lr) at peak lr {', '.join(f'{lr:g}' for lr in meta['lrs'])}; "
             "same init and data order for both lrs of a seed. "
             f"A checkpoint every nu={meta['nu']} steps. "
             f"LAWA: k={meta['k']}, nu={meta['nu']} (the mean of the last {meta['k']} checkpoints, a window of "
             f"{meta['k'] * meta['nu'] - meta['nu']} steps), from `mergekit-like average --method lawa "
             "--every-step`. "
             f"EMA: decay {meta['decay']:g} per step, folded every {meta['nu']} steps (mean lag about "
             f"{meta['ema_lag']:.0f} steps, LAWA's is {meta['lawa_lag']:.0f}); SWA: uniform mean of every snapshot "
             f"since step {meta['warmup']} (end of warm-up); both from the training hook.", "",
             f"Loss = next-byte cross-entropy on A's **test** split (nats/byte; nothing is tuned on it), "
             f"evaluated every {meta['eval_every']} steps. Gain = raw − average (positive: the average is "
             f"better), averaged over the evaluated steps of each phase: early = steps 1-{ph['early'][1]:.0f}, "
             f"mid = to {ph['mid'][1]:.0f}, late = to {meta['steps']}. Values: mean ± sample std over seeds "
             f"{seeds}.", "",
             "| peak lr | method | gain early | gain mid | gain late | final test loss |",
             "|---|---|---|---|---|---|"]
    for lr, rs in by_lr(runs).items():
        lines.append(f"| {lr:g} | raw (current checkpoint) | | | | "
                     f"{fmt_loss([r['curves']['raw'][-1] for r in rs])} |")
        for m, name in (("lawa", f"LAWA k={meta['k']}"), ("ema", "EMA"), ("swa", "SWA")):
            cells = [fmt([gain(r, m, *ph[p]) for r in rs]) for p in ("early", "mid", "late")]
            lines.append(f"| {lr:g} | {name} | " + " | ".join(cells)
                         + f" | {fmt_loss([r['curves'][m][-1] for r in rs])} |")
    lines += ["", "Reading against the claim (LAWA gain):", "", *verdict(runs, meta), "",
              "LAWA gain (raw − LAWA) at each evaluated step, mean over seeds:", "",
              "| step | " + " | ".join(f"lr {lr:g}: raw | lr {lr:g}: gain" for lr in by_lr(runs)) + " |",
              "|---" * (1 + 2 * len(by_lr(runs))) + "|"]
    steps = runs[0]["eval_steps"]
    for i, s in enumerate(steps):
        cells = []
        for rs in by_lr(runs).values():
            cells.append(f"{statistics.fmean(r['curves']['raw'][i] for r in rs):.4f}")
            cells.append(f"{statistics.fmean(r['curves']['raw'][i] - r['curves']['lawa'][i] for r in rs):+.4f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Per run (hook vs CLI: max |difference| of any weight; snapshots taken / skipped):", "",
              "| lr | seed | final raw | final LAWA | hook LAWA vs CLI (all eval steps) | hook EMA vs CLI | "
              "hook SWA vs CLI | snapshots | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h = r["hook_vs_cli"]
        lines.append(f"| {r['lr']:g} | {r['seed']} | {r['curves']['raw'][-1]:.4f} | {r['curves']['lawa'][-1]:.4f} | "
                     f"{h['lawa_max_abs_diff_over_eval_steps']:.1e} | {h['ema_final_max_abs_diff']:.1e} | "
                     f"{h['swa_final_max_abs_diff']:.1e} | {r['snapshots']['taken']} / {r['snapshots']['skipped']} | "
                     f"{r['wall_s']['total']:.0f} |")
    lines += ["", f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def plot(runs: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_lr(runs)
    colors = {"raw": "black", "lawa": "tab:red", "ema": "tab:blue", "swa": "tab:green"}
    names = {"raw": "raw checkpoint", "lawa": f"LAWA k={meta['k']} nu={meta['nu']} (CLI)",
             "ema": f"EMA {meta['decay']:g} (hook)", "swa": f"SWA from {meta['warmup']} (hook)"}
    fig, axes = plt.subplots(2, len(groups), figsize=(5.2 * len(groups), 7.4), squeeze=False, sharex=True)
    for col, (lr, rs) in enumerate(groups.items()):
        steps = rs[0]["eval_steps"]
        top, bottom = axes[0][col], axes[1][col]
        for m in METHODS:
            mean = [statistics.fmean(r["curves"][m][i] for r in rs) for i in range(len(steps))]
            top.plot(steps, mean, color=colors[m], label=names[m], lw=1.6 if m in ("raw", "lawa") else 1.1)
            if m != "raw":
                g = [[r["curves"]["raw"][i] - r["curves"][m][i] for r in rs] for i in range(len(steps))]
                gm = [statistics.fmean(x) for x in g]
                bottom.plot(steps, gm, color=colors[m], label=f"raw − {m.upper()}")
                if len(rs) > 1:
                    sd = [statistics.stdev(x) for x in g]
                    bottom.fill_between(steps, [a - b for a, b in zip(gm, sd)], [a + b for a, b in zip(gm, sd)],
                                        color=colors[m], alpha=0.15, lw=0)
        lo = min(r["curves"][m][-1] for r in rs for m in METHODS)
        top.set_ylim(lo - 0.05, min(3.2, max(statistics.fmean(r["curves"]["raw"][0] for r in rs), lo + 0.5)))
        top.set_title(f"peak lr {lr:g} (mean of {len(rs)} seed{'s' if len(rs) > 1 else ''})", fontsize=10)
        top.set_ylabel("A=python test loss (nats/byte)")
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        bottom.axhline(0, color="black", lw=0.8)
        third = meta["steps"] / 3
        for x in (third, 2 * third):
            bottom.axvline(x, color="gray", lw=0.6, ls=":")
        gains = [r["curves"]["raw"][i] - r["curves"][m][i] for r in rs for i in range(len(steps))
                 for m in ("lawa", "ema", "swa")]
        span = max(0.02, max(abs(g) for g in gains) * 1.3)
        bottom.set_yscale("symlog", linthresh=0.01)  # linear within ±0.01, logarithmic beyond
        bottom.set_ylim(-span, span)
        bottom.set_xlabel("training step")
        bottom.set_ylabel("gain = raw − average (higher: average better)")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    fig.suptitle("LAWA vs EMA vs SWA along training, toy scale "
                 "(shaded: ± 1 sd over seeds; gain axis symlog, linear within ±0.01)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 2: early weight averaging (LAWA)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-3], help="peak learning rates")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--nu", type=int, default=20, help="steps between checkpoints (and LAWA's nu)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.98, help="EMA decay per step")
    parser.add_argument("--eval-every", type=int, default=40, help="a multiple of --nu")
    a = parser.parse_args()
    stem = "lawa_quick" if a.quick else "lawa"
    if a.quick:
        a.seeds, a.steps, a.warmup, a.nu, a.eval_every = a.seeds[:1], 90, 10, 10, 30
    if a.eval_every % a.nu:
        parser.error("--eval-every must be a multiple of --nu")

    def run(work: Path) -> list:
        print(common.describe_domains((DOMAIN,)), flush=True)
        return [one_run(work / f"lr{lr:g}_seed{seed}", lr, seed, a) for seed in a.seeds for lr in a.lrs]

    per = a.decay ** a.nu
    data = common.study_data(a, stem, "runs", run, steps=a.steps, warmup=a.warmup, nu=a.nu, k=a.k,
                             decay=a.decay, eval_every=a.eval_every, lrs=a.lrs, seeds=a.seeds,
                             ema_lag=a.nu * per / (1 - per), lawa_lag=a.nu * (a.k - 1) / 2)
    common.publish(a.out, stem, data, report(data["runs"], data["meta"]),
                   lambda path: plot(data["runs"], data["meta"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
