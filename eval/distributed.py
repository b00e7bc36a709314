"""Process-group handling for evaluation: one process, ``torchrun``, or ``srun``.

Ranks come from RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or, when those are absent, from the srun
step's SLURM_* variables through :func:`unmix.training.dist.map_slurm_env` (which also sets MASTER_ADDR from
the node list and MASTER_PORT from the job id); 127.0.0.1:29500 is the single-node default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unmix.pipeline.devices import local_cuda_device
from unmix.training.knn import all_gather_rows  # noqa: F401  (one implementation, shared with training)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job and the device it computes on."""

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

    @classmethod
    def single(cls, device: torch.device) -> DistContext:
        """One process, no process group, computing on ``device``."""
        return cls(rank=0, world_size=1, local_rank=0, device=device)


def setup(device: str = "gpu") -> DistContext:
    """Join (or create) the process group described by the environment; ``device`` is "gpu" or "cpu".

    Exports RANK/WORLD_SIZE/LOCAL_RANK when they came from Slurm, so the eval loaders (which read
    them) shard the data the same way.
    """
    from unmix.training.dist import import_world_binders, map_slurm_env

    map_slurm_env()  # inside an srun step: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM_*
    rank = int(os.environ.get("RANK") or 0)
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    if device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("device=gpu: no CUDA device is visible; pass device=cpu")
        dev = local_cuda_device(local_rank)  # local_rank % visible devices (srun --gpus-per-task)
    else:
        dev = torch.device("cpu")
    if world_size > 1:
        if not dist.is_initialized():
            import_world_binders()  # or torchvision, imported later, keeps the group alive past teardown
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size
            )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown(ctx: DistContext, *, wait: bool = True) -> None:
    """Leave the process group if :func:`setup` joined one.

    With ``wait`` (the normal end) every rank first meets at a barrier, so no rank tears gloo down while
    another's collective is still in flight (which can abort the process in gloo's worker thread); after
    an error pass ``wait=False``, since the other ranks may never arrive.
    """
    if ctx.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself with one process)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over ranks."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return value
