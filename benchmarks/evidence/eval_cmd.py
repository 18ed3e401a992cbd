"""Scores one model directory: held-out next-byte loss (nats/byte) on one domain.

    python benchmarks/evidence/eval_cmd.py MODEL_DIR --domain B [--split val]

The last output line is the loss alone, so it can be the ``--eval-cmd`` of
``mergekit-like soup --greedy ... --lower-is-better``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--domain", default="B", help="python|licenses|c_headers, or A|B|C")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--windows", type=int, default=common.EVAL_WINDOWS)
    args = parser.parse_args()
    model = common.load_model(args.model)
    loss = common.evaluate(model, args.domain, args.split, max_windows=args.windows)
    print(f"{common.resolve_domain(args.domain)}/{args.split} loss (nats/byte):", file=sys.stderr)
    print(f"{loss:.6f}")


if __name__ == "__main__":
    main()
