"""Step-time overhead and extra memory of weight averaging during training.

Trains a Llama-style model (transformers' LlamaForCausalLM when importable, else a
stack of MLP blocks of the same width) for a number of steps in bf16 autocast, and
prints the median step time and extra persistent device memory of:

- no averaging;
- torch.optim.swa_utils.AveragedModel with an EMA (the usual in-process approach);
- this project's hook (sidecar process) at snapshot_every 1 and 10, with one EMA;
- the hook at snapshot_every 1 and 10 with a post-hoc EMA, ``PostHocEMA((0.05, 0.10))``:
  two power-function EMA profiles, both stored in float16 every ``--posthoc-store-every``
  steps (a short run stores several times, so the cost of storing is part of the figure).

For every configuration with a hook it also prints the sidecar's peak resident memory
(RSS): a thread samples ``psutil.Process().children(recursive=True)`` every 50 ms from
before the hook is made until ``close()`` has returned (the final save included), summing
the RSS of every child except multiprocessing's resource tracker. RSS counts the sidecar's
Python and torch runtime and the shared snapshot buffers it has touched (pages the trainer
maps as well), beside its float32 averages.

``--sidecar-memory`` measures the sidecar alone, without training: models of several sizes (bf16
stacks of linear layers), a few strict snapshots of perturbed weights into EMA, SWA and LAWA(k=3),
then ``close()``; it prints each sidecar's peak RSS less that of a sidecar for a tiny model (the
Python and torch runtime), in units of the model's float32 size. What the sidecar must hold: the
shared snapshot buffers in the model's dtype (0.5 for bf16), one float32 state per average (LAWA: one
per snapshot it keeps), and one fold group of tensors (64 MiB); nothing that grows as a second
float32 copy of the model.

The project's targets (on a GPU): snapshot_every=10 within 1% of no hook; snapshot_every=1
within 5%; zero extra persistent GPU memory (AveragedModel keeps a second model copy).

    python benchmarks/hook_overhead.py                   # ~370M parameters on cuda
    python benchmarks/hook_overhead.py --size small --steps 20 --device cpu   # smoke run
    python benchmarks/hook_overhead.py --sidecar-memory  # sidecar peak RSS against model size (CPU)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import psutil
import torch

SIZES = {  # hidden, intermediate, layers, vocab
    "370m": (1024, 4096, 24, 32000),
    "small": (256, 1024, 4, 1000),
}


def build_model(size: str, device: torch.device) -> torch.nn.Module:
    hidden, intermediate, layers, vocab = SIZES[size]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), vocab_size=vocab)
        model: torch.nn.Module = LlamaForCausalLM(config)
    except ImportError:
        blocks = [torch.nn.Sequential(torch.nn.Linear(hidden, intermediate), torch.nn.SiLU(),
                                      torch.nn.Linear(intermediate, hidden)) for _ in range(layers)]
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), *blocks, torch.nn.Linear(hidden, vocab))
    return model.to(device)


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch[:, 1:].reshape(-1))


class SidecarMemory:
    """Peak RSS of this process's children but multiprocessing's resource tracker, sampled by a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self.seen = False  # whether any child other than the tracker was found
        self._tracker: dict[int, bool] = {}  # pid -> is the resource tracker (its command line is read once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sidecar-memory", daemon=True)

    def __enter__(self) -> SidecarMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def _is_tracker(self, child: psutil.Process) -> bool:
        if child.pid not in self._tracker:
            self._tracker[child.pid] = "resource_tracker" in " ".join(child.cmdline())
        return self._tracker[child.pid]

    def sample(self) -> None:
        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                if not self._is_tracker(child):
                    total += child.memory_info().rss
                    self.seen = True
            except psutil.Error:  # it exited between the listing and the reading
                continue
        self.peak = max(self.peak, total)


def measure(name: str, size: str, device: torch.device, steps: int, batch: int, seq: int,
            setup: Callable[[torch.nn.Module], tuple[Callable[[], None], Callable[[], None]]]) -> dict:
    torch.manual_seed(0)
    model = build_model(size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, SIZES[size][3], (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Warm the optimizer state up first so its memory is part of the baseline.
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_of(model, data).backward()
        optimizer.step()
        optimizer.zero_grad()
    sync()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with SidecarMemory() as sidecar:
        after_step, finish = setup(model)
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss_of(model, data).backward()
            optimizer.step()
            optimizer.zero_grad()
            after_step()
            sync()
            times.append(time.perf_counter() - start)
        extra = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
        finish()
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "median_ms": 1000 * statistics.median(times[2:]), "extra_mb": extra / 1e6,
            "params": params, "sidecar_rss_mb": sidecar.peak / 1e6 if sidecar.seen else None}


MEMORY_SIZES_M = (0, 50, 100, 200)  # millions of parameters (0: the runtime baseline)
MEMORY_SNAPSHOTS = 4


def stack_of(parameters_m: int) -> torch.nn.Module:
    """A bf16 stack of 2048 x 2048 linear layers with about ``parameters_m`` million parameters."""
    layers = max(1, round(parameters_m * 1e6 / (2048 * 2048))) if parameters_m else 0
    blocks = [torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)] or [torch.nn.Linear(8, 8)]
    return torch.nn.Sequential(*blocks).to(torch.bfloat16)


