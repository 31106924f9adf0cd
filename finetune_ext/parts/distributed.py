"""This process's place in a multi-process run, and the collectives a part needs (one process: no-ops)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class Dist:
    """Rank, world size and local rank (one process: 0, 1, 0); reached by parts through ``RunContext.dist``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP: parameters are DTensor shards outside the forward, and every forward is collective

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that writes files and solves LPs)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place; returned."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` averaged over the processes."""
        return self.sum_(tensor.detach().clone()).div_(self.world) if self.world > 1 else tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (any picklable value)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def mean_across_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all processes (the value itself without a process group), as a host float."""
    if _joined():
        value = value.detach().clone().double()
        if dist.get_backend() == "nccl" and value.device.type != "cuda":
            value = value.cuda()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it, in the same order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a whole value, the same on every process) as this process's shard of it when ``like`` is a
    DTensor, laid out as ``like``; otherwise ``tensor``. No communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
