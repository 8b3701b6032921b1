"""Splitting a batch of pairs between the processes `torchrun` starts, and bringing their results back together.

`torch.distributed` does the communication; MONAI's `DistributedSampler` shards a dataset for a DataLoader, but the
batch runner iterates over table rows itself, so the same round-robin split is done here on the rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's part of a batch: rank ``rank`` of ``world_size`` takes rows ``rank, rank + world_size, ...``.

    Attributes:
        rank: global rank (``RANK`` from `torchrun`), 0 without it.
        world_size: number of processes over all nodes (``WORLD_SIZE``), 1 without `torchrun`.
        owns_group: whether this object initialised the process group (and so destroys it in :meth:`close`).
    """

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @classmethod
    def from_environment(cls, device: torch.device | str = "cpu") -> Shard:
        """The shard `torchrun` describes in the environment; a single process (rank 0 of 1) without it.

        With ``WORLD_SIZE > 1`` the default process group is initialised (``nccl`` for a CUDA ``device``, ``gloo``
        otherwise) unless it already is, and the process's CPU threads are set to the cores it may use divided by
        the processes on its node (`torchrun` sets ``OMP_NUM_THREADS=1``, which leaves cores idle on a CPU node).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
        owns_group = not dist.is_initialized()
        if owns_group:
            cuda = torch.device(device).type == "cuda"
            if cuda:  # each rank's collectives run on its own GPU
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, rows: Sequence[T]) -> list[T]:
        """This rank's rows of ``rows``, in order."""
        return list(rows[self.rank :: self.world_size])

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), indexed by rank; ``[value]`` in a single process."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, wait: bool = True) -> None:
        """Tear down the process group if this shard created it, after every rank got here if ``wait`` (so that no
        rank exits, and has `torchrun` stop the others, while rank 0 still writes)."""
        if self.owns_group and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
