"""SyncBatchNorm: which networks synchronise their batch statistics across ranks, and the conversion.

Each method says it itself (``sync_bn``, ``sync_target`` of :class:`unmix.training.methods.Method`):

- MoCo: the query encoder only (``method.moco.sync_bn``). The key encoder must keep per-rank BN: its
  decorrelation from the queries is what Shuffle-BN provides (MoCo §3.3), and synchronised statistics
  would both defeat that and add a collective to every key forward. The key encoder is therefore copied
  from the query encoder *before* the conversion.
- BYOL: online and target (``method.byol.sync_bn``). BYOL's reference implementation computes batch
  statistics across all devices in both networks (the target is the same network function with EMA
  parameters), so the target keeps SyncBatchNorm too; it has no Shuffle-BN to protect.
- SimCLR: the online network (``method.simclr.sync_bn``), as SimCLR's global BN; it has no target.

The conversion keeps the parameter and buffer tensors (``convert_sync_batchnorm`` re-uses them), so it
can run after the target copy and after the module moved to its device. torch's SyncBatchNorm forward
needs CUDA tensors; the conversion itself works on any module (the tests check module types on CPU).
"""

from __future__ import annotations

import torch
from torch import nn


def wanted(sync_bn: bool, world: int, device: torch.device) -> bool:
    """SyncBatchNorm only when asked, with several processes, on CUDA (it has no CPU kernel)."""
    return bool(sync_bn) and world > 1 and device.type == "cuda"


def convert(
    online: nn.Module, target: nn.Module | None, *, sync_target: bool
) -> tuple[nn.Module, nn.Module | None]:
    """``(online, target)`` with their BatchNorm layers turned into SyncBatchNorm; ``target`` only when
    ``sync_target`` (and there is one). The returned modules share parameters and buffers with the
    given ones."""
    online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
    if sync_target and target is not None:
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    return online, target
