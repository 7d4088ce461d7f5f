"""Rank, world size and the few collectives the eval runner needs (no-ops in one process);
what is gathered, summed and broadcast is said in :mod:`mllmcal.eval.runner`."""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["Dist"]


class Dist:
    """The process group, started here under ``torchrun`` unless one is running already.

    Attributes:
        on: a process group is initialised (collectives do something).
        rank, world: this process's rank and the number of processes (0 and 1 alone).
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and dist.is_available() and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("MLLMCAL_DIST_BACKEND") != "gloo" else "gloo"
            dist.init_process_group(backend)
            self.owned = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear down the process group if this object started it."""
        if self.owned:
            self.dist.barrier()
            self.dist.destroy_process_group()
