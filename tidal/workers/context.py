"""What a role knows about the process it runs in. Built by the Worker before any role."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerContext:
    rank: int  # rank in this worker group's torch.distributed world
    world_size: int
    dp_rank: int  # data-parallel coordinates: rank // tp_size, world_size // tp_size
    dp_size: int
    device: torch.device  # cpu, or this rank's cuda device
    backend: str  # "gloo" or "nccl"; the default process group is initialised before roles are built
    tp_size: int = 1  # ranks that run one model together (a tensor-parallel rollout engine); consecutive

    @property
    def is_collect_rank(self) -> bool:
        """The rank whose result stands for its data-parallel replica (its first tensor-parallel rank)."""
        return self.rank % self.tp_size == 0
