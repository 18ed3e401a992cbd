"""Study 5, "LoRA learns less and forgets less" (Biderman et al., 2024), at toy scale on CPU.

The claim tested: fine-tuning with low-rank adapters (LoRA) learns the new domain less well
than full fine-tuning, and forgets the source domain less; higher ranks move toward full
fine-tuning on both axes.

Per seed, the byte-level GPT of ``common.py`` is trained on task A (stdlib Python) from
scratch exactly as ``continual.py`` trains it (same init, steps, lr and data order), then
fine-tuned on B (license texts) for continual.py's task-B budget, with the same data order
for every method:

* **full fine-tuning**: every parameter, peak lr ``--lr`` (continual.py's "plain" after B).
* **LoRA r = 2, 4, 8** (trained here): each ``nn.Linear`` of the blocks (``qkv``, ``proj``,
  ``fc``, ``out``; not the embeddings, head or norms) becomes a frozen base plus
  ``scaling * B @ A`` with A (r x in, Kaiming-uniform as PEFT initialises it), B (out x r,
  zeros), ``lora_alpha = 2r`` (scaling 2); only A and B train, at peak lr ``--lora-lr``
  (10x the full fine-tune's by default). Each is saved as a PEFT adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``) and materialised **through the
  tool**: ``mergekit-like merge --method linear "BASE+ADAPTER" -p weight=1 -o OUT --quiet``;
  OUT is what is scored, and its losses are checked against the in-memory LoRA model's.
* **LoRA r = 2, 4, 8 extracted from the full fine-tune** with the tool's
  ``mergekit-like extract-lora FINETUNED --base BASE --rank R -o OUT``, merged back the same
  way and scored: once restricted to the trained adapters' modules (``--target`` each block
  Linear, ``--embeddings skip --norms skip``) and once with the command's defaults. Skipped,
  and said so in the report, when this CLI has no ``extract-lora``.

* **full FT's own trade-off line**: ``merge --method wise_ft --base A FULL -p alpha=0.25,0.5,0.75``,
  the full fine-tune interpolated back toward the start, to compare LoRA with full
  fine-tuning at the same B loss (does LoRA forget less than learning less explains?).

The first seed also trains LoRA r = 8 at two other peak lrs (``--lr-check``), scored on B's
validation split, to show whether the chosen LoRA lr is a reasonable one. With ``--workdir``,
each seed's result is saved there (``seedN/result.json``) and reused by a later run with the
same settings: measure one seed with ``--seeds 0``, then run ``--seeds 0 1 2``.

Reported: held-out **test** loss (nats/byte) on B (learning), A (forgetting) and C (an
unrelated domain), mean ± std over seeds; B loss against A loss per method (PNG).

    python benchmarks/evidence/lora.py            # 3 seeds, 28 min measured on 2 shared CPU cores
    python benchmarks/evidence/lora.py --quick    # smoke test, a few minutes

Writes benchmarks/results/lora.md, lora.png and lora.json (``lora_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import TrainConfig  # noqa: E402

TASKS = ("python", "licenses", "c_headers")  # A, B, C
LETTER = dict(zip(TASKS, "ABC"))
RANKS = (2, 4, 8)
TARGETS = ("qkv", "proj", "fc", "out")  # the leaf names of every nn.Linear inside a Block
LR_CHECK_RANK = 8
WISE_ALPHAS = (0.25, 0.5, 0.75)  # WiSE-FT(A, full FT): full fine-tuning's own learning/forgetting line
AGREE_TOL = 1e-5  # in-memory LoRA model vs the tool's merged output, nats/byte


def scores(model: nn.Module) -> dict[str, float]:
    return {LETTER[t]: common.evaluate(model, t, "test") for t in TASKS}  # type: ignore[arg-type]


def loaded_scores(directory: Path) -> dict[str, float]:
    return scores(common.load_model(directory))


# -- LoRA, as PEFT defines it ------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + scaling * x A^T B^T``: the base frozen, A (r x in) Kaiming-uniform, B (out x r) zeros."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=gen)  # PEFT's init of lora_A
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def add_lora(model: common.TinyGPT, r: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Freezes ``model`` and wraps every block Linear; returns {module path: wrapper}.

    The module path is the name under which ``common.save_model`` writes ``<path>.weight``."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped: dict[str, LoRALinear] = {}
    for i, block in enumerate(model.blocks):
        for leaf in TARGETS:
            layer = LoRALinear(getattr(block, leaf), r, alpha, gen)
            setattr(block, leaf, layer)
            wrapped[f"blocks.{i}.{leaf}"] = layer
    return wrapped


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(wrapped: dict[str, LoRALinear], r: int, alpha: float, base_dir: Path, directory: Path) -> Path:
    """A PEFT-format adapter directory: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, layer in wrapped.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A.detach().contiguous().clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B.detach().contiguous().clone()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(TARGETS),
              "base_model_name_or_path": str(base_dir), "fan_in_fan_out": False, "bias": "none",
              "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "task_type": None, "inference_mode": True}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def materialise(base_dir: Path, adapter: Path, out: Path) -> float:
    """The tool's merge-and-unload: ``merge --method linear BASE+ADAPTER -p weight=1``; returns its seconds."""
    return common.run_cli(["merge", "--method", "linear", f"{base_dir}+{adapter}", "-p", "weight=1",
                           "-o", str(out), "--quiet"])


