"""Wall time and peak RSS of whole merges, ours against mergekit's and against the read floor.

The project's targets for 3 fine-tunes + base of a ~270M-parameter bf16 Llama-style model
on a 2-core machine: mergekit-like's peak RSS at most a third of mergekit's; linear at least
2x faster than mergekit and within 1.5x of the read floor; ties at least 5x faster than
mergekit on CPU.

    python benchmarks/merge_bench.py                        # 270m, linear + ties, cpu
    python benchmarks/merge_bench.py --size tiny --methods linear
    python benchmarks/merge_bench.py --workdir /tmp/mb --keep   # reuse the generated models
    python benchmarks/merge_bench.py --devices cpu,cuda --mergekit-yaml /path/to/mergekit-yaml

How it measures:

* Inputs: base + 3 fine-tunes from ``mergekit_like.example.write_model`` (random, deterministic
  weights; bf16; one safetensors shard each), written once by a child process into the work dir.
* Recipes: the SAME YAML text is given to both tools. It sets ``dtype: float32`` (merge in fp32,
  which both tools do the same way) and ``out_dtype: bfloat16`` (write bf16, as the inputs are),
  so neither tool is asked for more or less arithmetic than the other. linear: weights 0.5/0.3/0.2
  (normalized, mergekit's default); ties: base + 3, density 0.5, weights 1/0.6/0.3.
* Commands: ``mergekit-like merge R.yml -o OUT --quiet --device D`` and
  ``mergekit-yaml R.yml OUT --quiet --no-copy-tokenizer --device D`` (``--cuda --read-to-gpu``
  too on cuda),
  everything else at each tool's defaults (mergekit's lazy unpickle only affects .bin inputs).
* Each run is a fresh process started by a tiny launcher interpreter, which times it
  (perf_counter around the child alone) and reports getrusage(RUSAGE_CHILDREN).ru_maxrss: the
  child is forked from the ~10 MB launcher, so its peak RSS does not inherit this script's.
* Page cache: ``--cache cold`` (the default where this process may write
  /proc/sys/vm/drop_caches) drops it before every run, so every run reads from the disk;
  ``--cache warm`` reads the run's inputs once before it instead. GB/s = input bytes / wall.
* Read floor: the time a fresh process takes to read the same input files (16 MB reads, in
  storage order), under the same cache condition, best of ``--repeat``; "x floor" is a run's
  wall time over the floor of its inputs.
* Startup: the time a fresh process of each tool's Python takes to import its command line
  (``mergekit_like.cli.main``; ``mergekit.scripts.run_yaml``), torch included, under the same
  cache condition (a cold cache drops torch's own files too), best of ``--repeat``. A command
  cannot finish before it has started and read its inputs, so "x (startup + floor)" is the
  wall time over that sum: the ratio to the limit a command-line run can reach.
* Agreement: both tools' outputs are loaded with safetensors (in a child process) and compared
  tensor by tensor: max abs difference, and max difference in bf16 units in the last place.

Runs are a list of (tool, method, device) so GPU rows come from ``--devices cpu,cuda``
(cuda rows only where torch.cuda.is_available()). A cuda row also reports the peak GPU memory
in use (nvidia-smi, sampled every 50 ms, over the value before the run, CUDA context included)
and is checked against the project's H100 targets: within 1.25x of the read floor (linear, ties
and ties_index),
at least 4x faster than mergekit's ``--cuda --read-to-gpu``, peak RSS under 1.5 GB, peak GPU
memory under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

OURS, MERGEKIT = "mergekit-like", "mergekit"
NUM_FINETUNES = 3
# The project's targets, by device: minimum speedup over mergekit per method (on cuda, over
# mergekit's --cuda --read-to-gpu); the most a run may take as a multiple of the time to read its
# inputs; on cuda, the most peak RSS and peak GPU memory (set for a 16-core H100, 1.26B model).
SPEEDUP_TARGETS = {
    # Exact TIES keeps mergekit's full sort (its tie order), so its target is lower.
    "cpu": {"linear": 2.0, "ties": 2.0, "ties_index": 5.0, "ties_keep": 5.0, "dare_ties": 3.0, "dare_linear": 3.0,
            "breadcrumbs": 3.0, "breadcrumbs_ties": 3.0, "model_stock": 3.0},
    "cuda": {"linear": 4.0, "task_arithmetic": 4.0, "ties": 4.0, "ties_index": 4.0, "ties_keep": 4.0},
}
FLOOR_TARGETS = {"cpu": {"linear": 1.5}, "cuda": {"linear": 1.25, "ties": 1.25, "ties_index": 1.25}}
CUDA_RSS_TARGET = 1.5e9
CUDA_GPU_MEMORY_TARGET = 2e9
# Rows of ours only, compared with mergekit's row of another method: ties_index is TIES with
# trim_ties: index (exactly k kept, ties at the threshold by position: a selection instead of
# mergekit's full sort); ties_keep keeps every entry tied at the threshold.
BASELINE_OF = {"ties_index": "ties", "ties_keep": "ties"}
RSS_FRACTION_TARGET = 1 / 3

GENERATE = r"""
import json, sys, time
from pathlib import Path
import torch
from mergekit_like.example import PRESETS, write_model
workdir, size, shard, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
for name, finetune in [("base", None)] + [(f"finetune-{i}", i) for i in range(1, n + 1)]:
    write_model(workdir / name, PRESETS[size], finetune=finetune, dtype=torch.bfloat16,
                max_shard_size=shard, overwrite=True)
    print(f"  wrote {name}", flush=True)
