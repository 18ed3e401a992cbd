"""The eval command of the search tests: minus the distance of a merge to a target checkpoint.

``--kill-after N --counter FILE``: on call N + 1, kill the search that runs this command (the
shell's parent) with SIGKILL, as an out-of-memory kill or a lost node would.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

# numpy, not torch: every trial starts this script, and numpy loads in a tenth of torch's time.
import numpy as np
from safetensors.numpy import load_file

parser = argparse.ArgumentParser()
parser.add_argument("merged")
parser.add_argument("target")
parser.add_argument("--kill-after", type=int)
parser.add_argument("--counter")
args = parser.parse_args()
if args.kill_after is not None:
    counter = Path(args.counter)
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls > args.kill_after:
        import psutil

        os.kill(psutil.Process(os.getppid()).ppid(), signal.SIGKILL)
        raise SystemExit(1)
merged = load_file(Path(args.merged) / "model.safetensors")
target = load_file(Path(args.target) / "model.safetensors")
print(-sum(float(np.linalg.norm(merged[k] - target[k])) for k in target))
