"""torchrun support: process-group init from the environment, rank helpers, rank-0 printing,
metric all-reduce and the DDP wrap. Without torchrun everything degrades to one process.
"""

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init() -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; nccl on CUDA, gloo on CPU; silence other ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    quiet_unless_main(rank == 0)
    return Dist(rank, world_size, local_rank, device)


def quiet_unless_main(is_main: bool) -> None:
    """Make print() a no-op on ranks other than 0 (print(..., force=True) still prints); DeiT's trick."""
    original = getattr(builtins.print, "_original", builtins.print)

    def print_(*args, force=False, **kwargs):
        if is_main or force:
            original(*args, **kwargs)

    print_._original = original
    builtins.print = print_


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op with one process); returns it."""
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, d: Dist) -> bool:
    """True on every rank when `flag` is true on any rank (for stopping all ranks together)."""
    if not d.enabled:
        return bool(flag)
    t = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled through the process group)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP on top of the model when there is more than one process."""
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