print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
"""

# Runs argv[2:] and writes {"seconds", "maxrss_kb", "gpu_peak_mb", "rc"} to argv[1]. Kept
# import-light. With MKL_BENCH_GPU set, a thread samples the used memory of the GPU torch calls
# cuda:0 (nvidia-smi, 50 ms apart) and reports the peak over the value before the run: the
# child's CUDA context included, since per-process figures are often hidden inside containers.
LAUNCHER = r"""
import json, os, resource, subprocess, sys, threading, time

GPU = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]  # the one torch calls cuda:0

def gpu_used_mb():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", GPU],
                             capture_output=True, text=True)
        return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError):  # no nvidia-smi; "[N/A]" under MIG
        return None

samples, done = [], threading.Event()
def sample():
    while not done.wait(0.05):
        samples.append(gpu_used_mb())
baseline = gpu_used_mb() if os.environ.get("MKL_BENCH_GPU") else None
sampler = threading.Thread(target=sample, daemon=True)
if baseline is not None:
    sampler.start()
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - t0
done.set()
maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak = max([s for s in samples if s is not None], default=None)
gpu_peak_mb = peak - baseline if baseline is not None and peak is not None else None
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "maxrss_kb": maxrss_kb, "gpu_peak_mb": gpu_peak_mb, "rc": rc}, f)
"""

COMPARE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open

def index(directory):
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = path
    return out

a, b = index(sys.argv[1]), index(sys.argv[2])
result = {"only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)),
          "dtype_mismatch": [], "max_abs": 0.0, "max_ulp": 0, "differing": 0, "elements": 0}
for key in sorted(set(a) & set(b)):
    with safe_open(str(a[key]), "pt") as fa, safe_open(str(b[key]), "pt") as fb:
        x, y = fa.get_tensor(key), fb.get_tensor(key)
    if x.dtype != y.dtype or x.shape != y.shape:
        result["dtype_mismatch"].append(f"{key}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        continue
    result["elements"] += x.numel()
    diff = (x.float() - y.float()).abs()
    result["max_abs"] = max(result["max_abs"], float(diff.max()) if diff.numel() else 0.0)
    result["differing"] += int((x != y).sum())
    if x.dtype in (torch.bfloat16, torch.float16):
        # Distance in units in the last place: order-preserving integer view of the bits.
        def ordered(t):
            i = t.view(torch.int16).to(torch.int32)
            return torch.where(i < 0, -32768 - i, i)
        ulp = (ordered(x) - ordered(y)).abs()
        result["max_ulp"] = max(result["max_ulp"], int(ulp.max()) if ulp.numel() else 0)
print(json.dumps(result))
"""