def delta_norm(model_dir: Path, base_dir: Path) -> float:
    """||theta - theta_A|| over every tensor (Frobenius, all parameters together)."""
    a, b = common.load_model(model_dir).state_dict(), common.load_model(base_dir).state_dict()
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


# -- extract-lora: the tool's command, when this CLI has it -----------------------------------


def extract_lora_help() -> str | None:
    """``mergekit-like extract-lora --help``, or None when the command does not exist (yet)."""
    done = subprocess.run([common.cli(), "extract-lora", "--help"], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0 or "--rank" not in text or "--base" not in text:
        return None
    return text


# the trained adapters' scope (the block Linears only), and the command's defaults as given
MATCHED_FLAGS = [f for leaf in TARGETS for f in ("--target", leaf)] + ["--embeddings", "skip", "--norms", "skip"]


def extract_variants(help_text: str | None) -> dict[str, list[str]]:
    """The extractions to run: none without the command; the matched scope when its flags exist."""
    if help_text is None:
        return {}
    variants = {"extracted_default": []}
    if all(flag in help_text for flag in ("--target", "--embeddings", "--norms")):
        variants = {"extracted": MATCHED_FLAGS, **variants}
    return variants


def adapter_summary(directory: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((directory / "adapter_config.json").read_text())
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        numel = sum(math.prod(f.get_slice(n).get_shape()) for n in names)
    modules = sorted({n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in names if ".lora_" in n})
    return {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save") or [],
            "modules": modules, "tensors": len(names),
            "params": numel}


# -- one seed ----------------------------------------------------------------------------------


def train_lora(start: Path, r: int, lr: float, cfg: TrainConfig, seed: int) -> tuple[common.TinyGPT, dict]:
    model = common.load_model(start)
    wrapped = add_lora(model, r, 2.0 * r, seed=5000 + 100 * seed + r)
    n = trainable(model)
    t = time.perf_counter()
    common.train(model, "licenses", TrainConfig(**{**cfg.__dict__, "lr": lr}))
    info = {"trainable": n, "train_s": time.perf_counter() - t, "wrapped": wrapped}
    return model, info


def one_seed(seed: int, work: Path, a: argparse.Namespace, extract_help: str | None) -> dict:
    t0 = time.perf_counter()
    print(f"[seed {seed}] task A ({TASKS[0]}) from scratch, {a.pretrain_steps} steps", flush=True)
    model = common.new_model(1000 + seed)  # continual.py's init and data order for task A
    common.train(model, TASKS[0], TrainConfig(steps=a.pretrain_steps, lr=a.lr, warmup=a.pretrain_steps // 10,
                                              seed=1000 * seed), log_every=max(1, a.pretrain_steps // 4))
    start = common.save_model(model, work / "after_A")
    result: dict = {"seed": seed, "after_A": scores(model), "methods": {}, "wall_s": {}}
    result["wall_s"]["task_A"] = time.perf_counter() - t0
    print(f"[seed {seed}] after A: {result['after_A']}", flush=True)
    # continual.py's task-B config: the same steps, warm-up and data order for every method
    cfg = TrainConfig(steps=a.task_steps, lr=a.lr, warmup=max(1, a.task_steps // 10), seed=1000 * seed + 1)

    t = time.perf_counter()
    full = common.load_model(start)
    common.train(full, "licenses", cfg)
    full_dir = common.save_model(full, work / "full")
    result["methods"]["full"] = {**scores(full), "trainable": common.num_params(full),
                                 "delta_norm": delta_norm(full_dir, start)}
    result["wall_s"]["full"] = time.perf_counter() - t
    print(f"[seed {seed}] full FT: {result['methods']['full']} ({result['wall_s']['full']:.0f}s)", flush=True)

    for r in RANKS:
        t = time.perf_counter()
        lora, info = train_lora(start, r, a.lora_lr, cfg, seed)
        in_memory = scores(lora)
        adapter = save_adapter(info["wrapped"], r, 2.0 * r, start, work / f"lora_r{r}")
        merged = work / f"lora_r{r}_merged"
        cli_s = materialise(start, adapter, merged)
        through_tool = loaded_scores(merged)
        diff = max(abs(in_memory[k] - through_tool[k]) for k in in_memory)
        assert diff < AGREE_TOL, f"LoRA r={r}: the tool's merged output differs from the LoRA model by {diff:.2e}"
        result["methods"][f"lora_r{r}"] = {**through_tool, "trainable": info["trainable"],
                                           "in_memory": in_memory, "max_abs_diff_vs_in_memory": diff,
                                           "delta_norm": delta_norm(merged, start), "merge_cli_s": cli_s}
        result["wall_s"][f"lora_r{r}"] = time.perf_counter() - t
        print(f"[seed {seed}] LoRA r={r} ({info['trainable']:,} trained): {through_tool}, tool vs in-memory "
              f"{diff:.1e} ({result['wall_s'][f'lora_r{r}']:.0f}s)", flush=True)

    for variant, flags in extract_variants(extract_help).items():
        for r in RANKS:
            t = time.perf_counter()
            out = work / f"{variant}_r{r}"
            extract_s = common.run_cli(["extract-lora", str(full_dir), "--base", str(start), "--rank", str(r),
                                        *flags, "-o", str(out), "--quiet"])
            merged = work / f"{variant}_r{r}_merged"
            materialise(start, out, merged)
            summary = adapter_summary(out)
            result["methods"][f"{variant}_r{r}"] = {**loaded_scores(merged), "trainable": summary["params"],
                                                    "adapter": summary, "extract_cli_s": extract_s,
                                                    "delta_norm": delta_norm(merged, start)}
            result["wall_s"][f"{variant}_r{r}"] = time.perf_counter() - t
            got = result["methods"][f"{variant}_r{r}"]
            print(f"[seed {seed}] {variant} r={r} ({summary['params']:,} stored): A {got['A']:.3f} B {got['B']:.3f} "
                  f"C {got['C']:.3f} ({result['wall_s'][f'{variant}_r{r}']:.0f}s)", flush=True)

    if a.lr_check and seed == a.seeds[0]:
        result["lr_check"] = {}
        for lr in sorted({*a.lr_check, a.lora_lr}):
            if lr == a.lora_lr and f"lora_r{LR_CHECK_RANK}" in result["methods"]:
                lora_dir = work / f"lora_r{LR_CHECK_RANK}_merged"
                lora = common.load_model(lora_dir)
            else:
                lora, _ = train_lora(start, LR_CHECK_RANK, lr, cfg, seed)
            result["lr_check"][f"{lr:g}"] = {"B_val": common.evaluate(lora, "licenses", "val"),
                                             "A_test": common.evaluate(lora, "python", "test")}
        print(f"[seed {seed}] lr check, LoRA r={LR_CHECK_RANK}: {result['lr_check']}", flush=True)
    result["wall_s"]["total"] = time.perf_counter() - t0
    return result


def cached_seed(seed: int, work: Path, a: argparse.Namespace, extract_help: str | None) -> dict:
    """``one_seed``, or its result saved in ``work`` by an earlier run with the same settings (``--workdir``
    only: measure one seed first, then run the rest without redoing it)."""
    settings = {"pretrain_steps": a.pretrain_steps, "task_steps": a.task_steps, "lr": a.lr, "lora_lr": a.lora_lr,
                "lr_check": a.lr_check if seed == a.seeds[0] else [],
                "extract": list(extract_variants(extract_help))}
    cache = work / "result.json"
    result = None
    if a.workdir is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            print(f"[seed {seed}] reusing {cache} (run before in {saved['wall_s']['total']:.0f}s)", flush=True)
            result = saved
    if result is None:
        result = {**one_seed(seed, work, a, extract_help), "settings": settings}
    if "wise_ft_0.5" not in result["methods"]:
        full_ft_line(work, result)
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def full_ft_line(work: Path, result: dict) -> None:
    """WiSE-FT of the task-A model and the full fine-tune through the tool, ``merge --method wise_ft``
    (one read pass, one output per alpha): points between the start and full FT, for comparing LoRA with
    full fine-tuning at the same B loss."""
    t = time.perf_counter()
    start, out = work / "after_A", work / "wise_ft"
    common.run_cli(["merge", "--method", "wise_ft", "--base", str(start), str(work / "full"),
                    "-p", "alpha=" + ",".join(f"{x:g}" for x in WISE_ALPHAS), "-o", str(out), "-q", "--overwrite"])
    for x in WISE_ALPHAS:
        d = out / f"alpha_{x:g}"
        result["methods"][f"wise_ft_{x:g}"] = {**loaded_scores(d), "trainable": 0, "delta_norm": delta_norm(d, start)}
    result["wall_s"]["wise_ft"] = time.perf_counter() - t
    result["wall_s"]["total"] += result["wall_s"]["wise_ft"]
    print(f"[seed {result['seed']}] WiSE-FT(A, full) alphas {WISE_ALPHAS}: " + "; ".join(
        f"B {result['methods'][f'wise_ft_{x:g}']['B']:.3f} A {result['methods'][f'wise_ft_{x:g}']['A']:.3f}"
        for x in WISE_ALPHAS), flush=True)


def line_at(r: dict, b: float) -> float | None:
    """A loss of the start -> WiSE-FT -> full FT line (piecewise linear in the (B, A) plane) at B loss ``b``;
    None outside its range."""
    points = sorted([(r["after_A"]["B"], r["after_A"]["A"]), (r["methods"]["full"]["B"], r["methods"]["full"]["A"])]
                    + [(r["methods"][f"wise_ft_{x:g}"]["B"], r["methods"][f"wise_ft_{x:g}"]["A"])
                       for x in WISE_ALPHAS])
    for (b0, a0), (b1, a1) in itertools.pairwise(points):
        if b0 <= b <= b1 and b1 > b0:
            return a0 + (a1 - a0) * (b - b0) / (b1 - b0)
    return None


# -- reporting ---------------------------------------------------------------------------------


def labels(results: list[dict]) -> dict[str, str]:
    out = {"after_A": "start: the task-A model", "full": "full fine-tuning"}
    out |= {f"wise_ft_{x:g}": f"WiSE-FT(start, full FT), alpha {x:g}" for x in WISE_ALPHAS}
    out |= {f"lora_r{r}": f"LoRA r={r}, trained" for r in RANKS}
    if "extracted_r2" in results[0]["methods"]:
        out |= {f"extracted_r{r}": f"LoRA r={r}, extracted from full FT (block Linears)" for r in RANKS}
    if "extracted_default_r2" in results[0]["methods"]:
        out |= {f"extracted_default_r{r}": f"LoRA r={r}, extracted, extract-lora defaults" for r in RANKS}
    return out


def values(results: list[dict], method: str, key: str) -> list[float]:
    return [(r["after_A"] if method == "after_A" else r["methods"][method])[key] for r in results]


def mean(results: list[dict], method: str, key: str) -> float:
    return statistics.fmean(values(results, method, key))


def fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def count(results: list[dict], better) -> str:  # type: ignore[no-untyped-def]
    return f"{sum(bool(better(r)) for r in results)} of {len(results)} seeds"


def above_line(results: list[dict], method: str) -> tuple[list[float], int]:
    """Per seed, the method's A loss minus full FT's WiSE-FT line's at the method's B loss (negative: it forgets
    less than full fine-tuning does for the same learning); and the seeds where its B is outside the line."""
    diffs, outside = [], 0
    for r in results:
        at = line_at(r, r["methods"][method]["B"])
        if at is None:
            outside += 1
        else:
            diffs.append(r["methods"][method]["A"] - at)
    return diffs, outside


def summary(results: list[dict], lora_lr: float) -> list[str]:
    """The verdict in a few sentences, each part decided by the numbers."""
    m = results[0]["methods"]
    pairs = [(s, r) for s in results for r in RANKS]
    learns = sum(s["methods"][f"lora_r{r}"]["B"] > s["methods"]["full"]["B"] for s, r in pairs)
    forgets = sum(s["methods"][f"lora_r{r}"]["A"] < s["methods"]["full"]["A"] for s, r in pairs)
    bs = [mean(results, f"lora_r{r}", "B") for r in RANKS]
    as_ = [mean(results, f"lora_r{r}", "A") for r in RANKS]
    toward = all(x > y for x, y in itertools.pairwise(bs)) and all(x < y for x, y in itertools.pairwise(as_))
    both = learns == forgets == len(pairs)
    out = [("**Both halves show at this scale.**" if both else "**Only partly.**")
           + f" Trained LoRA has a higher B loss than full fine-tuning in {learns} of {len(pairs)} (rank, seed) "
           f"pairs (B {min(bs):.2f}-{max(bs):.2f} vs {mean(results, 'full', 'B'):.2f}) and a lower A loss in "
           f"{forgets} of {len(pairs)} (A {min(as_):.2f}-{max(as_):.2f} vs {mean(results, 'full', 'A'):.2f}; the "
           f"start was {mean(results, 'after_A', 'A'):.2f})"
           + ("; higher rank moves toward full fine-tuning on both axes." if toward else
              "; the ranks are not ordered on both axes.")
           + f" C, the unrelated domain, also degrades less: {min(mean(results, f'lora_r{r}', 'C') for r in RANKS):.2f}"
           f"-{max(mean(results, f'lora_r{r}', 'C') for r in RANKS):.2f} vs {mean(results, 'full', 'C'):.2f} "
           f"(start {mean(results, 'after_A', 'C'):.2f})."]
    lora_gaps = [d for r in RANKS for d in above_line(results, f"lora_r{r}")[0]]
    if lora_gaps:
        worse = sum(d > 0 for d in lora_gaps)
        out.append(
            ("**But it is not a better trade-off than full fine-tuning's.**"
             if worse == len(lora_gaps) else "Against full fine-tuning at equal learning:")
            + f" Interpolating the full fine-tune back toward the start (WiSE-FT through the tool) reaches each "
            f"LoRA's B loss with a lower A loss than that LoRA in {worse} of {len(lora_gaps)} (rank, seed) pairs; "
            f"LoRA's A loss is {min(lora_gaps):+.2f} to {max(lora_gaps):+.2f} nats/byte above that line. So here "
            "LoRA forgets less only at the price of learning less, and less well than the interpolated full "
            "fine-tune does at the same B loss. (That line is a weight interpolation; full fine-tuning with fewer "
            "steps or a lower lr was not run.)")
    dn = [mean(results, f"lora_r{r}", "delta_norm") for r in RANKS]
    out.append(f"LoRA's weight change is not small: ‖θ − θ_A‖ {min(dn):.1f}-{max(dn):.1f} against "
               f"{mean(results, 'full', 'delta_norm'):.1f} for full fine-tuning (whose change covers every tensor), "
               "so forgetting less does not come from moving the weights less in this norm.")
    if "extracted_r2" in m:
        eb = [mean(results, f"extracted_r{r}", "B") for r in RANKS]
        ea = [mean(results, f"extracted_r{r}", "A") for r in RANKS]
        gaps = [d for r in RANKS for d in above_line(results, f"extracted_r{r}")[0]]
        similar = all(abs(x - y) < 0.05 for x, y in zip(eb + ea, bs + as_))
        out.append(("**Extracted adapters behave like trained ones of the same rank.**" if similar else
                    "**Extracted adapters do not behave like trained ones of the same rank.**")
                   + f" Cut from the full fine-tune to the same modules and ranks, they reach B "
                   f"{min(eb):.2f}-{max(eb):.2f} (trained {min(bs):.2f}-{max(bs):.2f}) and A "
                   f"{min(ea):.2f}-{max(ea):.2f} (trained {min(as_):.2f}-{max(as_):.2f})"
                   + (": a rank-r cut of the full fine-tune's change keeps little of what it learned, while LoRA "
                      "trained at rank r finds another low-rank change that learns more."
                      if min(eb) > max(bs) else ".")
                   + (f" They too lie above full fine-tuning's line (A {min(gaps):+.2f} to {max(gaps):+.2f})."
                      if gaps and min(gaps) > 0 else ""))
    check = next((r["lr_check"] for r in results if "lr_check" in r), None)
    if check:
        best = min(check, key=lambda lr: check[lr]["B_val"])
        out.append(f"LoRA's lr: of {', '.join(check)} (r={LR_CHECK_RANK}, seed {results[0]['seed']}, B val), "
                   f"{best} learned most" + (" (the lr used)." if best == f"{lora_lr:g}" else " (not the lr used).")
                   + " Full fine-tuning's lr (study 1's) was not tuned.")
    return out


def verdict(results: list[dict]) -> list[str]:
    """Each part of the claim, against the means and per seed."""
    m = results[0]["methods"]
    lab = labels(results)
    full_b, full_a = mean(results, "full", "B"), mean(results, "full", "A")
    pairs = [(s, f"lora_r{r}") for s in results for r in RANKS]
    learns_less = sum(s["methods"][k]["B"] > s["methods"]["full"]["B"] for s, k in pairs)
    forgets_less = sum(s["methods"][k]["A"] < s["methods"]["full"]["A"] for s, k in pairs)
    lines = [f"- Against full fine-tuning, trained LoRA has the higher B loss (learns less) in {learns_less} of "
             f"{len(pairs)} (rank, seed) pairs and the lower A loss (forgets less) in {forgets_less} of {len(pairs)}."]
    for r in RANKS:
        k = f"lora_r{r}"
        lines.append(
            f"- LoRA r={r} vs full FT: B {mean(results, k, 'B'):.3f} vs {full_b:.3f} "
            f"({mean(results, k, 'B') - full_b:+.3f}; learns less in "
            + count(results, lambda s, k=k: s["methods"][k]["B"] > s["methods"]["full"]["B"])
            + f"), A {mean(results, k, 'A'):.3f} vs {full_a:.3f} ({mean(results, k, 'A') - full_a:+.3f}; "
            "forgets less in " + count(results, lambda s, k=k: s["methods"][k]["A"] < s["methods"]["full"]["A"])
            + f"), C {mean(results, k, 'C'):.3f} vs {mean(results, 'full', 'C'):.3f}.")
    bs = [mean(results, f"lora_r{r}", "B") for r in RANKS]
    as_ = [mean(results, f"lora_r{r}", "A") for r in RANKS]
    mono_b = all(x > y for x, y in itertools.pairwise(bs))
    mono_a = all(x < y for x, y in itertools.pairwise(as_))
    lines.append(f"- Trained LoRA by rank {'/'.join(map(str, RANKS))}: B " + " / ".join(f"{x:.3f}" for x in bs)
                 + (" (falls with rank)" if mono_b else " (not monotone in rank)") + "; A "
                 + " / ".join(f"{x:.3f}" for x in as_)
                 + (" (rises with rank)" if mono_a else " (not monotone in rank)") + ".")
    compared = [f"lora_r{r}" for r in RANKS] + [k for k in m if k.startswith("extracted")]
    parts = []
    for k in compared:
        diffs, outside = above_line(results, k)
        if diffs:
            parts.append(f"{lab[k]} {statistics.fmean(diffs):+.3f} (lower in {sum(d < 0 for d in diffs)} of "
                         f"{len(diffs)} seeds" + (f"; {outside} outside the line" if outside else "") + ")")
        else:
            parts.append(f"{lab[k]}: B outside the line in every seed")
    lines.append("- At equal learning: A loss minus that of full FT's own trade-off line (the start, "
                 "WiSE-FT(start, full FT) at alpha " + ", ".join(f"{x:g}" for x in WISE_ALPHAS)
                 + " and full FT, piecewise linear in (B, A), per seed) at the method's B loss; negative = forgets "
                 "less than full FT does for the same B: " + "; ".join(parts) + ".")
    variants = [v for v in ("extracted", "extracted_default") if f"{v}_r2" in m]
    for v in variants:
        for r in RANKS:
            e, t = f"{v}_r{r}", f"lora_r{r}"
            lines.append(f"- {lab[e]} vs trained r={r}: B {mean(results, e, 'B'):.3f} vs "
                         f"{mean(results, t, 'B'):.3f}, A {mean(results, e, 'A'):.3f} vs {mean(results, t, 'A'):.3f}, "
                         f"C {mean(results, e, 'C'):.3f} vs {mean(results, t, 'C'):.3f}; against full FT: "
                         f"B {mean(results, e, 'B') - full_b:+.3f}, A {mean(results, e, 'A') - full_a:+.3f}.")
    if not variants:
        lines.append("- Extracted LoRA: not run, this CLI has no `extract-lora` command "
                     "(`mergekit-like extract-lora --help` failed when the study ran).")
    diffs = [s["methods"][f"lora_r{r}"]["max_abs_diff_vs_in_memory"] for s in results for r in RANKS]
    lines.append(f"- The tool's adapter path: every trained adapter, materialised by `merge --method linear "
                 f"BASE+ADAPTER -p weight=1`, scores as the in-memory LoRA model to within {max(diffs):.1e} "
                 f"nats/byte on A, B and C ({len(diffs)} adapters; asserted < {AGREE_TOL:g}).")
    return lines


def continual_check(results: list[dict], meta: dict) -> str | None:
    """Full FT here is continual.py's "plain" after B (same seeds and settings): compare, when saved."""
    path = common.RESULTS / "continual.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if any(old["meta"].get(k) != meta[k] for k in ("pretrain_steps", "task_steps", "lr")):
        return None
    by_seed = {r["seed"]: r for r in old["results"]}
    diffs = [abs(r["methods"]["full"][t] - by_seed[r["seed"]]["methods"]["plain"]["B"][t])
             for r in results if r["seed"] in by_seed for t in "ABC"]
    diffs += [abs(r["after_A"][t] - by_seed[r["seed"]]["after_A"][t]) for r in results if r["seed"] in by_seed
              for t in "ABC"]
    if not diffs:
        return None
    return (f"Consistency with study 1: the task-A model and the full fine-tune repeat `continual.py`'s after-A and "
            f"plain after-B models (same seeds, settings and data order); their losses differ from "
            f"`results/continual.json` by at most {max(diffs):.1e} nats/byte on A, B and C"
            + (" (identical)." if max(diffs) == 0 else " (float run-to-run differences of the CPU kernels)."))


def report(results: list[dict], meta: dict) -> str:
    n = len(results)
    lab = labels(results)
    lines = [f"# Study 5: LoRA learns less and forgets less (toy scale, {n} seed{'s' if n > 1 else ''})", "",
             "Data on this machine (file-level split by path hash; see benchmarks/README.md):", "",
             common.describe_domains(TASKS), "",
             f"Model: byte-level GPT, {meta['params']:,} parameters. Start: the task-A model of study 1 "
             f"({meta['pretrain_steps']} steps on A = python from scratch, peak lr {meta['lr']:g}). Then "
             f"{meta['task_steps']} steps on B = licenses (warm-up {max(1, meta['task_steps'] // 10)}, cosine to 10 %, "
             f"AdamW, weight decay 0.1 on matrices, batch 32 x 64 bytes, the same data order for every method): "
             f"full fine-tuning at peak lr {meta['lr']:g}; LoRA on every block Linear "
             f"({', '.join(TARGETS)}; embeddings, head, norms and biases frozen), lora_alpha = 2r (scaling 2), "
             f"A Kaiming-uniform, B zeros, peak lr {meta['lora_lr']:g} ({meta['lora_lr'] / meta['lr']:g}x the full "
             f"fine-tune's). LoRA models are scored as the tool materialises them "
             f"(`mergekit-like merge --method linear BASE+ADAPTER -p weight=1`). Loss: held-out **test** "
             f"next-byte cross-entropy, nats/byte (lower is better); mean ± sample std over seeds "
             f"{[r['seed'] for r in results]}.", "",
             "| method | parameters trained / stored | B test (learning) | A test (forgetting) | C test (unrelated) "
             "| ‖θ − θ_A‖ |", "|---|---|---|---|---|---|"]
    for method, label in lab.items():
        if method == "after_A":
            cells = ["0", *(fmt(values(results, method, t)) for t in "BAC"), "0"]
        else:
            trained = results[0]["methods"][method]["trainable"]
            cells = ["none (a merge)" if method.startswith("wise_ft") else f"{trained:,}",
                     *(fmt(values(results, method, t)) for t in "BAC"), fmt(values(results, method, "delta_norm"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = []
    for variant, how in (("extracted", "`extract-lora FULL --base A --rank R " + " ".join(MATCHED_FLAGS) + "`"),
                         ("extracted_default", "`extract-lora FULL --base A --rank R` (the command's defaults)")):
        if f"{variant}_r2" in results[0]["methods"]:
            s = results[0]["methods"][f"{variant}_r2"]["adapter"]
            low = sorted({m.rsplit(".", 1)[-1] for m in s["modules"]})
            notes.append(f"- {lab[f'{variant}_r2'].split(', ', 1)[1]}: {how}; low-rank modules: {', '.join(low)}"
                         + (f"; saved whole (modules_to_save): {', '.join(s['modules_to_save'])}"
                            if s["modules_to_save"] else "; nothing saved whole") + ".")
    embedding_as_linear = sorted({"embed", "pos"} & {m for r in results for k, v in r["methods"].items()
                                                    if k.startswith("extracted") for m in v["adapter"]["modules"]})
    if embedding_as_linear:
        notes.append(f"- `{'`, `'.join(embedding_as_linear)}` are nn.Embedding layers, but their names are not "
                     "among the embedding names the command recognises, so it cut them as Linears (`lora_A` "
                     "r x dim, `lora_B` tokens x r) rather than as PEFT's `lora_embedding_A` / `lora_embedding_B`: "
                     "the tool's own `BASE+ADAPTER` applies them consistently (W + B A), but PEFT's keys for an "
                     "nn.Embedding would not match them.")
    if notes:
        lines += ["", "Extracted adapters (their \"parameters trained\" is the number of values the adapter "
                  "stores; the full fine-tune's changes of anything not listed, e.g. the Linear biases, are "
                  "left out):", "", *notes]
    lines += ["", "Per seed (B / A test):", "", "| seed | " + " | ".join(lab[m] for m in lab if m != "after_A")
              + " |", "|---" * len(lab) + "|"]
    for r in results:
        lines.append(f"| {r['seed']} | " + " | ".join(
            f"{r['methods'][m]['B']:.3f} / {r['methods'][m]['A']:.3f}" for m in lab if m != "after_A") + " |")
    check = next((r["lr_check"] for r in results if "lr_check" in r), None)
    if check:
        lines += ["", f"LoRA learning-rate check (seed {results[0]['seed']}, r={LR_CHECK_RANK}, same steps; B on the "
                  "**val** split, A on test): " + "; ".join(
                      f"lr {lr}: B val {v['B_val']:.3f}, A {v['A_test']:.3f}" for lr, v in check.items()) + "."]
    lines += ["", "## Verdict", "", *(x + "\n" for x in summary(results, meta["lora_lr"])),
              "## The claim, as measured", "", *verdict(results), ""]
    consistency = continual_check(results, meta)
    if consistency:
        lines += [consistency, ""]
    per_seed = [r["wall_s"]["total"] for r in results]
    lines += [f"Wall time: {sum(per_seed):.0f} s for the {n} seed{'s' if n > 1 else ''} (per seed "
              + ", ".join(f"{s:.0f}" for s in per_seed) + f" s; the last run of the script {meta['wall_s']:.0f} s, "
              f"seeds found in `--workdir` reused) on {meta['threads']} torch threads (torch {meta['torch']}), "
              "2 CPU cores shared with other work.", ""]
    return "\n".join(lines)


def spread(vals: list[float]) -> float:
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lab = labels(results)
    fig, ax = plt.subplots(figsize=(11, 5.8))
    styles = {"after_A": ("black", "s"), "full": ("tab:red", "D")}
    blues, greens = ("#9ecae1", "#4292c6", "#08306b"), ("#a1d99b", "#41ab5d", "#00441b")
    oranges = ("#fdae6b", "#f16913", "#7f2704")
    for r, cb, cg, co in zip(RANKS, blues, greens, oranges):
        styles[f"lora_r{r}"] = (cb, "o")
        styles[f"extracted_r{r}"] = (cg, "^")
        styles[f"extracted_default_r{r}"] = (co, "v")
    styles |= {f"wise_ft_{x:g}": ("tab:red", "x") for x in WISE_ALPHAS}
    line = ["after_A", *(f"wise_ft_{x:g}" for x in WISE_ALPHAS), "full"]
    ax.plot([mean(results, k, "B") for k in line], [mean(results, k, "A") for k in line], color="tab:red",
            ls="--", lw=1, alpha=0.6, label="full FT's line: WiSE-FT(start, full FT), alpha 0 to 1")
    for method, label in lab.items():
        bs, as_ = values(results, method, "B"), values(results, method, "A")
        color, marker = styles[method]
        ax.errorbar(statistics.fmean(bs), statistics.fmean(as_), xerr=spread(bs), yerr=spread(as_), fmt=marker,
                    color=color, markersize=5 if method.startswith("wise_ft") else 8, capsize=3,
                    label=None if method.startswith("wise_ft") else label)
    for prefix, color in (("lora_r", "#4292c6"), ("extracted_r", "#41ab5d"), ("extracted_default_r", "#f16913")):
        if f"{prefix}2" in results[0]["methods"]:
            ax.plot([mean(results, f"{prefix}{r}", "B") for r in RANKS],
                    [mean(results, f"{prefix}{r}", "A") for r in RANKS], color=color, alpha=0.4, lw=1)
    ax.set_xlabel("B = licenses, test loss after fine-tuning (learning: lower = learned more)")
    ax.set_ylabel("A = python, test loss after fine-tuning (forgetting: higher = forgot more)")
    n = len(results)
    ax.set_title(f"LoRA vs full fine-tuning on B after A, toy scale, mean ± std over {n} seed{'s' if n > 1 else ''}",
                 fontsize=10)
    for x in WISE_ALPHAS:
        ax.annotate(f"alpha {x:g}", (mean(results, f"wise_ft_{x:g}", "B"), mean(results, f"wise_ft_{x:g}", "A")),
                    fontsize=7, xytext=(-8, -12), textcoords="offset points", color="tab:red")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = common.study_parser("Study 5: LoRA learns less and forgets less")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps on task A (as continual.py)")
    parser.add_argument("--task-steps", type=int, default=300, help="steps on B (as continual.py's task B)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of task A and of full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="peak lr of LoRA (default 10x --lr)")
    parser.add_argument("--lr-check", type=float, nargs="*", default=[3e-3, 3e-2],
                        help=f"other LoRA lrs tried at r={LR_CHECK_RANK} on the first seed (none: skip)")
    a = parser.parse_args()
    if a.quick:
        a.seeds, a.pretrain_steps, a.task_steps, a.lr_check = a.seeds[:1], 60, 30, []
    stem = "lora_quick" if a.quick else "lora"
    extract_help = None if a.replot else extract_lora_help()
    if not a.replot:
        print("extract-lora: " + ("available" if extract_help else "NOT available in this CLI; that part is skipped"),
              flush=True)
    data = common.study_data(a, stem, "results",
                             lambda work: [cached_seed(s, work / f"seed{s}", a, extract_help) for s in a.seeds],
                             pretrain_steps=a.pretrain_steps, task_steps=a.task_steps, lr=a.lr, lora_lr=a.lora_lr,
                             ranks=list(RANKS), lora_alpha="2r", targets=list(TARGETS), lr_check=a.lr_check,
                             extract_lora_available=extract_help is not None)
    common.publish(a.out, stem, data, report(data["results"], data["meta"]),
                   lambda path: plot(data["results"], path), save_json=not a.replot)


if __name__ == "__main__":
    main()
