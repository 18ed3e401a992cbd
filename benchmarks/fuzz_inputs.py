"""Long fuzzing run of every parser of untrusted input (the targets of tests/test_fuzz.py).

    python benchmarks/fuzz_inputs.py --examples 20000

Runs the hypothesis targets with many more examples than the test suite and prints
how many ran. A failure prints the minimal crashing input: add it to the regression
lists in tests/test_fuzz.py, then fix the parser.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fuzz_target_count() -> int:
    """How many hypothesis targets tests/test_fuzz.py holds (regression tests are plain tests)."""
    return (ROOT / "tests" / "test_fuzz.py").read_text(encoding="utf-8").count("\n@given(")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000, help="examples per fuzz target")
    args = parser.parse_args()
    env = {**os.environ, "MERGEKIT_LIKE_FUZZ_EXAMPLES": str(args.examples)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_fuzz.py"), "-k", "not regression"], env=env, cwd=ROOT)
    targets = fuzz_target_count()
    print(f"\n{targets} fuzz targets x {args.examples} examples = {targets * args.examples} inputs "
          f"in {time.perf_counter() - start:.0f} s: {'no crash' if result.returncode == 0 else 'CRASH (see above)'}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
