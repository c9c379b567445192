"""Process-group facts for data-parallel zero-shot runs under ``torchrun`` (one process otherwise)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "resolve_device"]


class DistributedContext:
    """Process group facts: ``rank``, ``world_size``, ``local_rank``, ``device``.

    :meth:`from_env` joins the group that ``torchrun`` describes (``WORLD_SIZE`` > 1; backend
    nccl on CUDA, gloo on CPU); without it the run is a single process.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device = torch.device("cpu"), owns_group: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.owns_group = owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistributedContext":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device, local_rank)
        if world_size <= 1:
            return cls(0, 1, 0, resolved)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, resolved, owns)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``"cuda"`` gets
    the local rank's GPU. Raises ``ValueError`` for CUDA without a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return resolved
