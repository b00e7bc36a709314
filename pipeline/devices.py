"""Which CUDA device a process uses: one rule for the loaders, training and evaluation.

Launchers give each process a local rank (``LOCAL_RANK``, or Slurm's ``SLURM_LOCALID`` mapped to it by
``unmix.training.dist.map_slurm_env``), and the usual rule is "local rank r uses ``cuda:r``". That breaks
under ``srun --gpus-per-task=1`` or ``--gpu-bind``: Slurm then sets ``CUDA_VISIBLE_DEVICES`` per task,
each task sees only its own GPU(s) as ``cuda:0``..., while its local rank is still 0..7, and
``torch.cuda.set_device(3)`` fails with "invalid device ordinal". :func:`local_cuda_index` indexes the
*visible* devices instead: the local rank when that many are visible, else ``local_rank % visible``.
``torch.cuda.device_count()`` already counts only the devices ``CUDA_VISIBLE_DEVICES`` lets through, so
the index is always one the process can open.
"""

from __future__ import annotations

import os

import torch


def local_rank_from_env() -> int:
    """``LOCAL_RANK`` (0 when unset or empty)."""
    value = os.environ.get("LOCAL_RANK") or "0"
    try:
        rank = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={value!r}: expected a non-negative integer") from None
    if rank < 0:
        raise ValueError(f"LOCAL_RANK={value!r}: expected a non-negative integer")
    return rank


def local_cuda_index(local_rank: int | None = None) -> int:
    """The index, among the visible CUDA devices, of the device this process computes on.

    ``local_rank`` defaults to ``LOCAL_RANK``. With ``n`` visible devices the result is
    ``local_rank % n``: ``local_rank`` itself on a node where every process sees every GPU, 0 when each
    task sees only its own. Raises RuntimeError when no CUDA device is visible.
    """
    if local_rank is None:
        local_rank = local_rank_from_env()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise RuntimeError(f"no CUDA device is visible{hint}")
    return local_rank % n


def local_cuda_device(local_rank: int | None = None) -> torch.device:
    """``torch.device("cuda", local_cuda_index(local_rank))``, made the current device."""
    index = local_cuda_index(local_rank)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
