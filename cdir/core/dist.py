"""Multi-process runs launched by ``torchrun``: joining the process group, and the collectives the
trainer and the methods use. Every helper is a no-op (or the identity) without a process group, so
the same code runs in one process. torch is imported inside the functions so that importing this
module stays cheap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdir.core.device import resolve_device

if TYPE_CHECKING:
    import torch


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass
class Dist:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)
    owns_group: bool = False  # setup_distributed created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """This process's global rank as torchrun announced it (0 when not launched by torchrun);
    readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str = "auto", backend: str = "auto",
                      flag: str = "--set train.device") -> Dist:
    """Pick the device (``cdir.core.device.resolve_device``; ``auto`` is this process's GPU) and,
    when torchrun started more than one process, join the process group (NCCL on GPUs, Gloo on
    CPUs unless ``backend`` says otherwise)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, flag=flag, index=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def teardown(d: Dist) -> None:
    """Destroy the process group if ``setup_distributed`` created it."""
    if d.owns_group and dist_ready():
        import torch.distributed as dist

        dist.destroy_process_group()


@contextmanager
def torchrun_group(device: str | None) -> Iterator[Dist | None]:
    """The process group of a batch-inference command (`embed`, `caption`) when torchrun
    started several processes, destroyed on the way out; None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    d = setup_distributed(device or "auto", flag="--device")
    try:
        yield d
    finally:
        teardown(d)


def dist_ready() -> bool:
    """True when a torch.distributed process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    if dist_ready():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order); ``x`` itself without a group.

    No gradient flows back through the gather (it is only used for keys and key images)."""
    import torch
    import torch.distributed as dist

    _, world = rank_world()
    if world == 1:
        return x
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` replaced in place by rank ``src``'s copy (unchanged without a group)."""
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.broadcast(x, src=src)
    return x


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a number over all ranks (the number itself without a group)."""
    _, world = rank_world()
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return float(t) / world


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a group)."""
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
