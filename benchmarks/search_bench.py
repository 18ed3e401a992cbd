"""Trials per minute of ``mergekit-like search``: one at a time, --workers 2, a Ray cluster, --batch.

All in one run, on the same inputs and the same eval command:

* Inputs: a base and three fine-tunes (float32, ``--tensors`` tensors of 1024 x 1024 each,
  4 MiB a tensor), written once into the work dir and read from the page cache.
* The eval command: a small script (no torch import) that reads one tensor of the candidate
  and prints a number: the cost of starting a real evaluator, not of running one. Real
  evaluations (a benchmark on a GPU) take longer, which only makes ``--workers`` and Ray pay
  more and the batch's saving a smaller share.
* Modes, each ``--trials`` trials of a random-sampler search over the three task-arithmetic
  weights: in this process one at a time; ``--workers 2``; as Ray tasks on a real local
  cluster (``ray start --head`` on 127.0.0.1 with 2 CPUs, skipped without Ray); and
  ``--batch 4`` (four candidates merged per read pass), for task arithmetic (linear in its
  weights) and for TIES (a sort per tensor and candidate: the kernel, not the reads, is the
  cost, so the batch saves less). The batch saves reads, which the page cache makes cheap
  here; ``cold inputs`` runs evict the inputs from the page cache after every evaluation
  (``posix_fadvise``), as for models larger than the memory or on network storage, so each
  read pass is from the disk.

Prints trials per minute per mode, each against its group's one at a time, and the seconds per trial.

    python benchmarks/search_bench.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_like.search import SearchSettings, run_search, space_from
from mergekit_like.soup import command_evaluator

EVAL_SCRIPT = """
import os, sys
from safetensors import safe_open
with safe_open(sys.argv[1] + "/model.safetensors", "np") as f:
    score = float(f.get_slice("layer.0")[0:4].sum())
for path in sys.argv[2:]:  # the inputs, dropped from the page cache: the next read pass is from the disk
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
print(score)
"""


def make_models(root: Path, tensors: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"layer.{i}": torch.randn(1024, 1024, generator=g) for i in range(tensors)}
    for name in ("base", "ft0", "ft1", "ft2"):
        model = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file(model, root / name / "model.safetensors")


def space(root: Path, method: str) -> dict:
    weight = {"search": "uniform", "low": 0.0, "high": 1.0}
    extra = {"parameters": {"density": 0.5}} if method == "ties" else {}
    return {"merge_method": method, "base_model": str(root / "base"), "dtype": "float32", **extra,
            "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": dict(weight)}} for i in range(3)]}


def timed(root: Path, name: str, method: str, trials: int, *, cold: bool = False, **settings: object) -> float:
    evict = " ".join(str(root / m / "model.safetensors") for m in ("base", "ft0", "ft1", "ft2")) if cold else ""
    evaluate = command_evaluator(f"{sys.executable} {root / 'eval.py'} {{path}} {evict}", timeout=600)
    started = time.perf_counter()
    result = run_search(space_from(space(root, method)), evaluate, root / f"search-{name}",
                        SearchSettings(trials=trials, sampler="random", **settings))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    assert len(result.records) == trials and all(r.score is not None for r in result.records), name
    return seconds


def ray_cluster(temp: Path) -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
               "--temp-dir", str(temp)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--tensors", type=int, default=16, help="1024 x 1024 float32 tensors per model")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="search-bench-"))
    ray_temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    make_models(root, args.tensors)
    (root / "eval.py").write_text(EVAL_SCRIPT)
    torch.set_num_threads(2)
    rows: list[tuple[str, str, float]] = []  # (group, mode, seconds); each group's first is its reference
    ta, cold, ties = "task_arithmetic", "task_arithmetic, cold inputs", "ties"
    try:
        rows.append((ta, "one at a time", timed(root, "one", ta, args.trials)))
        rows.append((ta, "--workers 2", timed(root, "workers", ta, args.trials, workers=2)))
        address = ray_cluster(ray_temp)
        if address is not None:
            rows.append((ta, "Ray (local cluster, 2 CPUs)", timed(root, "ray", ta, args.trials, ray_address=address)))
        rows.append((ta, "--batch 4", timed(root, "batch", ta, args.trials, batch=4)))
        rows.append((cold, "one at a time", timed(root, "cold-one", ta, args.trials, cold=True)))
        rows.append((cold, "--batch 4", timed(root, "cold-batch", ta, args.trials, cold=True, batch=4)))
        rows.append((ties, "one at a time", timed(root, "ties-one", ties, args.trials)))
        rows.append((ties, "--batch 4", timed(root, "ties-batch", ties, args.trials, batch=4)))
    finally:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
        shutil.rmtree(ray_temp, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{args.trials} trials per mode; 4 models of {args.tensors * 4} MiB (float32), eval: a process reading "
          f"one tensor; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'inputs and method':<30} {'mode':<30} {'trials/min':>10} {'s/trial':>8} {'vs one at a time':>17}")
    for group, mode, seconds in rows:
        reference = next(s for g, _, s in rows if g == group)
        print(f"{group:<30} {mode:<30} {60 * args.trials / seconds:>10.1f} {seconds / args.trials:>8.2f} "
              f"{reference / seconds:>16.2f}x")


if __name__ == "__main__":
    main()
