"""Peak memory of streaming a checkpoint through the reader and writer (an identity "merge").

The project's target: peak RSS below the interpreter's baseline plus twice the
largest tensor, for a 1B-parameter checkpoint, whatever the model's size.

    python benchmarks/copy_memory_bench.py                 # makes a 1.1B bf16 Llama-style model
    python benchmarks/copy_memory_bench.py --model DIR     # or uses yours

Each measurement runs in a fresh child process that reports its own peak RSS
(VmHWM from /proc/self/status), so nothing the parent allocated is counted: first a
baseline child that imports torch and this package and stops, then the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import mergekit_like.io as io
from mergekit_like.memory import return_freed_tensors_to_the_os
mode, src, dst = sys.argv[1:4]
if mode == "copy-low-memory":  # as `mergekit-like --low-memory` does
    return_freed_tensors_to_the_os()
t0 = time.perf_counter()
if mode.startswith("copy"):
    written = io.convert_checkpoint(src, dst, max_shard_size=io.parse_size("2GB"))
    nbytes = written.total_bytes
else:
    nbytes = 0
elapsed = time.perf_counter() - t0
# VmHWM is this address space's high-water mark; ru_maxrss would carry the parent's over exec.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss": hwm,
                  "seconds": elapsed, "bytes": nbytes}))
"""


def run_child(mode: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint to copy (default: generate one)")
    parser.add_argument("--size", default="1b", help="preset to generate: tiny, 270m, 1b")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put temporary files")
    args = parser.parse_args()

    from mergekit_like.example import PRESETS, write_model
    from mergekit_like.io import open_checkpoint

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mkl-copy-bench-") as tmp:
        tmp_path = Path(tmp)
        model = args.model
        if model is None:
            model = tmp_path / "model"
            t0 = time.perf_counter()
            write_model(model, PRESETS[args.size], max_shard_size=2 * 10**9)
            print(f"generated {args.size} model in {time.perf_counter() - t0:.1f} s")
        with open_checkpoint(model) as ckpt:
            largest = max(ckpt.entries(), key=lambda e: e.nbytes)
            params, total = ckpt.num_parameters, ckpt.total_bytes
        baseline = run_child("baseline", model, tmp_path / "unused")
        copy = run_child("copy", model, tmp_path / "copy")
        low = run_child("copy-low-memory", model, tmp_path / "copy-low")

    mb = 1e6
    bound = baseline["peak_rss"] + 2 * largest.nbytes
    rows = [
        ("parameters", f"{params / 1e9:.3f} B"),
        ("checkpoint bytes", f"{total / mb:,.0f} MB"),
        ("largest tensor", f"{largest.name} {largest.nbytes / mb:,.1f} MB"),
        ("baseline RSS (python + torch + package)", f"{baseline['peak_rss'] / mb:,.0f} MB"),
        ("peak RSS of the copy", f"{copy['peak_rss'] / mb:,.0f} MB"),
        ("copy's RSS above baseline / largest tensor", f"{(copy['peak_rss'] - baseline['peak_rss']) / largest.nbytes:.2f}x"),
        ("bound: baseline + 2 x largest", f"{bound / mb:,.0f} MB -> {'PASS' if copy['peak_rss'] < bound else 'FAIL'}"),
        ("copy wall time (warm page cache)", f"{copy['seconds']:.1f} s, {copy['bytes'] / copy['seconds'] / 1e9:.2f} GB/s"),
        ("with --low-memory: peak RSS, time", f"{low['peak_rss'] / mb:,.0f} MB "
         f"({(low['peak_rss'] - baseline['peak_rss']) / largest.nbytes:.2f}x the largest tensor), {low['seconds']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nidentity copy through reader + writer ({os.cpu_count()} cores)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
