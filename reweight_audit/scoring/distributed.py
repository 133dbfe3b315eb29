"""Data-parallel scoring under torchrun / accelerate launch.

Each rank scores its share of the batches and writes its own shards; rank 0
merges after a barrier. Without WORLD_SIZE > 1 in the environment this is a
no-op and everything runs in one process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

BARRIER_TIMEOUT_S = float(os.environ.get("REWEIGHT_AUDIT_BARRIER_TIMEOUT", "1800"))


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


@contextmanager
def dist_context() -> Iterator[tuple[int, int]]:
    """Initialise torch.distributed when launched with several processes; yield (rank, world size)."""
    rank, world, local = world_from_env()
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
    try:
        yield dist.get_rank(), dist.get_world_size()
        # leave together: a rank that tears its connections down while a peer is still finishing
        # the last collective makes gloo abort that peer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def agree(error: BaseException | None, world_size: int) -> None:
    """Exchange each rank's outcome of a stage; every rank raises the first rank's error.

    This doubles as the barrier, so a rank that failed (say, to load the model)
    never leaves the others waiting for it.
    """
    if world_size <= 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    from reweight_audit.core.errors import AuditError

    outcomes: list = [None] * world_size
    dist.all_gather_object(outcomes, None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message]
    if failed:
        rank, message = failed[0]
        raise AuditError(message if world_size == 1 else f"rank {rank}: {message}")