RECIPES = {
    "linear": """\
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
  - model: {ft3}
    parameters: {{weight: 0.2}}
dtype: float32
out_dtype: bfloat16
""",
    "ties": """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.3, density: 0.5}}
dtype: float32
out_dtype: bfloat16
""",
}
RECIPES["task_arithmetic"] = (RECIPES["ties"].replace("merge_method: ties", "merge_method: task_arithmetic")
                               .replace(", density: 0.5", ""))
RECIPES["ties_index"] = RECIPES["ties"] + "parameters: {{trim_ties: index}}\n"
RECIPES["ties_keep"] = RECIPES["ties"] + "parameters: {{trim_ties: keep}}\n"
# Methods of the task-vector family with their own parameters: base + 3, weights as for ties.
for _method, _params in (("della", ", density: 0.5, epsilon: 0.1"), ("della_linear", ", density: 0.5, epsilon: 0.1"),
                         ("multislerp", "")):
    RECIPES[_method] = (RECIPES["ties"].replace("merge_method: ties", f"merge_method: {_method}")
                        .replace(", density: 0.5", _params))
for _method, _params in (("sce", "select_topk: 0.5"), ("ram", "epsilon: 1.0e-5"), ("ramplus_tl", "r: 0.1")):
    RECIPES[_method] = (RECIPES["ties"].replace("merge_method: ties", f"merge_method: {_method}")
                        .replace("\n    parameters: {{weight: 1.0, density: 0.5}}", "")
                        .replace("\n    parameters: {{weight: 0.6, density: 0.5}}", "")
                        .replace("\n    parameters: {{weight: 0.3, density: 0.5}}", "")
                        + f"parameters: {{{{{_params}}}}}\n")
# sce without a selection (every entry kept): the one that merges large tensors in row blocks.
RECIPES["sce_all"] = RECIPES["sce"].replace("select_topk: 0.5", "select_topk: 1.0")
# The whole-tensor methods of the task-vector family, base + 3 as ties (DARE draws from a seeded generator).
for _method, _params in (("dare_ties", ", density: 0.5"), ("dare_linear", ", density: 0.5"),
                         ("breadcrumbs", ", density: 0.5, gamma: 0.01"),
                         ("breadcrumbs_ties", ", density: 0.5, gamma: 0.01")):
    RECIPES[_method] = (RECIPES["ties"].replace("merge_method: ties", f"merge_method: {_method}")
                        .replace(", density: 0.5", _params))
RECIPES["model_stock"] = (RECIPES["ties"].replace("merge_method: ties", "merge_method: model_stock")
                          .replace("\n    parameters: {{weight: 1.0, density: 0.5}}", "")
                          .replace("\n    parameters: {{weight: 0.6, density: 0.5}}", "")
                          .replace("\n    parameters: {{weight: 0.3, density: 0.5}}", ""))
RECIPES["karcher"] = RECIPES["linear"].replace("merge_method: linear", "merge_method: karcher").replace(
    "\n    parameters: {{weight: 0.5}}", "").replace("\n    parameters: {{weight: 0.3}}", "").replace(
    "\n    parameters: {{weight: 0.2}}", "")
RECIPES.update({
    "nuslerp": """\
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: 0.4}}
dtype: float32
out_dtype: bfloat16
""",
    "slerp": """\
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters: {{t: 0.4}}
dtype: float32
out_dtype: bfloat16
""",
    "nearswap": """\
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters: {{t: 0.001}}
dtype: float32
out_dtype: bfloat16
""",
    "arcee_fusion": """\
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
dtype: float32
out_dtype: bfloat16
""",
    # A frankenmerge: two thirds of ft1's layers, then the last two thirds of ft2's (4/3 the layers).
    "passthrough_stack": """\
merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, {two_thirds}]
  - sources:
      - model: {ft2}
        layer_range: [{one_third}, {layers}]
dtype: bfloat16
""",
})
# Layers of each model preset (mergekit_like.example.PRESETS), for the frankenmerge's ranges.
LAYERS = {"tiny": 4, "270m": 16, "1b": 22}
# The models each recipe reads (the read floor is the time to read their files).
INPUTS = {"linear": ("ft1", "ft2", "ft3"), "karcher": ("ft1", "ft2", "ft3"), "nuslerp": ("base", "ft1", "ft2"),
          "nearswap": ("base", "ft1"), "arcee_fusion": ("base", "ft1"), "passthrough_stack": ("ft1", "ft2")}
