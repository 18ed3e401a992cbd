"""Study 6, post-hoc EMA (EDM2; Karras et al., 2024), at toy scale on CPU.

The claim tested: from two power-function EMA profiles stored on a cadence during training
(relative widths 0.05 and 0.10, in float16), the EMA of any other relative width
``sigma_rel`` can be rebuilt after training, close enough to the one tracked directly
that the EMA length can be chosen afterwards.

The byte-level GPT of ``common.py`` is trained once per seed from scratch on domain A
(stdlib Python source), warm-up then cosine decay, with the training hook holding

* ``PostHocEMA((0.05, 0.10), snapshot_every=STORE_EVERY)``: both profiles stored every
  ``STORE_EVERY`` steps and at the end, in float16 (the default), under
  ``hook/posthoc_ema_0.05_0.1/snapshots/``, and
* ``PowerEMA(s)`` for each of the 8 widths ``s`` of ``WIDTHS``: the ground truth, tracked in
  float32 in the same sidecar from the same snapshots (every step, ``strict=True``).

After training, ``mergekit-like average hook/posthoc_ema_0.05_0.1 --method phema
--sigma-rel <the 8 widths> --json -o OUT`` (the real CLI, in a subprocess) rebuilds every
width; its outputs are written in the snapshots' dtype (float16), as a user gets them. A
second call with ``--out-dtype float32`` separates the rounding of the output from that of
the stored snapshots, and a third, on a copy holding only the snapshots of every
``SPARSE_EVERY``-th step, shows where sparser storage drifts. Each rebuilt model, each
directly tracked one and the raw final model are scored on A's **validation** split, and per
width the script reports the loss of both, their difference, the CLI's relative profile
error, and the relative weight distance ||rebuilt - direct|| / ||direct - raw|| (all
floating tensors as one vector); each rebuild is also scored with its weights divided by
their sum (EDM2's Algorithm 3 does not make them sum to 1).

    python benchmarks/evidence/posthoc.py            # 3 seeds, about 11 min on 2 CPU cores
    python benchmarks/evidence/posthoc.py --quick    # smoke test, about 1.5 min

Writes benchmarks/results/posthoc.md, posthoc.png and posthoc.json (``posthoc_quick.*`` with
--quick). Models are written in a temporary directory (kept in ``--workdir`` when given).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

DOMAIN = "python"
STORED = (0.05, 0.10)  # EDM2's two stored profiles
WIDTHS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.14, 0.19, 0.25)  # the ground truth, tracked directly


def state_of(directory: Path) -> dict[str, torch.Tensor]:
    from mergekit_like.io import open_checkpoint

    with open_checkpoint(directory) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| over all floating tensors taken as one vector, in float64."""
    if a.keys() != b.keys():
        raise ValueError(f"the two models hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    total = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in a if a[n].is_floating_point())
    return math.sqrt(total)


def width_label(prefix: str, s: float) -> str:
    return f"{prefix}{s:g}"  # as the tool names them: power_ema_sr0.1, phema_sr0.1


def train_run(work: Path, seed: int, a: argparse.Namespace) -> dict:
    """Trains one model with the post-hoc EMA and the directly tracked widths in the hook."""
    from mergekit_like.hook import PostHocEMA, PowerEMA, WeightAveraging

    cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup=a.warmup, seed=seed)
    model = common.new_model(1000 + seed)
    posthoc = PostHocEMA(STORED, snapshot_every=a.store_every)  # float16 snapshots, the default
    averages = [posthoc, *(PowerEMA(s) for s in a.widths)]
    # strict: the sidecar folds every step's weights, so the direct widths are exact, not thinned
    avg = WeightAveraging(model, averages, snapshot_every=1, out_dir=work / "hook", strict=True)
    if not avg.wait_until_ready(120):
        sys.exit("the averaging sidecar did not start within 120 s")
    t0 = time.perf_counter()
    print(f"    [seed {seed}] training {a.steps} steps with the hook ({len(averages)} averages)", flush=True)
    losses = common.train(model, DOMAIN, cfg, log_every=max(1, a.steps // 5), after_step=lambda _: avg.step())
    counts = avg.close()
    train_s = time.perf_counter() - t0
    common.save_model(model, work / "raw")
    return {"posthoc_label": posthoc.label, "dtype": str(posthoc.dtype).removeprefix("torch."),
            "train_loss_last": statistics.fmean(losses[-50:]), "train_s": train_s,
            "snapshots": {"taken": counts.taken, "skipped": counts.skipped, "restarts": counts.sidecar_restarts}}


def phema_cli(source: Path, widths: tuple[float, ...], out: Path, *extra: str) -> tuple[dict, list[str], float]:
    """``average SOURCE --method phema --sigma-rel ... --json``: its summary, its warnings, its wall time."""
    args = ["average", str(source), "--method", "phema", "--sigma-rel", ",".join(f"{s:g}" for s in widths),
            "-o", str(out), "--json", *extra]
    t = time.perf_counter()
    done = subprocess.run([common.cli(), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mergekit-like average ... --method phema failed (exit {done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    warnings = [" ".join(line.split()) for line in done.stderr.split("warning: ")[1:]]
    return json.loads(done.stdout), warnings, time.perf_counter() - t


def thinned(source: Path, target: Path, every: int, last: int) -> int:
    """Copies the stored snapshots of steps that are multiples of ``every`` (and the last) under ``target``."""
    kept = 0
    for directory in sorted(source.glob("snapshots/*/step_*")):
        step = int(directory.name.removeprefix("step_"))
        if step % every == 0 or step == last:
            shutil.copytree(directory, target / directory.relative_to(source))
            kept += 1
    return kept


def score(rec_dir: Path, found: dict, direct: dict[str, torch.Tensor], spread: float) -> dict:
    """Val loss and weight distance of a rebuild, as written and with its weights rescaled to sum 1."""
    rec = state_of(rec_dir)
    # EDM2's Algorithm 3 as printed does not make the weights sum to 1: the same combination divided by
    # their sum shows how much of a drift is that missing (or extra) mass.
    total = sum(found["weights"])
    rescaled = {n: t.float() / total if t.is_floating_point() else t for n, t in rec.items()}
    model = common.load_model(rec_dir)
    model.load_state_dict(rescaled)
    return {"loss": common.evaluate(common.load_model(rec_dir), DOMAIN, "val"),
            "loss_rescaled": common.evaluate(model, DOMAIN, "val"),
            "dist": distance(rec, direct) / spread, "dist_rescaled": distance(rescaled, direct) / spread,
            "profile_error": found["error"], "weights_sum": total,
            "weights_abs_sum": sum(abs(w) for w in found["weights"])}


def one_run(work: Path, seed: int, a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    trained = train_run(work, seed, a)
    source = work / "hook" / trained["posthoc_label"]
    stored = sorted(source.glob("snapshots/*/step_*"))
    sparse = work / "sparse" / trained["posthoc_label"]
    sparse_count = thinned(source, sparse, a.sparse_every, a.steps)

    summary, warnings, t_cli = phema_cli(source, a.widths, work / "phema")
    summary32, _, t_cli32 = phema_cli(source, a.widths, work / "phema_f32", "--out-dtype", "float32")
    summary_sp, warnings_sp, _ = phema_cli(sparse, a.widths, work / "phema_sparse", "--out-dtype", "float32")
    outputs = {k: {Path(p).name: Path(p) for p in x["outputs"]} for k, x in
               (("rec", summary), ("rec_f32", summary32), ("sparse", summary_sp))}

    t_eval = time.perf_counter()
    raw = state_of(work / "raw")
    raw_loss = common.evaluate(common.load_model(work / "raw"), DOMAIN, "val")
    rows = []
    for s in a.widths:
        direct_dir = work / "hook" / width_label("power_ema_sr", s) / f"step_{a.steps}"
        label = width_label("phema_sr", s)
        direct = state_of(direct_dir)
        spread = distance(direct, raw)  # how far the average itself is from the raw weights
        fp16 = {n: t.half() if t.is_floating_point() else t for n, t in direct.items()}
        row: dict = {"sigma_rel": s, "loss_direct": common.evaluate(common.load_model(direct_dir), DOMAIN, "val"),
                     "direct_minus_raw_norm": spread, "dist_fp16_floor": distance(fp16, direct) / spread,
                     "reconstructed_at_step": summary["reconstruction"][label]["step"]}
        for key, found in (("rec", summary), ("rec_f32", summary32), ("sparse", summary_sp)):
            scores = score(outputs[key][label], found["reconstruction"][label], direct, spread)
            row[key] = {**scores, "diff": scores["loss"] - row["loss_direct"],
                        "diff_rescaled": scores["loss_rescaled"] - row["loss_direct"]}
        rows.append(row)
        rec = row["rec"]
        print(f"    sigma_rel {s:g}: val direct {row['loss_direct']:.4f} rebuilt {rec['loss']:.4f} "
              f"({rec['diff']:+.4f}); profile error {rec['profile_error']:.2%}; weight distance "
              f"{rec['dist']:.3f} (float16 floor {row['dist_fp16_floor']:.3f}); sparse storage "
              f"{row['sparse']['diff']:+.4f}, profile error {row['sparse']['profile_error']:.2%}", flush=True)
    t_eval = time.perf_counter() - t_eval
    out = {"seed": seed, "raw_loss": raw_loss, "rows": rows, "cli_warnings": warnings,
           "cli_warnings_sparse": warnings_sp, "stored_snapshots": len(stored),
           "stored_steps": len({p.name for p in stored}), "sparse_snapshots": sparse_count,
           "snapshot_dtype": trained["dtype"], "snapshots": trained["snapshots"],
           "train_loss_last": trained["train_loss_last"],
           "wall_s": {"train_with_hook": trained["train_s"], "cli": t_cli, "cli_float32": t_cli32, "eval": t_eval,
                      "total": time.perf_counter() - t0}}
    print(f"[seed {seed}] raw val {raw_loss:.4f}; {len(stored)} stored snapshots; {out['wall_s']['total']:.0f}s",
          flush=True)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- analysis
def value(row: dict, key: str) -> float:
    """``row[key]``, or ``row[a][b]`` for a key ``a.b`` (the figures of one rebuild)."""
    for part in key.split("."):
        row = row[part]
    return row  # type: ignore[return-value]


def mean_rows(runs: list[dict], key: str) -> list[float]:
    return [statistics.fmean(value(r["rows"][i], key) for r in runs) for i in range(len(runs[0]["rows"]))]


def cell(runs: list[dict], i: int, key: str, spec: str) -> str:
    values = [value(r["rows"][i], key) for r in runs]
    text = format(statistics.fmean(values), spec)
    return text + (f" ± {statistics.stdev(values):{spec.lstrip('+')}}" if len(values) > 1 else "")


def width_name(s: float) -> str:
    return f"**{s:g}** (stored)" if s in STORED else f"{s:g}"


def inside(s: float) -> bool:
    return min(STORED) - 1e-12 <= s <= max(STORED) + 1e-12


def best(run: dict, key: str) -> float:
    return min(run["rows"], key=lambda row: value(row, key))["sigma_rel"]


def drift_lines(runs: list[dict], widths: list[float], prefix: str, what: str) -> list[str]:
    diff, err = mean_rows(runs, f"{prefix}.diff"), mean_rows(runs, f"{prefix}.profile_error")
    lines = []
    for name, chosen in (("inside [0.05, 0.10]", [i for i, s in enumerate(widths) if inside(s)]),
                         ("outside it", [i for i, s in enumerate(widths) if not inside(s)])):
        if chosen:
            worst = max(chosen, key=lambda i: abs(diff[i]))
            lines.append(f"- {what}, {name}: |rebuilt − tracked| val loss at most {abs(diff[worst]):.4f} "
                         f"nats/byte (at {widths[worst]:g}, {diff[worst]:+.4f}); profile error "
                         f"{min(err[i] for i in chosen):.2%} to {max(err[i] for i in chosen):.2%}.")
    return lines


def verdict(runs: list[dict], meta: dict) -> list[str]:
    widths = [row["sigma_rel"] for row in runs[0]["rows"]]
    direct, rec = mean_rows(runs, "loss_direct"), mean_rows(runs, "rec.loss")
    raw = statistics.fmean(r["raw_loss"] for r in runs)
    best_d = min(range(len(widths)), key=lambda i: direct[i])
    stored_best = min(direct[i] for i, s in enumerate(widths) if s in STORED)
    per_seed = "; ".join(f"seed {r['seed']}: {best(r, 'loss_direct'):g} tracked, {best(r, 'rec.loss'):g} rebuilt"
                         for r in runs)
    lines = [f"- Best width (lowest mean val loss): {widths[best_d]:g} tracked ({direct[best_d]:.4f}), "
             f"{widths[min(range(len(widths)), key=lambda i: rec[i])]:g} rebuilt. Per seed: {per_seed}. "
             + ("It is a stored width, so here choosing the length after training gains nothing over the stored "
                "profiles." if widths[best_d] in STORED else
                f"It is not a stored width: choosing it after training gains {stored_best - direct[best_d]:.4f} "
                "nats/byte over the better stored profile (tracked values)."),
             f"- Against the raw final model (val {raw:.4f}): the best width is {raw - direct[best_d]:+.4f} "
             f"nats/byte better; the narrowest ({widths[0]:g}) {raw - direct[0]:+.4f}, the widest "
             f"({widths[-1]:g}) {raw - direct[-1]:+.4f}."]
    lines += drift_lines(runs, widths, "rec", "Every stored snapshot")
    order_d = sorted(range(len(widths)), key=lambda i: direct[i])
    order_r = sorted(range(len(widths)), key=lambda i: rec[i])
    same = "the same way as" if order_d == order_r else "differently from"
    lines.append(f"- The rebuilt curve ranks the widths {same}"
                 + " the tracked one (by mean val loss: tracked " + ", ".join(f"{widths[i]:g}" for i in order_d)
                 + "; rebuilt " + ", ".join(f"{widths[i]:g}" for i in order_r) + ").")
    stored = [i for i, s in enumerate(widths) if s in STORED]
    dist, floor = mean_rows(runs, "rec.dist"), mean_rows(runs, "dist_fp16_floor")
    output_effect = max(abs(x - y) for x, y in zip(mean_rows(runs, "rec_f32.diff"), mean_rows(runs, "rec.diff")))
    if stored:
        lines.append("- float16: at the stored widths the rebuild is the stored final snapshot, weight distance "
                     + ", ".join(f"{dist[i]:.3f} (float16 floor {floor[i]:.3f})" for i in stored)
                     + f"; writing the rebuilds in float32 instead changes their val loss by at most "
                     f"{output_effect:.4f}. The largest weight distance, {max(dist):.3f} at "
                     f"{widths[dist.index(max(dist))]:g}, goes with the largest sum of |w_i| "
                     f"({max(mean_rows(runs, 'rec.weights_abs_sum')):.1f}): large weights of opposite signs "
                     "multiply the snapshots' float16 rounding.")
    lines += drift_lines(runs, widths, "sparse", f"Snapshots every {meta['sparse_every']} steps only")
    sparse, rescaled = mean_rows(runs, "sparse.diff"), mean_rows(runs, "sparse.diff_rescaled")
    total = mean_rows(runs, "sparse.weights_sum")
    lines.append("- With the sparse snapshots the weights sum to " + ", ".join(
        f"{t:.4f}" for t in total) + " (widths in table order); divided by that sum the drift "
        + ", ".join(f"{x:+.4f} becomes {y:+.4f} at {s:g}" for s, x, y in zip(widths, sparse, rescaled)
                    if not inside(s)) + ".")
    return lines


def report(runs: list[dict], meta: dict) -> str:
    seeds = [r["seed"] for r in runs]
    r0 = runs[0]
    lines = [f"# Study 6: post-hoc EMA (EDM2), toy scale, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
             f"({', '.join(map(str, seeds))})", "",
             "Data on this machine (file-level split by path hash; see benchmarks/README.md):", "",
             common.describe_domains((DOMAIN,)), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters (d={meta['cfg']['d_model']}, "
             f"{meta['cfg']['n_layer']} layers, context {meta['cfg']['n_ctx']}), trained once per seed from "
             f"scratch on A=python for {meta['steps']} steps (batch 32, AdamW, peak lr {meta['lr']:g}, "
             f"{meta['warmup']} warm-up steps, cosine decay to 10 % of the peak). The training hook holds "
             f"`PostHocEMA((0.05, 0.10), snapshot_every={meta['store_every']})`, whose two profiles are stored "
             f"in **{r0['snapshot_dtype']}** (the default) every {meta['store_every']} steps and at the end "
             f"({r0['stored_steps']} steps x 2 profiles = {r0['stored_snapshots']} snapshots), and "
             f"`PowerEMA(s)` for the {len(meta['widths'])} widths below, tracked directly in float32 "
             "(the ground truth); the sidecar folds every step's weights (`snapshot_every=1`, `strict=True`; "
             f"snapshots taken / skipped: {r0['snapshots']['taken']} / {r0['snapshots']['skipped']}).", "",
             "Rebuilt = `mergekit-like average hook/posthoc_ema_0.05_0.1 --method phema --sigma-rel "
             + ",".join(f"{s:g}" for s in meta["widths"]) + " --json -o OUT`, at the final step, written in "
             "the snapshots' dtype (float16) as the CLI does by default. Loss = next-byte cross-entropy on "
             "A's **validation** split (nats/byte). Profile error = the CLI's ||p_wanted - sum_i w_i p_i|| / "
             "||p_wanted||. Weight distance = ||rebuilt - tracked|| / ||tracked - raw|| over all tensors as one "
             "vector (how far the rebuilt model is from the tracked one, relative to how far averaging moves "
             "the weights at all). "
             + (f"Values: mean ± sample std over seeds {seeds}." if len(seeds) > 1 else "One seed."), "",
             f"Raw final model: val {statistics.fmean(r['raw_loss'] for r in runs):.4f}"
             + (f" ± {statistics.stdev(r['raw_loss'] for r in runs):.4f}" if len(runs) > 1 else "") + ".", "",
             "| sigma_rel | val tracked | val rebuilt | rebuilt − tracked | profile error | weight distance |",
             "|---|---|---|---|---|---|"]
    for i, row in enumerate(r0["rows"]):
        lines.append(f"| {width_name(row['sigma_rel'])} | {cell(runs, i, 'loss_direct', '.4f')} | "
                     f"{cell(runs, i, 'rec.loss', '.4f')} | {cell(runs, i, 'rec.diff', '+.4f')} | "
                     f"{cell(runs, i, 'rec.profile_error', '.2%')} | {cell(runs, i, 'rec.dist', '.3f')} |")
    lines += ["", "Where a difference comes from: the least-squares weights w_i of the stored snapshots (their "
              "sum, and the sum of their sizes, which multiplies the float16 rounding of the snapshots); the same "
              "rebuild written with `--out-dtype float32`; the float16 floor (the tracked model merely rounded to "
              "float16, same distance); and the rebuild divided by sum w_i (EDM2's Algorithm 3 as printed, which "
              "the tool follows, does not make the weights sum to 1; EDM2's released code divides by the sum):", "",
              "| sigma_rel | sum w_i | sum abs w_i | float32 output − tracked | weight distance, float32 output | "
              "float16 floor | rescaled to sum 1 − tracked | weight distance, rescaled |",
              "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(r0["rows"]):
        lines.append(f"| {width_name(row['sigma_rel'])} | {cell(runs, i, 'rec.weights_sum', '.4f')} | "
                     f"{cell(runs, i, 'rec.weights_abs_sum', '.1f')} | {cell(runs, i, 'rec_f32.diff', '+.4f')} | "
                     f"{cell(runs, i, 'rec_f32.dist', '.3f')} | {cell(runs, i, 'dist_fp16_floor', '.3f')} | "
                     f"{cell(runs, i, 'rec_f32.diff_rescaled', '+.4f')} | "
                     f"{cell(runs, i, 'rec_f32.dist_rescaled', '.3f')} |")
    lines += ["", f"Sparser storage, the same runs: only the snapshots of every {meta['sparse_every']}th step and "
              f"the last ({r0['sparse_snapshots']} snapshots), copied to a directory of their own and rebuilt by the "
              "same command (`--out-dtype float32`):", "",
              "| sigma_rel | val rebuilt | rebuilt − tracked | profile error | sum w_i | sum abs w_i | weight distance "
              "| rescaled to sum 1 − tracked | weight distance, rescaled |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(r0["rows"]):
        lines.append(f"| {width_name(row['sigma_rel'])} | {cell(runs, i, 'sparse.loss', '.4f')} | "
                     f"{cell(runs, i, 'sparse.diff', '+.4f')} | {cell(runs, i, 'sparse.profile_error', '.2%')} | "
                     f"{cell(runs, i, 'sparse.weights_sum', '.4f')} | "
                     f"{cell(runs, i, 'sparse.weights_abs_sum', '.1f')} | "
                     f"{cell(runs, i, 'sparse.dist', '.3f')} | {cell(runs, i, 'sparse.diff_rescaled', '+.4f')} | "
                     f"{cell(runs, i, 'sparse.dist_rescaled', '.3f')} |")
    lines += ["", "Reading (computed from the tables):", "", *verdict(runs, meta), "",
              "Not tested here: other learning-rate schedules (EDM2 trains with an inverse square-root decay; "
              "the cosine decay to 10 % used here already quiets the end of training, which narrows what any "
              "EMA can gain), longer runs, larger models, other data; snapshots stored in float32 (the "
              "float32-output column separates the rounding of the output, not that of the stored snapshots). "
              "The tracked and rebuilt models of a width come from the same run, so their difference is "
              "paired and not subject to the seed-to-seed spread of the losses.", ""]
    for key, what in (("cli_warnings", "every stored snapshot"), ("cli_warnings_sparse", "sparse storage")):
        warned = sorted({w for r in runs for w in r[key]})
        lines += [f"The CLI warned ({what}):", "", *(f"- `{w}`" for w in warned), ""] if warned else \
            [f"The CLI gave no warning ({what}).", ""]
    lines += ["Per seed (wall seconds: training with the hook, the first two CLI calls, evaluation, total):", "",
              "| seed | raw val | final train loss (last 50 steps) | train | CLI | CLI, float32 output | eval "
              "| total |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r["wall_s"]
        lines.append(f"| {r['seed']} | {r['raw_loss']:.4f} | {r['train_loss_last']:.4f} | {w['train_with_hook']:.0f} | "
                     f"{w['cli']:.1f} | {w['cli_float32']:.1f} | {w['eval']:.0f} | {w['total']:.0f} |")
    lines += ["", f"Total wall time: {meta['wall_s']:.0f} s on {meta['threads']} torch threads "
              f"(torch {meta['torch']}).", ""]
    return "\n".join(lines)


def plot(runs: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [row["sigma_rel"] for row in runs[0]["rows"]]
    raw = statistics.fmean(r["raw_loss"] for r in runs)
    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(6.6, 9.4), sharex=True,
                                           gridspec_kw={"height_ratios": [2.2, 1, 1]})
    for ax in (top, mid, bottom):
        ax.axvspan(min(STORED), max(STORED), color="tab:orange", alpha=0.12, lw=0)
        ax.grid(alpha=0.3)
    sparse_name = f"rebuilt from every {meta['sparse_every']}th step only"
    top.plot(widths, mean_rows(runs, "loss_direct"), "o-", color="black", label="tracked directly (PowerEMA, float32)")
    top.plot(widths, mean_rows(runs, "rec.loss"), "x--", color="tab:red", ms=8,
             label=f"rebuilt by `average --method phema` (float16 snapshots every {meta['store_every']} steps)")
    top.axhline(raw, color="tab:blue", lw=1.2, ls=":", label=f"raw final model ({raw:.4f})")
    top.set_ylabel("A=python val loss (nats/byte)")
    seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"
    top.set_title(f"post-hoc EMA from stored profiles {STORED[0]:g} and {STORED[1]:g} (shaded), "
                  f"{meta['steps']} steps, {seeds}", fontsize=9)
    top.legend(fontsize=7)
    mid.axhline(0, color="black", lw=0.8)
    mid.plot(widths, mean_rows(runs, "rec.diff"), "x-", color="tab:red", label="every stored snapshot")
    mid.plot(widths, mean_rows(runs, "rec_f32.diff_rescaled"), ".--", color="tab:red", alpha=0.6,
             label="the same, weights rescaled to sum 1")
    mid.plot(widths, mean_rows(runs, "sparse.diff"), "^:", color="tab:purple", ms=5, label=sparse_name)
    mid.plot(widths, mean_rows(runs, "sparse.diff_rescaled"), ".--", color="tab:purple", alpha=0.6,
             label="the same, weights rescaled to sum 1")
    mid.set_yscale("symlog", linthresh=1e-3)  # linear within ±0.001 nats/byte, logarithmic beyond
    mid.set_ylabel("rebuilt − tracked (nats/byte)\nsymlog, linear within ±0.001")
    mid.legend(fontsize=7)
    # a stored width is rebuilt exactly (error 0), which a log axis cannot show: left out of the lines
    for key, style, color, name in (("rec", "s-", "tab:green", "profile error"),
                                    ("sparse", "s:", "tab:olive", "profile error, sparse")):
        error = [e if e > 1e-9 else float("nan") for e in mean_rows(runs, f"{key}.profile_error")]
        bottom.plot(widths, error, style, color=color, ms=4, label=f"{name} (0 at the stored widths)")
    bottom.plot(widths, mean_rows(runs, "rec.dist"), "x-", color="tab:red",
                label="||rebuilt − tracked|| / ||tracked − raw||")
    bottom.plot(widths, mean_rows(runs, "dist_fp16_floor"), ".:", color="gray", label="float16 rounding floor")
    bottom.set_yscale("log")
    bottom.set_xscale("log")
    bottom.set_xticks(widths)
    bottom.set_xticklabels([f"{s:g}" for s in widths], fontsize=8)
    bottom.minorticks_off()
    bottom.set_xlabel("sigma_rel (relative EMA width)")
    bottom.set_ylabel("relative error")
    bottom.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 6: post-hoc EMA (EDM2)")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--store-every", type=int, default=50, help="PostHocEMA's snapshot_every")
    parser.add_argument("--sparse-every", type=int, default=500,
                        help="the sparse rebuild keeps the snapshots of steps that are multiples of this")
    parser.add_argument("--widths", type=float, nargs="+", default=list(WIDTHS), help="tracked sigma_rels")
    a = parser.parse_args()
    stem = "posthoc_quick" if a.quick else "posthoc"
    if a.quick:
        a.seeds, a.steps, a.warmup, a.store_every, a.sparse_every = a.seeds[:1], 200, 20, 20, 100
    a.widths = tuple(a.widths)

    def run(work: Path) -> list:
        print(common.describe_domains((DOMAIN,)), flush=True)
        return [one_run(work / f"seed{seed}", seed, a) for seed in a.seeds]

    data = common.study_data(a, stem, "runs", run, steps=a.steps, warmup=a.warmup, lr=a.lr,
                             store_every=a.store_every, sparse_every=a.sparse_every, stored=list(STORED),
                             widths=list(a.widths), seeds=a.seeds)
    common.publish(a.out, stem, data, report(data["runs"], data["meta"]),
                   lambda path: plot(data["runs"], data["meta"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
