"""Which rank this process is, and the process group of a `torchrun` launch.

With no group started (one process) `ranks()` is rank 0 of 1 and everything runs as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "join_from_env", "launched_world", "leave", "local_rank", "rank_device", "ranks"]


@dataclass(frozen=True)
class Ranks:
    """This process's `rank` among `size` processes of the default group."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that encodes, decodes, prints and writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def ranks() -> Ranks:
    """This process's place in the started default process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_world() -> int:
    """How many processes `torchrun` launched (its `WORLD_SIZE`; 1 without torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_rank() -> int | None:
    """This process's `LOCAL_RANK` (its GPU on the machine) when `torchrun` launched several, else None."""
    if launched_world() == 1:
        return None
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None


def rank_device(device: str) -> str:
    """`device` for this process of a `torchrun` launch: a bare "cuda" becomes its own GPU
    (`cuda:<LOCAL_RANK % GPUs>`); anything else, or one process, is left as it is."""
    rank = local_rank()
    if rank is None or device != "cuda":
        return device
    return f"cuda:{rank % torch.cuda.device_count()}"


def join_from_env(device: str) -> bool:
    """Under `torchrun` with several processes, start the default group (NCCL on CUDA, gloo
    otherwise) unless one is started; True when this call started it (`leave` ends it)."""
    if launched_world() == 1 or dist.is_initialized():
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True


def leave() -> None:
    """End the default process group (after `join_from_env` started it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
