"""torchrun support: process-group init from the environment, rank helpers, rank-0 printing,
metric all-reduce, the DDP wrap, and what a rank does when another one is gone. Without torchrun
everything degrades to one process.

One node or several is the same code: torchrun (one launcher per node, c10d rendezvous) sets RANK,
WORLD_SIZE, LOCAL_RANK and GROUP_WORLD_SIZE (the node count), and the process group's timeout bounds
how long a rank waits in a collective for a peer that stopped answering.

Which device a process uses is decided here too (`pick_device`): `train.device` and the commands'
`--device` say auto, cpu, cuda or mps; auto takes CUDA, then Apple's MPS, then the CPU.
"""

import builtins
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vit.errors import PeerLost, UserError


@dataclass
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    nodes: int = 1  # torchrun's launchers (GROUP_WORLD_SIZE): one per machine

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0, key: str = "train.device") -> torch.device:
    """The device `requested` names ("auto", "cpu", "cuda" or "mps"; `key` is where it was asked for, for
    the error); auto takes CUDA (this process's local rank's GPU), then MPS, then the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key} is cuda but torch sees no CUDA GPU here; set {key} to auto or cpu.")
        return torch.device("cuda", local_rank)
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{key} is mps but torch sees no Apple GPU (MPS) here; set {key} to auto or cpu.")
        return torch.device("mps")
    if requested != "cpu":
        raise UserError(f"{key} is {requested!r}; choose one of auto, cpu, cuda, mps.")
    return torch.device("cpu")


def init(device: str = "auto", key: str = "train.device", timeout_s: Optional[float] = None) -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK/GROUP_WORLD_SIZE, take the device `device` names (see
    pick_device); nccl on CUDA, gloo on the CPU; silence other ranks. `timeout_s` bounds every collective
    (None: torch's default, 10 min for nccl, 30 for gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    device = pick_device(device, local_rank, key)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "mps" and world_size > 1:
        raise UserError(f"{key} is mps but this launch has {world_size} processes, and torch's process groups do not "
                        f"run on MPS; launch one process (python main.py), or set {key} to cpu.")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}))
    quiet_unless_main(rank == 0)
    return Dist(rank, world_size, local_rank, device, nodes)


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


def wrap(model: torch.nn.Module, d: Dist, strategy: str = "ddp") -> torch.nn.Module:
    """DDP on top of the model when there is more than one process and train.strategy is "ddp" (FSDP
    shards the model in place instead: vit/train/fsdp.py)."""
    if not d.enabled or strategy != "ddp":
        return model
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def check_shared(exists: bool, path: str, d: Dist) -> None:
    """Refuse to go on when the ranks disagree on whether `path` exists: the run folder is not on a file
    system every node shares, so a resume would start some ranks afresh and others from last.pt."""
    seen = gather(exists, d)
    if len(set(seen)) > 1:
        have, lack = [r for r, s in enumerate(seen) if s], [r for r, s in enumerate(seen) if not s]
        raise UserError(f"{path} exists for rank(s) {have} but not for rank(s) {lack}: output.dir must be on a file "
                        f"system every node shares (as the data must be); put it there, or copy the run folder to "
                        f"every node before --resume.")


def lockstep(batches, d: Dist):
    """Each of this rank's batches, then None while another rank still has some: under FSDP every forward
    gathers weights from all ranks, so each rank must run as many as the rank with the most batches."""
    for batch in batches:
        any_rank(True, d)
        yield batch
    while any_rank(False, d):
        yield None


# what gloo says when a peer's socket closed or a collective ran past the timeout: a plain RuntimeError
# (nccl and the c10d store raise torch.distributed.DistError)
LOST_PEER_WORDS = ("/gloo/", "pair closure", "Connection reset by peer", "Connection closed by peer")


@contextmanager
def watch_peers(d: Dist, resume_hint: str = "--resume"):
    """Turn the error a collective raises when another rank is gone (its node died or was killed, its
    process stopped, the network failed, or it stopped answering for the process group's timeout) into
    PeerLost, one sentence every surviving rank says; `resume_hint` is how to continue the run."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if not d.enabled or not (isinstance(e, dist.DistError) or any(w in str(e) for w in LOST_PEER_WORDS)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLost(f"rank {d.rank} of {d.world_size} stopped because another process of this distributed run is "
                       f"gone or stopped answering ({first[:160]}); once every node can run again, continue from the "
                       f"last checkpoint with: {resume_hint}") from None


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
