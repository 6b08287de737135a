"""Data-parallel training under ``torchrun`` (DDP semantics, open_clip's feature gathering).

Every process draws the same global batch (samplers are seeded identically), encodes its own slice,
and gathers the embeddings of all processes *with gradients* before the loss, so each process
computes the loss over the whole global batch (all negatives), as open_clip's ``gather_with_grad``.
The backward of the gather sums each slice's gradient over processes (``world_size`` times the
single-process value); averaging parameter gradients across processes, as DDP does, then gives
exactly the gradient of a single process on the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cliplab.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous slice of a global batch of ``n`` items."""
        if n % self.world_size:
            raise ConfigError(f"batch of {n} does not split evenly over {self.world_size} processes")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``x`` in rank order, keeping gradients to the local part."""
        if not self.enabled:
            return x
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)

    def average_gradients(self, params) -> None:
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
