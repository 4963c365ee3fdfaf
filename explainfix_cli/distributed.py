"""Running under `torchrun`: the rank and world size, joining the process group, leaving it.

One place for it, since saliency (docs/method.md §1: a sum over minibatches, all-reduced),
fine-tuning (each process trains on a shard of every minibatch) and the command line all ask.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_failed = False  # set when a command body fails: the process then leaves without the closing barrier


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes the outputs (rank 0, or no process group at all)."""
    return rank_and_world()[0] == 0


def gather_minibatches(own: dict[int, Any]) -> dict[int, Any]:
    """Under torchrun, every process's `{minibatch index: what it computed there}` put together on
    every process, in minibatch order: each reads its own share of the data (`Dataset.shard`) and
    all end with what one process reading every minibatch would have. A collective: every process
    calls it at the same point. In a single process, `own` in minibatch order."""
    if rank_and_world()[1] == 1:
        return dict(sorted(own.items()))
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, own)
    return dict(sorted((b, item) for part in everyone for b, item in part.items()))


def mark_failed() -> None:
    """This process will not reach its peers' next collective: leave without waiting for them."""
    global _failed
    _failed = True


def setup(device: str) -> int:
    """Under torchrun, join the process group (gloo on CPU, nccl on GPU); only rank 0 prints. Returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import atexit

    import torch.distributed as dist

    if not dist.is_initialized():
        if device.startswith("cuda"):  # one GPU per process: torchrun's local rank picks it
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(teardown)
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the results are rank 0's to print
    return rank


def teardown() -> None:
    """Leave the process group together: a process that tears gloo down while a peer still talks aborts."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if _failed:  # peers may wait in a collective this process never reaches: leave, and torchrun stops them
        return
    dist.barrier()
    dist.destroy_process_group()
