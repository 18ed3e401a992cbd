"""Under DDP (2 CPU processes, gloo) only rank 0 keeps averages, equal to a single-process run; a hook made
before the process group is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import free_port, join_group, leave_group

from mergekit_like.errors import HookUsageError
from mergekit_like.hook import EMA, WeightAveraging
from mergekit_like.io import open_checkpoint

STEPS = 4


def train(model: torch.nn.Module, hook: WeightAveraging) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(8, 3, generator=g)  # the same batch on every rank
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
        hook.step()
    hook.close()


def worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    # The DDP wrapper itself: the averages take the inner model's names (no "module." prefix).
    hook = WeightAveraging(model, [EMA(0.5, per_checkpoint=True)], out_dir=out, strict=True)
    assert hook.active == (rank == 0)
    train(model, hook)
    del model, hook
    leave_group()


def test_ddp_rank_zero_averages_equal_a_single_process_run(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    train(model, WeightAveraging(model, [EMA(0.5, per_checkpoint=True)], out_dir=tmp_path / "single", strict=True))
    results = []
    for run in ("ddp", "single"):
        with open_checkpoint(tmp_path / run / "ema_0.5" / "latest") as ckpt:
            results.append({n: ckpt.read(n) for n in ckpt.names()})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    # One set of averages (beside the live hook's lock file, which stays: an flock, not its presence, locks).
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name != ".hook.lock") == ["ema_0.5"]


def test_a_hook_made_before_the_process_group_is_refused_before_it_writes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before init_process_group()
    with pytest.raises(HookUsageError, match=r"before torch.distributed.init_process_group\(\).*WORLD_SIZE=2"):
        WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.5)], out_dir=tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.5)], out_dir=tmp_path / "avg").close()