# Methods whose numbers depend on random draws: mergekit's come from its global generator, ours
# from the run's seed and each tensor's name, so outputs agree in distribution, not bit for bit.
RANDOM = {"della", "della_linear"}
# Arcee Fusion samples the quantiles of a tensor over 1,000,000 entries: there too the draws differ.
SAMPLED = {"arcee_fusion"}


@dataclass
class Run:
    tool: str
    method: str
    device: str
    seconds: list[float] = field(default_factory=list)
    maxrss: list[int] = field(default_factory=list)  # bytes
    gpu_peak: list[int] = field(default_factory=list)  # bytes, cuda runs where nvidia-smi answers
    input_bytes: int = 0
    output: Path | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.tool}-{self.method}-{self.device}"

    @property
    def wall(self) -> float:
        return min(self.seconds)

    @property
    def rss(self) -> int:
        return max(self.maxrss)

    @property
    def kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"


def find_mergekit(arg: str | None, command: str = "mergekit-yaml", option: str = "--mergekit-yaml") -> Path | None:
    """mergekit's ``command``: the one ``option`` names (it must exist), else the one on PATH, else None."""
    if arg:
        path = shutil.which(arg) or (arg if Path(arg).exists() else None)
        if path is None:
            sys.exit(f"{option} {arg}: not found")
        return Path(path)
    found = shutil.which(command)
    return Path(found) if found else None


def find_ours(arg: str | None) -> Path:
    candidates = [arg] if arg else [str(Path(sys.executable).parent / OURS), OURS]
    for c in candidates:
        path = shutil.which(c) or (c if Path(c).exists() else None)
        if path:
            return Path(path)
    sys.exit(f"cannot find the {OURS} command; give --mergekit-like PATH")


def interpreter_of(script: Path) -> str:
    """The Python a console script runs under (its shebang), else this one."""
    try:
        first = script.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return sys.executable
    return first[2:].strip().split()[0] if first.startswith("#!") and "python" in first else sys.executable


def version_of(python: str, dist: str) -> str:
    out = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def cuda_available(python: str) -> bool:
    out = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def model_dirs(workdir: Path) -> dict[str, Path]:
    dirs = {"base": workdir / "base"}
    dirs.update({f"ft{i}": workdir / f"finetune-{i}" for i in range(1, NUM_FINETUNES + 1)})
    return dirs


def prepare_inputs(workdir: Path, size: str, shard: int, reuse: bool) -> None:
    marker = workdir / "bench-inputs.json"
    wanted = {"size": size, "finetunes": NUM_FINETUNES, "max_shard_size": shard, "dtype": "bfloat16"}
    if reuse and marker.exists() and json.loads(marker.read_text()) == wanted and all(
        (d / "config.json").exists() for d in model_dirs(workdir).values()
    ):
        print(f"reusing the {size} models in {workdir}")
        return
    print(f"generating base + {NUM_FINETUNES} fine-tunes ({size}, bf16) in {workdir} ...", flush=True)
    marker.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", GENERATE, str(workdir), size, str(shard), str(NUM_FINETUNES)],
                   check=True)
    marker.write_text(json.dumps(wanted) + "\n")


def input_files(method: str, dirs: dict[str, Path]) -> list[Path]:
    default = (*(f"ft{i}" for i in range(1, NUM_FINETUNES + 1)), "base")
    return sorted(p for n in INPUTS.get(method, default) for p in dirs[n].glob("*.safetensors"))


# Reads argv[1:] in order with 16 MB reads and prints the seconds it took.
READ_FLOOR = r"""
import sys, time
buf = memoryview(bytearray(16 << 20))
t0 = time.perf_counter()
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
print(time.perf_counter() - t0)
"""
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3")


def prepare_cache(cache: str, files: list[Path]) -> None:
    drop_caches() if cache == "cold" else warm_up(files)


def read_floor(files: list[Path], cache: str, repeat: int) -> float:
    """Seconds for a fresh process to read ``files``, best of ``repeat``."""
    times = []
    for _ in range(repeat):
        prepare_cache(cache, files)
        out = subprocess.run([sys.executable, "-I", "-S", "-c", READ_FLOOR, *map(str, files)],
                             capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip()))
    return min(times)


