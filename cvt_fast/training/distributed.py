"""Process-group set-up for torchrun (single process when WORLD_SIZE is unset or 1).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; we use NCCL
with one GPU per process when CUDA is available, gloo on the CPU. Only rank 0 writes
files; metrics are summed over ranks with all_reduce. BatchNorm running statistics, which
each rank updates from its own batches, are averaged over ranks wherever they are used
(evaluation) or saved (`averaged_batch_norm`).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Different streams per rank (augmentation, dropout) from one configured seed."""
    s = int(seed) + 1000 * int(rank)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64, so counts and sums stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (all ranks must then act alike)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def all_gather_object(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def batch_norm_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running_mean and running_var buffers of every BatchNorm in `module`, by state-dict name."""
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, _BATCH_NORMS) and m.running_mean is not None and m.running_var is not None:
            prefix = f"{name}." if name else ""
            found[prefix + "running_mean"] = m.running_mean
            found[prefix + "running_var"] = m.running_var
    return found


@contextmanager
def averaged_batch_norm(module: nn.Module) -> Iterator[None]:
    """Inside: the BatchNorm running statistics of `module` are their mean over all ranks (the
    same on every rank, so evaluation and saved weights agree); after: each rank's own again,
    so training continues exactly as if they had never been touched. Collective: every rank
    must enter it. A no-op in a single process."""
    stats = batch_norm_statistics(module)
    if not stats or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    own = [t.detach().clone() for t in stats.values()]
    flat = torch.cat([t.detach().double().reshape(-1) for t in own])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    with torch.no_grad():
        for t, mean in zip(stats.values(), flat.split([t.numel() for t in own])):
            t.copy_(mean.view_as(t))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, mine in zip(stats.values(), own):
                t.copy_(mine)
