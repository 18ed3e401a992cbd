"""Peak memory of merging a checkpoint whose one tensor is larger than the memory budget many times over.

The project's target: a merge's peak RSS stays within 1.5x of ``--memory-budget`` plus the
interpreter's baseline, whatever the largest tensor. This writes a synthetic bf16 checkpoint
(base + fine-tunes) whose embedding alone is ``--gib`` GiB (default 4: 131072 x 16384), then
merges it with each method under the budget:

    python benchmarks/large_tensor_bench.py --workdir /tmp/big --keep
    python benchmarks/large_tensor_bench.py --gib 0.25 --methods ties_index   # a quick look

Each run is our command line in a fresh process started by merge_bench's launcher (peak RSS
from getrusage). The baseline is the same command with ``--dry-run``: the interpreter, torch,
this package and the plan, but no tensor read. The page cache is left as it is (the inputs
are larger than a small machine's cache would hold twice anyway). mergekit is not run: it
holds every tensor whole, so this checkpoint measures only the tensor's size in its memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import merge_bench as mb

COLUMNS = 16384
# Rows written per step while generating: 256 MiB of bf16 at a time.
WRITE_ROWS = 8192
TARGET = 1.5
RECIPES = {
    "linear": "merge_method: linear\ndtype: bfloat16\nmodels:\n{models}",
    "ties_index": ("merge_method: ties\nbase_model: {base}\ndtype: bfloat16\n"
                   "parameters: {{trim_ties: index}}\nmodels:\n{models}"),
    "ties_keep": ("merge_method: ties\nbase_model: {base}\ndtype: bfloat16\n"
                  "parameters: {{trim_ties: keep}}\nmodels:\n{models}"),
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\ndtype: bfloat16\nmodels:\n{models}",
    "ties_rescale": ("merge_method: ties\nbase_model: {base}\ndtype: bfloat16\n"
                     "parameters: {{trim_ties: index, rescale: true}}\nmodels:\n{models}"),
    "della": "merge_method: della\nbase_model: {base}\ndtype: bfloat16\nmodels:\n{models}",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\ndtype: bfloat16\nmodels:\n{models}",
    "slerp": "merge_method: slerp\nbase_model: {base}\ndtype: bfloat16\nparameters: {{t: 0.4}}\nmodels:\n{models}",
    "nuslerp_rows": ("merge_method: nuslerp\nbase_model: {base}\ndtype: bfloat16\n"
                     "parameters: {{nuslerp_flatten: false}}\nmodels:\n{models}"),
}
MODEL_PARAMS = {"linear": "{{weight: 1.0}}", "ties_index": "{{weight: 1.0, density: 0.5}}",
                "ties_keep": "{{weight: 1.0, density: 0.5}}", "dare_ties": "{{weight: 1.0, density: 0.5}}",
                "ties_rescale": "{{weight: 1.0, density: 0.5}}", "della": "{{weight: 1.0, density: 0.5, epsilon: 0.1}}",
                "model_stock": "{{}}", "slerp": "{{}}", "nuslerp_rows": "{{weight: 1.0}}"}
# Methods that take exactly one model besides the base.
ONE_MODEL = {"slerp"}


def write_synthetic(path: Path, rows: int, seed: int, base: Path | None) -> None:
    """A one-shard safetensors checkpoint: ``model.embed_tokens.weight`` (rows x COLUMNS bf16) and a
    norm, written a slab at a time; a fine-tune is the base plus small noise."""
    path.mkdir(parents=True, exist_ok=True)
    names = {"model.embed_tokens.weight": (rows, COLUMNS), "model.norm.weight": (COLUMNS,)}
    header: dict[str, object] = {}
    offset = 0
    for name, shape in names.items():
        size = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    base_file = open(base / "model.safetensors", "rb") if base is not None else None
    base_start = 8 + struct.unpack("<Q", base_file.read(8))[0] if base_file is not None else 0
    with open(path / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        generator = torch.Generator().manual_seed(seed)
        written = 0
        for start in range(0, rows, WRITE_ROWS):
            block = torch.randn(min(WRITE_ROWS, rows - start), COLUMNS, generator=generator) * 0.02
            if base_file is not None:
                base_file.seek(base_start + written)
                raw = bytearray(base_file.read(block.numel() * 2))
                block = torch.frombuffer(raw, dtype=torch.bfloat16).reshape(block.shape).float() + block * 0.05
            data = block.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            out.write(data)
            written += len(data)
        out.write(torch.ones(COLUMNS, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    if base_file is not None:
        base_file.close()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "vocab_size": rows, "hidden_size": COLUMNS}))


def recipe_text(method: str, base: Path, finetunes: list[Path]) -> str:
    params = MODEL_PARAMS[method].format()
    models = "".join(f"  - model: {p}\n    parameters: {params}\n"
                     for p in (finetunes[:1] if method in ONE_MODEL else finetunes))
    if method == "linear":
        models = f"  - model: {base}\n    parameters: {params}\n" + models
    return RECIPES[method].format(base=base, models=models) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="size of the one large tensor, in GiB")
    parser.add_argument("--finetunes", type=int, default=2, help="fine-tunes besides the base")
    parser.add_argument("--methods", default="linear,ties_index,ties_keep,dare_ties",
                        help=f"comma list of: {', '.join(RECIPES)}")
    parser.add_argument("--memory-budget", default="256MiB", help="passed to mergekit-like merge")
    parser.add_argument("--low-memory", action="store_true", help="run our CLI with --low-memory too (a second row)")
    parser.add_argument("--mergekit-like", help="our CLI (default: next to this Python)")
    parser.add_argument("--workdir", type=Path, help="where models and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (models are reused next time)")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in RECIPES:
            parser.error(f"unknown method {m!r} (known: {', '.join(RECIPES)})")
    from mergekit_like.io.sharding import parse_size

    budget = parse_size(args.memory_budget)
    ours = mb.find_ours(args.mergekit_like)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="large-tensor-bench-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    rows = int(args.gib * 2**30 / (2 * COLUMNS))
    base = workdir / "base"
    finetunes = [workdir / f"finetune-{i + 1}" for i in range(args.finetunes)]
    marker = workdir / "inputs.json"
    wanted = {"rows": rows, "columns": COLUMNS, "finetunes": args.finetunes}
    if not marker.exists() or json.loads(marker.read_text()) != wanted:
        print(f"writing base + {args.finetunes} fine-tunes, {rows} x {COLUMNS} bf16 ({args.gib:g} GiB each) ...",
              flush=True)
        write_synthetic(base, rows, 0, None)
        for i, path in enumerate(finetunes):
            write_synthetic(path, rows, i + 1, base)
        marker.write_text(json.dumps(wanted))
    lines = [f"large-tensor benchmark: one {rows} x {COLUMNS} bf16 tensor ({args.gib:g} GiB) per model, base + "
             f"{args.finetunes} fine-tunes; --memory-budget {args.memory_budget} ({budget / 2**20:,.0f} MiB)",
             f"  mergekit-like at {ours}", ""]
    header = (f"{'method':<26} {'wall s':>7} {'peak RSS MB':>12} {'baseline MB':>12} {'budget+baseline MB':>19} "
              f"{'ratio':>6} {'target':>14}")
    lines += [header, "-" * len(header)]
    settings = [("", [])] + ([(" (--low-memory)", ["--low-memory"])] if args.low_memory else [])
    for method, (label, flags) in [(m, s) for m in methods for s in settings]:
        recipe = workdir / f"{method}.yml"
        recipe.write_text(recipe_text(method, base, finetunes))
        out = workdir / "out" / method
        shutil.rmtree(out, ignore_errors=True)
        dry = mb.Run(mb.OURS, f"{method}-dry-run", "cpu")
        mb.measure(dry, [str(ours), *flags, "merge", str(recipe), "-o", str(out), "--dry-run", "--quiet"], workdir)
        run = mb.Run(mb.OURS, method + label.replace(" ", "_"), "cpu")
        mb.measure(run, [str(ours), *flags, "merge", str(recipe), "-o", str(out), "--quiet", "--device", "cpu",
                         "--memory-budget", args.memory_budget], workdir)
        method = method + label
        if run.error or dry.error:
            lines.append(f"{method:<26} failed: {run.error or dry.error}")
            continue
        bound = budget + dry.rss
        ratio = run.rss / bound
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        lines.append(f"{method:<26} {run.wall:>7.1f} {run.rss / 1e6:>12,.0f} {dry.rss / 1e6:>12,.0f} "
                     f"{bound / 1e6:>19,.0f} {ratio:>6.2f} {f'<={TARGET} {verdict}':>14}")
        print(lines[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\n".join(lines))
    if args.save:
        args.save.write_text("\n".join(lines) + "\n")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
