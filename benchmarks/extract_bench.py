"""Extracting a LoRA adapter: this tool's ``extract-lora`` against mergekit's ``mergekit-extract-lora``.

    python benchmarks/extract_bench.py                        # 270m, rank 32, cpu
    python benchmarks/extract_bench.py --size tiny --rank 8   # seconds: a check of the script
    python benchmarks/extract_bench.py --fast --threads 1 --save

How it measures:

* Inputs: ``mergekit-like example DIR --size SIZE --finetunes 1`` (bf16, random deterministic
  weights; the fine-tune is the base plus small Gaussian noise, a full-rank change), written once
  into the work dir (``--workdir`` keeps and reuses them).
* Commands, each a fresh process timed from start to exit (so each tool's startup counts):
  ``mergekit-like extract-lora FT --base BASE --rank R -o OUT --quiet`` (and with ``--fast``, the
  randomized SVD) and ``mergekit-extract-lora --model FT --base-model BASE --out-path OUT
  --max-rank R --quiet``; both at their defaults otherwise (embeddings, head and norms saved whole
  in ``modules_to_save``; factors in bf16, as the inputs). ``--threads N`` sets OMP_NUM_THREADS
  and MKL_NUM_THREADS for every command alike.
* Error: for every LoRA module of an adapter, ``||delta - scaling B A|| / ||delta||`` with
  ``delta = FT - BASE`` in float32 and the factors as stored (scaling from each adapter's own
  config), aggregated per module type as ``sqrt(sum ||delta - BA||^2 / sum ||delta||^2)``; the
  same evaluator reads both adapters. Tensors saved whole are checked equal to the fine-tune's.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import merge_bench as mb

from mergekit_like.adapters.config import ADAPTER_WEIGHTS, read_adapter_config
from mergekit_like.adapters.view import EMBEDDING_A, EMBEDDING_B, LINEAR_A, LINEAR_B, PEFT_PREFIX
from mergekit_like.io.reader import open_checkpoint

OURS = Path(sys.executable).parent / "mergekit-like"
RESULTS = Path(__file__).parent / "results"
LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Run:
    tool: str
    wall_s: float
    cpu_s: float  # user + system time of the command: less moved than wall time by other load
    adapter: Path

    @property
    def adapter_bytes(self) -> int:
        return (self.adapter / ADAPTER_WEIGHTS).stat().st_size


def make_models(workdir: Path, size: str) -> tuple[Path, Path]:
    models = workdir / f"models-{size}"
    if not (models / "finetune-1").is_dir():
        subprocess.run([str(OURS), "example", str(models), "--size", size, "--finetunes", "1", "--overwrite",
                        "--shard-size", "5GB"], check=True, stdout=subprocess.DEVNULL)
    return models / "base", models / "finetune-1"


def timed(tool: str, command: list[str], adapter: Path, env: dict[str, str]) -> Run:
    shutil.rmtree(adapter, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{tool} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(tool, wall, cpu, adapter)


def errors_by_type(adapter: Path, base: Path, ft: Path) -> tuple[dict[str, tuple[int, float, float]], int, int]:
    """Per module type: (modules, sum ||delta - BA||^2, sum ||delta||^2); and saved tensors: exact, all."""
    config = read_adapter_config(adapter)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    sums: dict[str, tuple[int, float, float]] = {}
    exact = saved = 0
    with open_checkpoint(base) as before, open_checkpoint(ft) as after:
        for key in tensors:
            name = key.removeprefix(PEFT_PREFIX)
            for a_suffix, b_suffix, transposed in ((LINEAR_A, LINEAR_B, False), (EMBEDDING_A, EMBEDDING_B, True)):
                if name.endswith(a_suffix):
                    module = name.removesuffix(a_suffix)
                    a, b = tensors[key].float(), tensors[PEFT_PREFIX + module + b_suffix].float()
                    product = (b @ a) * config.scaling(module, a.shape[0])
                    delta = after.read(module + ".weight").float() - before.read(module + ".weight").float()
                    missed = float((delta - (product.T if transposed else product)).norm()) ** 2
                    count, old_missed, old_total = sums.get(module.rpartition(".")[2], (0, 0.0, 0.0))
                    sums[module.rpartition(".")[2]] = (count + 1, old_missed + missed,
                                                       old_total + float(delta.norm()) ** 2)
            if ".lora_" not in name:
                saved += 1
                exact += int(torch.equal(tensors[key], after.read(name)))
    return sums, exact, saved


def relative(missed: float, total: float) -> float:
    return math.sqrt(missed / total) if total else 0.0


def report(runs: list[Run], base: Path, ft: Path, header: str) -> str:
    evaluated = {run.tool: errors_by_type(run.adapter, base, ft) for run in runs}
    found = {k for sums, _, _ in evaluated.values() for k in sums}
    kinds = [k for k in LAYER_ORDER if k in found] + sorted(found - set(LAYER_ORDER))
    reference = runs[-1].tool  # mergekit: the ratios are to it
    lines = [header, "", "relative Frobenius error ||delta - BA|| / ||delta|| per module type (lower is better)", ""]
    columns = [r.tool for r in runs]
    lines.append(f"{'module type':<12} {'modules':>7} " + " ".join(f"{c:>22}" for c in columns)
                 + "".join(f" {c + ' / ' + reference:>32}" for c in columns[:-1]))
    for kind in [*kinds, "all"]:
        cells, values = [], []
        for run in runs:
            sums = evaluated[run.tool][0]
            parts = [sums[kind]] if kind != "all" else list(sums.values())
            value = relative(sum(p[1] for p in parts), sum(p[2] for p in parts)) if parts else float("nan")
            values.append(value)
            cells.append(f"{value:>22.6f}")
            count = sum(p[0] for p in parts)
        ratios = [f" {v / values[-1]:>32.4f}" for v in values[:-1]]
        lines.append(f"{kind:<12} {count:>7} " + " ".join(cells) + "".join(ratios))
    lines += ["", f"{'tool':<22} {'wall s':>8} {'x ' + reference:>14} {'cpu s':>8} {'x ' + reference:>14} "
                  f"{'adapter MB':>11} {'saved tensors exact':>20}"]
    for run in runs:
        _, exact, saved = evaluated[run.tool]
        lines.append(f"{run.tool:<22} {run.wall_s:>8.1f} {run.wall_s / runs[-1].wall_s:>14.3f} {run.cpu_s:>8.1f} "
                     f"{run.cpu_s / runs[-1].cpu_s:>14.3f} {run.adapter_bytes / 1e6:>11.2f} {f'{exact}/{saved}':>20}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="270m", help="mergekit-like example preset: tiny, 270m, 1b")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--fast", action="store_true", help="also run ours with --fast (randomized SVD)")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every command")
    parser.add_argument("--mergekit", help="mergekit-extract-lora to compare with (default: on PATH)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and adapters here")
    parser.add_argument("--save", action="store_true", help=f"write the report to {RESULTS}/")
    parser.add_argument("--note", default="", help="a line added under the header (e.g. other load on the machine)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="extract-bench-"))
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                              if args.threads else {}))
    mergekit = mb.find_mergekit(args.mergekit, "mergekit-extract-lora", "--mergekit")
    if mergekit is None:
        sys.exit("mergekit-extract-lora is not on PATH: install mergekit 0.1.5 in a venv of its own and give "
                 "--mergekit VENV/bin/mergekit-extract-lora")
    base, ft = make_models(workdir, args.size)
    ours = [str(OURS), "extract-lora", str(ft), "--base", str(base), "--rank", str(args.rank), "--quiet"]
    runs = [timed("mergekit-like", [*ours, "-o", str(workdir / "ours")], workdir / "ours", env)]
    if args.fast:
        runs.append(timed("mergekit-like --fast", [*ours, "--fast", "-o", str(workdir / "fast")],
                          workdir / "fast", env))
    runs.append(timed("mergekit", [str(mergekit), "--model", str(ft), "--base-model", str(base), "--out-path",
                                   str(workdir / "mergekit"), "--max-rank", str(args.rank), "--quiet"],
                      workdir / "mergekit", env))
    threads = args.threads or torch.get_num_threads()
    header = (f"extract-lora benchmark: {args.size} bf16 Llama-style example (base + 1 fine-tune, full-rank "
              f"Gaussian change), rank {args.rank}, cpu, {os.cpu_count()} cores, {threads} thread(s) per command")
    text = report(runs, base, ft, header + (f"\n{args.note}" if args.note else ""))
    print(text, end="")
    if args.save:
        (RESULTS / f"extract_bench_{args.size}_cpu.txt").write_text(text)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
