"""The tensor-parallel group as layers see it. At world size 1 every collective is a no-op and no
process group exists; layers capture the group current while the model is built, so two engines in
one process never share state."""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: "dist.ProcessGroup | None" = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's x along dim (on every rank)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim)


_building_group = ParallelGroup()


@contextmanager
def building_with(group: ParallelGroup):
    """Layers constructed inside this block shard themselves for `group`."""
    global _building_group
    previous, _building_group = _building_group, group
    try:
        yield
    finally:
        _building_group = previous


def current_group() -> ParallelGroup:
    return _building_group
