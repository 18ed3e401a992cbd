"""FSDP (two gloo processes): each rank averages its shard; consolidation gives the whole average."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from gloo import free_port, join_group, leave_group
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.averaging import EMA as OfflineEMA
from mergekit_like.hook import EMA, WeightAveraging
from mergekit_like.io import open_checkpoint

STEPS = 3


def model_and_steps() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Linear(7, 3))  # 7 rows split 4 + 3
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(5, 4, generator=g) for _ in range(STEPS)]


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def sharded_run(rank: int, port: int, out: str, **options: Any
                ) -> tuple[torch.nn.Module, WeightAveraging, torch.optim.Optimizer]:
    """Joins the group; the FSDP2-sharded model, its hook (an EMA of 0.5 per snapshot) and an SGD optimizer."""
    join_group(rank, port)
    from torch.distributed.fsdp import fully_shard

    model, _ = model_and_steps()
    fully_shard(model)
    hook = WeightAveraging(model, [EMA(0.5, per_checkpoint=True)], out_dir=out, **options)
    return model, hook, torch.optim.SGD(model.parameters(), lr=0.1)


def worker(rank: int, port: int, out: str) -> None:
    model, hook, optimizer = sharded_run(rank, port, out, strict=True)
    _, batches = model_and_steps()
    for x in batches:
        sgd_step(model, optimizer, x)
        hook.step()
    hook.close()
    del model, hook, optimizer
    leave_group()


def test_fsdp_shards_are_averaged_per_rank_and_consolidated(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(worker, args=(free_port(), str(tmp_path / "avg")), nprocs=2, join=True)
    assert (tmp_path / "avg" / "shards" / "manifest.json").exists()
    result = CliRunner().invoke(app, ["consolidate", str(tmp_path / "avg"), "--average", "ema_0.5",
                                      "-o", str(tmp_path / "ema")])
    assert result.exit_code == 0, result.output
    model, batches = model_and_steps()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = OfflineEMA(0.5, per_checkpoint=True)
    for step, x in enumerate(batches, 1):
        sgd_step(model, optimizer, x)
        expected.update(model.state_dict(), step)
    with open_checkpoint(tmp_path / "ema") as ckpt:
        for name, value in expected.result().items():
            torch.testing.assert_close(ckpt.read(name), value)


def lagging_worker(rank: int, port: int, out: str, result: str) -> None:
    """Not strict; at step 3 rank 1's sidecar is busy (its flag held clear), rank 0's is free."""
    model, hook, optimizer = sharded_run(rank, port, out, save_every=1)
    g = torch.Generator().manual_seed(2)
    for step in range(1, 6):
        sgd_step(model, optimizer, torch.randn(5, 4, generator=g))
        assert hook.wait_until_ready(60)
        if step == 3 and rank == 1:
            hook._sidecar.free.clear()  # as when its fold of step 2 were still running
        hook.step()
        if step == 3 and rank == 1:
            hook._sidecar.free.set()
    counts = hook.close()
    Path(result, f"rank{rank}").write_text(f"{counts.taken} {counts.skipped}")
    del model, hook, optimizer
    leave_group()


def test_ranks_that_are_not_strict_skip_the_same_snapshots(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(lagging_worker, args=(free_port(), str(tmp_path / "avg"), str(tmp_path)), nprocs=2, join=True)
    # Rank 0 skips step 3 with rank 1: otherwise its shard would hold one more snapshot than rank 1's.
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "4 1"
    result = CliRunner().invoke(app, ["consolidate", str(tmp_path / "avg"), "--average", "ema_0.5",
                                      "-o", str(tmp_path / "ema")])
    assert result.exit_code == 0, result.output


def dying_worker(rank: int, port: int, out: str) -> None:
    """Saves at step 2 and 4; rank 1's sidecar is killed before close() at step 5."""
    model, hook, optimizer = sharded_run(rank, port, out, save_every=2, strict=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        sgd_step(model, optimizer, torch.randn(5, 4, generator=g))
        hook.step()
    assert hook.wait_until_ready(60)
    if rank == 1:
        hook._sidecar.process.kill()
        hook._sidecar.process.join(30)
        with pytest.warns(UserWarning, match=r"shard keeps the averages of step 4: consolidate --step 4"):
            hook.close()
    else:
        hook.close()
    del model, hook, optimizer
    leave_group()


def test_a_rank_whose_sidecar_died_keeps_its_last_save_and_consolidate_says_which_step(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(dying_worker, args=(free_port(), str(tmp_path / "avg")), nprocs=2, join=True)
    consolidate = ["consolidate", str(tmp_path / "avg"), "--average", "ema_0.5", "-o", str(tmp_path / "ema")]
    refused = CliRunner().invoke(app, consolidate)
    assert refused.exit_code == 2 and "rank 0 step_5, rank 1 step_4" in refused.output, refused.output
    result = CliRunner().invoke(app, [*consolidate, "--step", "4"])
    assert result.exit_code == 0, result.output
