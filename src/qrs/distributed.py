"""torchrun support: one process per device, DistributedDataParallel, reductions across ranks.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op on one process,
so the single-process code path is the same code. A rank blocked in a collective (a peer died or
hangs) gives up after ``QRS_DIST_TIMEOUT_S`` seconds (default 600) instead of waiting forever.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qrs.errors import QrsError
from qrs.model import resolve_device

TIMEOUT_ENV = "QRS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


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


def is_main_process() -> bool:
    """True unless this process is a torchrun rank other than 0 (for output outside a process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def collective_timeout_s() -> float:
    """Seconds a collective may wait for the other ranks: ``QRS_DIST_TIMEOUT_S``, else 600."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:
        raise QrsError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def init_distributed(device: str = "auto", *, timeout_s: float | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun, else return a single-process context.

    Backend nccl on CUDA, gloo on CPU. Each process takes the GPU of its local rank. ``timeout_s``
    (default: ``collective_timeout_s()``) bounds every collective, so no rank hangs forever.
    The group is joined once and kept until the process exits, so one process can run several jobs
    (train, then calibrate, then extract): a group destroyed under torchrun cannot be joined again,
    its peers' addresses stay in torchrun's store.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size <= 1:
        return DistContext(device=dev)
    if dev.type == "mps":
        raise QrsError("torchrun runs on CUDA (nccl) or CPU (gloo), not MPS; use --device cpu")
    timeout = collective_timeout_s() if timeout_s is None else timeout_s
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
        )
        atexit.register(_destroy)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(status: int, message: str = "") -> None:
    """End a torchrun worker that failed with ``status`` before its process group is torn down,
    ``message`` (e.g. the traceback) written to stderr first.

    The teardown at exit closes the peers' connections while this process is still finishing; a
    peer then fails on the closed connection, and torchrun may stop this process (SIGTERM) before it
    exits and report the peer's error instead of this one. Leaving at once, streams flushed, makes
    ``status`` this worker's exit code. Without a process group it returns (nothing written) and the
    caller exits its usual way.
    """
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.write(message)
        sys.stderr.flush()
        os._exit(status)


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


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op on one process)."""
    if not ctx.distributed:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks: rank 0 builds a shared file (an image
    cache) once, and the others find it built instead of writing it too."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP syncs buffers at the start of each forward pass, so after an epoch's last step every rank
    holds the statistics of its own last batch; this makes validation and the final model the same
    on every rank and equal to rank 0's checkpoint.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shard_indices(n: int, ctx: DistContext) -> list[int]:
    """This rank's indices of ``range(n)``: every world_size-th one, no padding, no duplicates."""
    return list(range(ctx.rank, n, ctx.world_size))

