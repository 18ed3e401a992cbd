"""Start-up time of the CLI: what a user waits for ``--help`` and ``--version``.

Each figure is the median wall time of fresh processes (the interpreter's start included),
run one after another, of:

- ``mergekit-like --help`` and ``mergekit-like --version``: import no command, so no torch
  (target: under 0.5 s);
- ``mergekit-like merge --help``: imports the merge command, and with it torch.

The console script beside this interpreter is used when installed (``make install``), else
the same entry point through ``python -c``. Figures vary with the machine's load and its
page cache: the first run of a cold cache is slower, which is why the median is given.

    python benchmarks/startup_bench.py
    python benchmarks/startup_bench.py --runs 11
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["--version"], ["merge", "--help"])


def console_script() -> list[str]:
    """How to run ``mergekit-like``: the installed script, else its entry point through this interpreter."""
    script = Path(sys.executable).with_name("mergekit-like")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from mergekit_like.cli.entry import main; main()"]


def wall_times(command: list[str], runs: int) -> list[float]:
    """Seconds each of ``runs`` fresh processes of ``command`` took, from start to exit."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes per command (default 5).")
    args = parser.parse_args()
    base = console_script()
    print(f"{'command':<28} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} fresh processes each)")
    for words in COMMANDS:
        times = wall_times([*base, *words], args.runs)
        label = " ".join(["mergekit-like", *words])
        print(f"{label:<28} {statistics.median(times):>7.2f}s {min(times):>7.2f}s {max(times):>7.2f}s")


if __name__ == "__main__":
    main()
