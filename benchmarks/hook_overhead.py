"""Step-time overhead and extra memory of weight averaging during training.

Trains a Llama-style model (transformers' LlamaForCausalLM when importable, else a
stack of MLP blocks of the same width) for a number of steps in bf16 autocast, and
prints the median step time and extra persistent device memory of:

- no averaging;
- torch.optim.swa_utils.AveragedModel with an EMA (the usual in-process approach);
- this project's hook (sidecar process) at snapshot_every 1 and 10.

The project's targets (on a GPU): snapshot_every=10 within 1% of no hook; snapshot_every=1
within 5%; zero extra persistent GPU memory (AveragedModel keeps a second model copy).

    python benchmarks/hook_overhead.py                   # ~370M parameters on cuda
    python benchmarks/hook_overhead.py --size small --steps 20 --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

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
            "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="370m", choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from mergekit_like.hook import EMA, WeightAveraging

    def nothing(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: None), (lambda: None)

    def averaged_model(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        return (lambda: ema.update_parameters(model)), (lambda: None)

    def hook(every: int) -> Callable[[torch.nn.Module], tuple[Callable[[], None], Callable[[], None]]]:
        def setup(model: torch.nn.Module) -> tuple[Callable[[], None], Callable[[], None]]:
            out = tempfile.mkdtemp(prefix="hook-bench-")
            averaging = WeightAveraging(model, [EMA(0.999)], snapshot_every=every, out_dir=out)
            averaging.wait_until_ready()

            def finish() -> None:
                counts = averaging.close()
                print(f"    hook every {every}: snapshots taken {counts.taken}, skipped {counts.skipped}")

            return averaging.step, finish
        return setup

    runs = [("no averaging", nothing), ("torch AveragedModel EMA", averaged_model),
            ("hook, snapshot_every=10", hook(10)), ("hook, snapshot_every=1", hook(1))]
    results = [measure(name, args.size, device, args.steps, args.batch, args.seq, setup) for name, setup in runs]
    base = results[0]["median_ms"]
    print(f"\n{results[0]['params'] / 1e6:.0f}M parameters, {device}, bf16 autocast, batch {args.batch}x{args.seq}, "
          f"{args.steps} steps (median of all but the first two)")
    print(f"{'run':<28}{'median step ms':>16}{'vs none':>10}{'extra memory MB':>18}")
    for r in results:
        print(f"{r['name']:<28}{r['median_ms']:>16.1f}{r['median_ms'] / base - 1:>+10.1%}{r['extra_mb']:>18.0f}")


if __name__ == "__main__":
    main()
