"""Scores one model directory: held-out next-byte loss (nats/byte) on one domain.

    python benchmarks/evidence/eval_cmd.py MODEL_DIR --domain B [--split val]
    python benchmarks/evidence/eval_cmd.py MODEL_DIR --domain all    # the mean over A, B, C

The last output line is the loss alone, so it can be the ``--eval-cmd`` of
``mergekit-like soup --greedy ... --lower-is-better`` or of ``mergekit-like search
... --direction minimize``.
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
    parser.add_argument("--domain", default="B", help="python|licenses|c_headers, A|B|C, or all (their mean)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--windows", type=int, default=common.EVAL_WINDOWS)
    args = parser.parse_args()
    model = common.load_model(args.model)
    domains = ("python", "licenses", "c_headers") if args.domain == "all" else (args.domain,)
    loss = sum(common.evaluate(model, d, args.split, max_windows=args.windows) for d in domains) / len(domains)
    print(f"{'+'.join(common.resolve_domain(d) for d in domains)}/{args.split} mean loss (nats/byte):",
          file=sys.stderr)
    print(f"{loss:.6f}")


if __name__ == "__main__":
    main()
