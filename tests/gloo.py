"""Two-process gloo runs for the distributed hook tests: one port picker, one orderly teardown."""

from __future__ import annotations

import gc
import socket

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_group(rank: int, port: int, world_size: int = 2) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def leave_group() -> None:
    """Tears the group down in lockstep, after the caller dropped its models.

    gloo can abort a rank (SIGABRT, "terminate called without an active exception") when that
    rank destroys its group while the other is still busy, or when a DDP/FSDP module still holds
    the group at interpreter shutdown. Hence a barrier, a collection, then the destroy.
    """
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