def sidecar_peak(model: torch.nn.Module, average: object) -> int:
    """Peak RSS of the sidecar over MEMORY_SNAPSHOTS strict snapshots and the final save."""
    from mergekit_like.hook import WeightAveraging

    out = tempfile.mkdtemp(prefix="hook-memory-")
    try:
        with SidecarMemory(interval=0.02) as sidecar:
            averaging = WeightAveraging(model, [average], out_dir=out, strict=True)
            for _ in range(MEMORY_SNAPSHOTS):
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1.01)
                averaging.step()
            averaging.close()
        return sidecar.peak
    finally:
        shutil.rmtree(out, ignore_errors=True)


def sidecar_memory_table() -> None:
    from mergekit_like.hook import EMA, LAWA, SWA

    # name: (average, float32 states it must hold)
    averages = {"EMA": (lambda: EMA(0.999), 1), "SWA": (lambda: SWA(), 1), "LAWA k=3": (lambda: LAWA(k=3), 3)}
    runtime = {name: sidecar_peak(stack_of(0), make()) for name, (make, _) in averages.items()}
    print(f"sidecar peak RSS above the runtime ({max(runtime.values()) / 1e6:.0f} MB) over {MEMORY_SNAPSHOTS} strict "
          f"snapshots of a bf16 model and the final save: in float32 model sizes, and in MB beyond what it must "
          f"hold (the bf16 snapshot buffers, 0.5, and its float32 states)")
    print(f"{'parameters':>12}{'float32 MB':>12}" + "".join(f"{name + ' x':>14}{'beyond MB':>11}" for name in averages))
    for size in MEMORY_SIZES_M[1:]:
        model = stack_of(size)
        f32 = sum(p.numel() for p in model.parameters()) * 4
        row = f"{size:>11}M{f32 / 1e6:>12.0f}"
        for name, (make, states) in averages.items():
            above = sidecar_peak(model, make()) - runtime[name]
            row += f"{above / f32:>14.2f}{(above - (0.5 + states) * f32) / 1e6:>11.0f}"
        print(row)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="370m", choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--posthoc-store-every", type=int, default=10,
                        help="PostHocEMA's snapshot_every: steps between stored profiles")
    parser.add_argument("--sidecar-memory", action="store_true",
                        help="measure only the sidecar's peak RSS against model size (no training)")
    args = parser.parse_args()
    if args.sidecar_memory:
        sidecar_memory_table()
        return
    device = torch.device(args.device)

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from mergekit_like.hook import EMA, PostHocEMA, WeightAveraging

    def nothing(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: None), (lambda: None)

    def averaged_model(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        return (lambda: ema.update_parameters(model)), (lambda: None)

    def hook(every: int, posthoc: bool = False
             ) -> Callable[[torch.nn.Module], tuple[Callable[[], None], Callable[[], None]]]:
        def setup(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
            out = tempfile.mkdtemp(prefix="hook-bench-")
            average = PostHocEMA((0.05, 0.10), snapshot_every=args.posthoc_store_every) if posthoc else EMA(0.999)
            averaging = WeightAveraging(model, [average], snapshot_every=every, out_dir=out)
            averaging.wait_until_ready()

            def finish() -> None:
                counts = averaging.close()
                what = f"post-hoc EMA, stored every {args.posthoc_store_every}" if posthoc else "EMA"
                print(f"    hook every {every} ({what}): snapshots taken {counts.taken}, skipped {counts.skipped}")
                shutil.rmtree(out, ignore_errors=True)  # the stored profiles of a large model fill a disk fast

            return averaging.step, finish
        return setup

    runs = [("no averaging", nothing), ("torch AveragedModel EMA", averaged_model),
            ("hook, snapshot_every=10", hook(10)), ("hook, snapshot_every=1", hook(1)),
            ("hook PostHocEMA x2, every=10", hook(10, posthoc=True)),
            ("hook PostHocEMA x2, every=1", hook(1, posthoc=True))]
    results = [measure(name, args.size, device, args.steps, args.batch, args.seq, setup) for name, setup in runs]
    base = results[0]["median_ms"]
    print(f"\n{results[0]['params'] / 1e6:.0f}M parameters, {device}, bf16 autocast, batch {args.batch}x{args.seq}, "
          f"{args.steps} steps (median of all but the first two)")
    print(f"{'run':<28}{'median step ms':>16}{'vs none':>10}{'extra memory MB':>18}{'sidecar peak RSS MB':>22}")
    for r in results:
        rss = "-" if r["sidecar_rss_mb"] is None else f"{r['sidecar_rss_mb']:.0f}"
        print(f"{r['name']:<28}{r['median_ms']:>16.1f}{r['median_ms'] / base - 1:>+10.1%}{r['extra_mb']:>18.0f}"
              f"{rss:>22}")


if __name__ == "__main__":
    main()
