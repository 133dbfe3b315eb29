"""Data-parallel scoring under torchrun / accelerate launch.

Each rank scores its share of the batches and writes its own shards; rank 0
merges after a barrier. Without WORLD_SIZE > 1 in the environment this is a
no-op and everything runs in one process.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

BARRIER_TIMEOUT_S = float(os.environ.get("REWEIGHT_AUDIT_BARRIER_TIMEOUT", "1800"))
_ran_gloo = False  # set once this process has run a gloo group (see leave_after_gloo)


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

    global _ran_gloo
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    _ran_gloo = _ran_gloo or backend == "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
    try:
        yield dist.get_rank(), dist.get_world_size()
        # leave together: a rank that tears its connections down while a peer is still finishing
        # the last collective makes gloo abort that peer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def leave_after_gloo(code: int | str | None) -> None:
    """End the process at once with ``code`` if it ran a gloo process group; otherwise return.

    gloo's worker threads can outlive ``destroy_process_group()`` and abort the
    interpreter's teardown ("terminate called without an active exception",
    pytorch PR 179291): a rank that finished, its outputs written and every rank
    past the last barrier, then exits with SIGABRT, and torchrun reports the run
    failed and stops the other ranks. The command line calls this on its way out,
    when nothing is left to do but the teardown; stdout and stderr are flushed first.
    """
    if not (_ran_gloo or _gloo_group_is_live()):
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _gloo_group_is_live() -> bool:
    """A gloo group someone else started (say, the Trainer under torchrun) and did not destroy."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo")


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
