"""Batch-norm variants and conversions: SplitBatchNorm (Shuffle-BN on one process) and back to plain BN.

MoCo's Shuffle-BN needs the key encoder's BN statistics to come from several groups of samples (one per
GPU). On one process the authors' CIFAR code (``unmix_c10.py``) and facebookresearch/moco's CIFAR demo
emulate the GPUs with ``SplitBatchNorm``: in train mode each BN layer normalises every split of the batch
with that split's own statistics. :class:`SplitBatchNorm2d` computes exactly what theirs does:

- split ``s`` holds the samples ``n`` with ``n % num_splits == s`` (their ``input.view(-1, C * S, H, W)``);
- the running statistics become the mean over the splits of each split's momentum update;
- eval mode is a plain BatchNorm2d with the running statistics.

The exported backbone must stay a torchvision ResNet: :func:`plain_batchnorm` turns SplitBatchNorm2d and
SyncBatchNorm back into BatchNorm2d with the same state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are computed per split of the batch (``num_splits``).

    The same parameters and buffers as BatchNorm2d (state_dicts are interchangeable). The batch must be
    divisible by ``num_splits``.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:  # x: NxCxHxW
        if not (self.training or not self.track_running_stats):
            return super().forward(x)  # eval: the running statistics, like BatchNorm2d
        S = self.num_splits
        N, C, H, W = x.shape
        if N % S:
            raise ValueError(
                f"SplitBatchNorm2d: a batch of {N} is not divisible by {S} splits "
                "(method.moco.bn_splits); choose a batch size that is a multiple of it"
            )
        momentum = self.momentum
        running_mean = running_var = None
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
            running_mean = self.running_mean.repeat(S)  # (S*C): split s's copy at [s*C:(s+1)*C]
            running_var = self.running_var.repeat(S)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        x_split = x.contiguous().view(N // S, S * C, H, W)  # channel s*C+c: channel c of samples n % S == s
        y = F.batch_norm(
            x_split,
            running_mean,
            running_var,
            self.weight.repeat(S) if self.affine else None,
            self.bias.repeat(S) if self.affine else None,
            True,
            momentum or 0.0,
            self.eps,
        ).view(N, C, H, W)
        if running_mean is not None:  # each split's update, averaged over the splits (the reference's)
            self.running_mean.copy_(running_mean.view(S, C).mean(dim=0))
            self.running_var.copy_(running_var.view(S, C).mean(dim=0))
        return y if fmt is None or C == 1 else y.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _bn_kwargs(m: nn.modules.batchnorm._BatchNorm) -> dict:
    return {
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _like(new: nn.Module, old: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """``new`` holding ``old``'s state, on its device and in its dtype, in its train/eval mode."""
    ref = old.weight if old.affine else old.running_mean
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict())
    return new.train(old.training)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Every BatchNorm2d in ``module`` replaced by a :class:`SplitBatchNorm2d` with the same state.

    ``num_splits`` <= 1 returns ``module`` unchanged. Other norms (BatchNorm1d in heads, SyncBatchNorm)
    are left alone.
    """
    if num_splits <= 1:
        return module
    if type(module) is nn.BatchNorm2d:
        return _like(SplitBatchNorm2d(module.num_features, num_splits, **_bn_kwargs(module)), module)
    for name, child in module.named_children():
        module.add_module(name, split_batchnorm(child, num_splits))
    return module


def num_splits(module: nn.Module) -> int:
    """The largest ``num_splits`` of the SplitBatchNorm2d layers in ``module``; 1 when it has none."""
    return max((m.num_splits for m in module.modules() if isinstance(m, SplitBatchNorm2d)), default=1)


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm and SplitBatchNorm2d -> BatchNorm2d with the same state (a plain torchvision ResNet)."""
    if isinstance(module, (nn.SyncBatchNorm, SplitBatchNorm2d)):
        return _like(nn.BatchNorm2d(module.num_features, **_bn_kwargs(module)), module)
    for name, child in module.named_children():
        module.add_module(name, plain_batchnorm(child))
    return module
