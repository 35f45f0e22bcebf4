"""torchrun support: one process per device, DistributedDataParallel, reductions across ranks.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op on one process,
so the single-process code path is the same code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qrs.model import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", *, timeout_s: float = 600.0) -> DistContext:
    """Join the torchrun process group when launched by torchrun, else return a single-process context.

    Backend nccl on CUDA, gloo on CPU. Each process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size <= 1:
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (identity on one process)."""
    if ctx.distributed:
        values = values.to(ctx.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def all_gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(n: int, ctx: DistContext) -> list[int]:
    """This rank's indices of ``range(n)``: every world_size-th one, no padding, no duplicates."""
    return list(range(ctx.rank, n, ctx.world_size))


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """Init the process group (when under torchrun) for the duration of a job, then tear it down."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