STARTUP_MODULE = {OURS: "mergekit_like.cli.main", MERGEKIT: "mergekit.scripts.run_yaml"}


def startup_time(python: str, module: str, cache: str, files: list[Path], repeat: int) -> float:
    """Seconds for a fresh process of ``python`` to import ``module``, best of ``repeat``."""
    times = []
    for _ in range(repeat):
        prepare_cache(cache, files)
        out = subprocess.run([sys.executable, "-I", "-S", "-c", STARTUP, python, module],
                             capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip()))
    return min(times)


STARTUP = r"""
import subprocess, sys, time
t0 = time.perf_counter()
subprocess.run([sys.argv[1], "-c", "import " + sys.argv[2]], check=True)
print(time.perf_counter() - t0)
"""


def warm_up(files: list[Path]) -> None:
    """Reads the files once so that the run finds them in the page cache."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def command(run: Run, recipe: Path, out: Path, ours: Path, mergekit: Path | None) -> list[str]:
    if run.tool == OURS:
        return [str(ours), "merge", str(recipe), "-o", str(out), "--quiet", "--device", run.device]
    assert mergekit is not None
    cmd = [str(mergekit), str(recipe), str(out), "--quiet", "--no-copy-tokenizer", "--device", run.device]
    if run.kind == "cuda":
        cmd += ["--cuda", "--read-to-gpu"]  # the targets' reference: mergekit's fastest single-GPU run
    return cmd


def measure(run: Run, cmd: list[str], workdir: Path) -> None:
    stats_path = workdir / "logs" / f"{run.label}.json"
    log_path = workdir / "logs" / f"{run.label}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if run.kind == "cuda":
        env["MKL_BENCH_GPU"] = "1"
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(stats_path), *cmd],
                       stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    stats = json.loads(stats_path.read_text())
    if stats["rc"] != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        run.error = f"exit {stats['rc']} (log: {log_path}): " + " | ".join(tail)
        return
    run.seconds.append(stats["seconds"])
    run.maxrss.append(stats["maxrss_kb"] * 1024)
    if stats.get("gpu_peak_mb") is not None:
        run.gpu_peak.append(stats["gpu_peak_mb"] * 2**20)


def compare(a: Path, b: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", COMPARE, str(a), str(b)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_table(runs: list[Run], floors: dict[int, float], startups: dict[str, float]) -> list[str]:
    header = ["tool", "method", "device", "wall s", "GB/s", "x floor", "floor target", "x (startup + floor)",
              "peak RSS MB", "RSS target", "peak GPU MB", "GPU target", "speedup", "target", "RSS frac",
              "target (<=0.33)"]
    rows = []
    by_key = {(r.tool, r.method, r.device): r for r in runs}
    for r in runs:
        if r.error or not r.seconds:
            rows.append([r.tool, r.method, r.device, "ERROR"] + [""] * (len(header) - 4))
            continue
        ours, cuda = r.tool == OURS, r.kind == "cuda"
        over_floor = r.wall / floors[r.input_bytes]
        floor_target = FLOOR_TARGETS[r.kind].get(r.method) if ours else None
        gpu = max(r.gpu_peak) if r.gpu_peak else None
        row = [r.tool, r.method, r.device, f"{r.wall:.1f}", f"{r.input_bytes / r.wall / 1e9:.2f}",
               f"{over_floor:.2f}",
               f"<={floor_target:g} {_verdict(over_floor <= floor_target)}" if floor_target else "",
               f"{r.wall / (startups[r.tool] + floors[r.input_bytes]):.2f}" if r.tool in startups else "",
               f"{r.rss / 1e6:,.0f}",
               f"<{CUDA_RSS_TARGET / 1e6:,.0f} {_verdict(r.rss < CUDA_RSS_TARGET)}" if ours and cuda else "",
               f"{gpu / 1e6:,.0f}" if gpu is not None else ("n/a" if cuda else ""),
               f"<{CUDA_GPU_MEMORY_TARGET / 1e6:,.0f} {_verdict(gpu < CUDA_GPU_MEMORY_TARGET)}"
               if ours and gpu is not None else "",
               "", "", "", ""]
        ref = by_key.get((MERGEKIT, BASELINE_OF.get(r.method, r.method), r.device))
        if ours and ref is not None and ref.seconds and not ref.error:
            speedup, frac = ref.wall / r.wall, r.rss / ref.rss
            target = SPEEDUP_TARGETS[r.kind].get(r.method)
            row[-4] = f"{speedup:.2f}x"
            row[-3] = f">={target:g}x {_verdict(speedup >= target)}" if target else "-"
            row[-2] = f"{frac:.2f}"
            row[-1] = _verdict(frac <= RSS_FRACTION_TARGET)
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="270m", choices=["tiny", "270m", "1b"], help="model preset")
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,ties_index",
                        help=f"comma list of: {', '.join(RECIPES)}")
    parser.add_argument("--cache", choices=["cold", "warm"],
                        help="page cache before each run (default: cold where caches can be dropped)")
    parser.add_argument("--devices", default="cpu", help="comma list: cpu,cuda")
    parser.add_argument("--workdir", type=Path, help="where models and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse models already in --workdir, and keep the work dir afterwards")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (best wall, highest RSS)")
    parser.add_argument("--mergekit-yaml", help="mergekit's CLI (default: mergekit-yaml on PATH)")
    parser.add_argument("--no-mergekit", action="store_true", help="run only mergekit-like")
    parser.add_argument("--mergekit-like", help="our CLI (default: next to this Python)")
    parser.add_argument("--input-shard-size", type=int, default=2 * 10**9, help="shard size of the inputs")
    parser.add_argument("--save", type=Path, help="also write the table and figures to this file")
    args = parser.parse_args()
    cache = args.cache or ("cold" if can_drop_caches() else "warm")
    if cache == "cold" and not can_drop_caches():
        parser.error(f"--cache cold needs write access to {DROP_CACHES} (root)")

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in RECIPES:
            parser.error(f"unknown method {m!r} (known: {', '.join(RECIPES)})")
    ours = find_ours(args.mergekit_like)
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit_yaml)
    notes = []
    devices = []
    for d in [d for d in args.devices.split(",") if d]:
        if d.startswith("cuda") and not cuda_available(interpreter_of(ours)):
            notes.append(f"skipped device {d}: torch.cuda.is_available() is False")
            continue
        devices.append(d)
    tools = [OURS]
    if mergekit is not None:
        tools.append(MERGEKIT)
        mk_python = interpreter_of(mergekit)
        notes.append(f"mergekit {version_of(mk_python, 'mergekit')} (torch {version_of(mk_python, 'torch')}) "
                     f"at {mergekit}")
    else:
        notes.append("mergekit not found (no mergekit-yaml on PATH, no --mergekit-yaml): its rows are skipped")
    our_python = interpreter_of(ours)
    notes.insert(0, f"mergekit-like {version_of(our_python, 'mergekit-like')} "
                    f"(torch {version_of(our_python, 'torch')}) at {ours}")

    # The runs, one (tool, method, device) each; every run gets a warm-up read of its inputs first.
    runs = [Run(tool, method, device) for method in methods for device in devices for tool in tools
            if tool == OURS or method not in BASELINE_OF]

    if args.workdir is not None:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.mkdtemp(prefix="mkl-merge-bench-", dir="/tmp")
        workdir = Path(cleanup)
    try:
        prepare_inputs(workdir, args.size, args.input_shard_size, reuse=args.keep)
        dirs = model_dirs(workdir)
        (workdir / "logs").mkdir(exist_ok=True)
        (workdir / "out").mkdir(exist_ok=True)
        recipes = {}
        for method in methods:
            recipes[method] = workdir / f"{method}.yml"
            layers = LAYERS[args.size]
            recipes[method].write_text(RECIPES[method].format(
                **{k: str(v) for k, v in dirs.items()}, layers=layers, one_third=layers // 3,
                two_thirds=2 * layers // 3))

        floors: dict[int, float] = {}  # by input bytes: linear reads 3 models, the others 4
        startups: dict[str, float] = {}
        pythons = {OURS: our_python} | ({MERGEKIT: interpreter_of(mergekit)} if mergekit is not None else {})
        for tool, python in pythons.items():
            startups[tool] = startup_time(python, STARTUP_MODULE[tool], cache, [], args.repeat)
            print(f"startup of {tool} ({cache}): {startups[tool]:.2f} s", flush=True)
        for run in runs:
            files = input_files(run.method, dirs)
            run.input_bytes = sum(f.stat().st_size for f in files)
            if run.input_bytes not in floors:
                floors[run.input_bytes] = read_floor(files, cache, args.repeat)
                print(f"read floor of {len(files)} files, {run.input_bytes / 1e9:.2f} GB ({cache}): "
                      f"{floors[run.input_bytes]:.2f} s", flush=True)
            run.output = workdir / "out" / run.label
            cmd = command(run, recipes[run.method], run.output, ours, mergekit)
            for i in range(args.repeat):
                shutil.rmtree(run.output, ignore_errors=True)
                prepare_cache(cache, files)
                print(f"running {run.label} ({i + 1}/{args.repeat}): {' '.join(cmd)}", flush=True)
                measure(run, cmd, workdir)
                if run.error:
                    print(f"  FAILED: {run.error}", flush=True)
                    break
                gpu = f", peak GPU {run.gpu_peak[-1] / 1e6:,.0f} MB" if run.gpu_peak else ""
                print(f"  {run.seconds[-1]:.1f} s, peak RSS {run.maxrss[-1] / 1e6:,.0f} MB{gpu}", flush=True)

        agreement = []
        for method in methods:
            for device in devices:
                a = next((r for r in runs if (r.tool, r.method, r.device) == (OURS, method, device)), None)
                b = next((r for r in runs if (r.tool, r.method, r.device)
                          == (MERGEKIT, BASELINE_OF.get(method, method), device)), None)
                if not a or not b or a.error or b.error:
                    continue
                c = compare(a.output, b.output)
                problems = c["only_a"] + c["only_b"] + c["dtype_mismatch"]
                if problems:
                    verdict = f"MISMATCH: {len(c['only_a'])} tensors only ours, {len(c['only_b'])} only " \
                              f"mergekit's, {len(c['dtype_mismatch'])} dtype/shape differ"
                elif c["differing"] == 0:
                    verdict = "identical (bit-exact)"
                elif c["max_ulp"] <= 1:
                    verdict = "within bf16 rounding (<=1 ulp)"
                elif method in BASELINE_OF:
                    verdict = "differs where ties at the trim threshold are broken otherwise (by design)"
                elif method in RANDOM:
                    verdict = "random draws differ (mergekit's global generator; ours seeded per tensor)"
                elif method in SAMPLED:
                    verdict = ("the sampled quantiles of tensors over 1,000,000 entries differ (mergekit's global "
                               "generator; ours seeded per tensor); smaller tensors are bit-exact")
                else:
                    verdict = "DIFFER"
                agreement.append(f"  {method:<10} {device:<5} max |ours - mergekit| = {c['max_abs']:.3g}, "
                                 f"{c['differing']:,} of {c['elements']:,} elements differ, "
                                 f"max {c['max_ulp']} ulp: {verdict}")

        cache_note = ("cold page cache (dropped before every run and every floor read)" if cache == "cold"
                      else "warm page cache (inputs read once before every run; the floor is a warm read)")
        floor_note = ", ".join(f"{b / 1e9:.2f} GB in {t:.2f} s ({b / t / 1e9:.2f} GB/s)" for b, t in floors.items())
        lines = [f"merge benchmark: {args.size} bf16 Llama-style, base + {NUM_FINETUNES} fine-tunes, "
                 f"{os.cpu_count()} cores; {cache_note}; best of {args.repeat}",
                 f"  read floor: {floor_note}",
                 "  startup (a fresh process importing the command line): "
                 + ", ".join(f"{tool} {t:.2f} s" for tool, t in startups.items()),
                 *[f"  {n}" for n in notes], "", *format_table(runs, floors, startups)]
        if agreement:
            lines += ["", "outputs, ours vs mergekit:", *agreement]
        for r in runs:
            if r.error:
                lines.append(f"  {r.label}: {r.error}")
        text = "\n".join(lines)
        print("\n" + text)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(text + "\n")
    finally:
        if args.keep:
            print(f"\nkept the work dir {workdir}")
        elif cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        else:
            shutil.rmtree(workdir / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
