"""Wall time and peak RSS of merges and averages: this tree against another revision, in one run.

A change that should not move performance (a reshaping of the code) is checked by running
the same commands with both trees side by side, alternately, on the same inputs:

    git worktree add /tmp/before REV && ln -s ../cli /tmp/before/mergekit_like/cli
    python benchmarks/revision_bench.py --before /tmp/before --workdir /tmp/rb --keep

* Inputs: base + 3 fine-tunes of the 270M preset (bf16), as in ``merge_bench.py`` (written
  once into the work dir); the average runs over them as a four-checkpoint trajectory
  (``step_1`` .. ``step_4``, links to the four models).
* Commands (each tree's ``mergekit-like``, started by the same launcher as merge_bench: a
  fresh process, timed alone, peak RSS from ``getrusage``): ``merge`` of the linear and TIES
  recipes of merge_bench, ``average --method ema --decay 0.9,0.99`` and ``average --method
  lawa --k 2``. The other tree runs under this Python with its source first on ``sys.path``.
* Order: before and after alternate, ``--repeat`` times each; median wall time and median peak
  RSS (on a small machine one run's start-up moves by tenths of a second and its peak RSS by
  tens of MB with the threads' timing; both ranges are printed too).
  The page cache is warmed before every run (``--cache cold`` drops it where allowed).
* Agreement: the outputs of both trees are compared tensor by tensor (they must be equal).

Prints one row per command: the two wall times and peak RSS figures and their ratios
(after / before).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import merge_bench as mb

# Runs the other tree's command line: its source first on sys.path, then its own main().
OTHER_TREE = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
from mergekit_like.cli.main import main
sys.argv[0] = "mergekit-like"
sys.exit(main())
"""

def recipes(workdir: Path) -> dict[str, Path]:
    """The merge recipes of merge_bench (linear and ties), written into the work dir."""
    dirs = mb.model_dirs(workdir)
    fts = [str(dirs[f"ft{i}"]) for i in range(1, mb.NUM_FINETUNES + 1)]
    written = {}
    linear = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, [0.5, 0.3, 0.2])]}
    ties = {"merge_method": "ties", "base_model": str(dirs["base"]), "dtype": "float32", "out_dtype": "bfloat16",
            "parameters": {"density": 0.5},
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, [1.0, 0.6, 0.3])]}
    for name, recipe in (("linear", linear), ("ties", ties)):
        path = workdir / f"{name}.yml"
        path.write_text(json.dumps(recipe, indent=1) + "\n")  # JSON is YAML
        written[name] = path
    return written


def trajectory(workdir: Path) -> Path:
    """A run directory whose checkpoints step_1..step_4 are the four models."""
    run = workdir / "run"
    run.mkdir(exist_ok=True)
    dirs = mb.model_dirs(workdir)
    for step, key in enumerate(["base", "ft1", "ft2", "ft3"], 1):
        link = run / f"step_{step}"
        if not link.exists():
            link.symlink_to(dirs[key], target_is_directory=True)
    return run


def commands(workdir: Path) -> dict[str, list[str]]:
    """The argument lists (after ``mergekit-like``) of every benchmarked command, by name."""
    written = recipes(workdir)
    run = trajectory(workdir)
    return {
        "merge linear": ["merge", str(written["linear"])],
        "merge ties": ["merge", str(written["ties"])],
        "average ema": ["average", str(run), "--method", "ema", "--decay", "0.9,0.99"],
        "average lawa": ["average", str(run), "--method", "lawa", "--k", "2"],
    }


def run_once(tree: str, prefix: list[str], args: list[str], out: Path, workdir: Path, cache: str,
             inputs: list[Path]) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    mb.prepare_cache(cache, inputs)
    run = mb.Run(tree, args[0], "cpu")
    mb.measure(run, [*prefix, *args, "-o", str(out), "--quiet"], workdir)
    if run.error:
        sys.exit(f"{tree}: {' '.join(args)}: {run.error}")
    return run.seconds[0], run.maxrss[0]


def same_outputs(a: Path, b: Path) -> bool:
    pairs = [(a, b)] if (a / "model.safetensors").exists() or any(a.glob("*.safetensors")) else [
        (a / d.name, b / d.name) for d in sorted(a.iterdir()) if d.is_dir()]
    for x, y in pairs:
        result = mb.compare(x, y)
        if result["differing"] or result["only_a"] or result["only_b"] or result["dtype_mismatch"]:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other tree (a git worktree)")
    parser.add_argument("--workdir", type=Path, help="models and outputs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="reuse models in --workdir and keep them")
    parser.add_argument("--repeat", type=int, default=2, help="runs per tree and command")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--only", help="comma list of command names to run")
    parser.add_argument("--save", type=Path, help="also append the table to this file")
    args = parser.parse_args()
    if args.cache == "cold" and not mb.can_drop_caches():
        sys.exit("--cache cold needs permission to write /proc/sys/vm/drop_caches")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="revision-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    mb.prepare_inputs(workdir, "270m", 2 * 10**9, reuse=args.keep)
    ours = mb.find_ours(None)
    trees = {"before": [sys.executable, "-c", OTHER_TREE, str(args.before.resolve())], "after": [str(ours)]}
    inputs = sorted(p for d in mb.model_dirs(workdir).values() for p in d.glob("*.safetensors"))
    wanted = commands(workdir)
    if args.only:
        wanted = {k: v for k, v in wanted.items() if k in args.only.split(",")}
    lines = [f"{'command':<14} {'before s':>9} {'after s':>9} {'ratio':>6} {'before MB':>10} {'after MB':>9} "
             f"{'ratio':>6}  same bytes  ranges"]
    for name, argv in wanted.items():
        walls: dict[str, list[float]] = {"before": [], "after": []}
        rss: dict[str, list[int]] = {"before": [], "after": []}
        for _ in range(args.repeat):
            for tree, prefix in trees.items():
                out = workdir / "out" / tree / name.replace(" ", "-")
                seconds, peak = run_once(tree, prefix, argv, out, workdir, args.cache, inputs)
                walls[tree].append(seconds)
                rss[tree].append(peak)
        same = same_outputs(workdir / "out" / "before" / name.replace(" ", "-"),
                            workdir / "out" / "after" / name.replace(" ", "-"))
        b, a = statistics.median(walls["before"]), statistics.median(walls["after"])
        rb, ra = statistics.median(rss["before"]), statistics.median(rss["after"])
        spread = "  ".join(f"{tree} {min(walls[tree]):.2f}-{max(walls[tree]):.2f} s, "
                           f"{min(v) / 1e6:.0f}-{max(v) / 1e6:.0f} MB" for tree, v in rss.items())
        lines.append(f"{name:<14} {b:>9.2f} {a:>9.2f} {a / b:>6.3f} {rb / 1e6:>10.0f} {ra / 1e6:>9.0f} "
                     f"{ra / rb:>6.3f}  {'yes' if same else 'NO':<10}  {spread}")
        print(lines[-1], flush=True)
    header = (f"revision_bench: 270m, {args.repeat} run(s) per tree, {args.cache} cache, "
              f"{os.cpu_count()} cores; ratio = after / before")
    print("\n".join([header, *lines]))
    if args.save:  # appended: a run per group of commands, each with its own repeat count
        with args.save.open("a") as saved:
            saved.write("\n".join([header, *lines]) + "\n\n")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
