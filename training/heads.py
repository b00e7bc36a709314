"""Projection and prediction heads, and the online/target network wrapper shared by the methods."""

from __future__ import annotations

from torch import Tensor, nn


def moco_head(in_dim: int, hidden_dim: int, out_dim: int, mlp: bool) -> nn.Module:
    """MoCo v2: Linear-ReLU-Linear (no BN, as in the original); MoCo v1: one Linear."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """BYOL projector/predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def simclr_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """SimCLR projection head g: Linear-BN-ReLU-Linear (2048-2048-128 on ResNet-50)."""
    return byol_mlp(in_dim, hidden_dim, out_dim)


class Network(nn.Module):
    """``backbone -> head [-> predictor]``; ``forward(*views)`` embeds each view in its own pass.

    Separate passes keep each view's batch-norm statistics separate (the mixed batch is normalised
    on its own, as in the authors' code). ``forward`` is pure: it returns the embeddings only.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.predictor = predictor

    def embed(self, x: Tensor) -> Tensor:
        z = self.head(self.backbone(x))
        return z if self.predictor is None else self.predictor(z)

    def forward(self, *views: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.embed(v) for v in views)


def freeze_bn_stats(net: nn.Module) -> nn.Module:
    """Make batch-norm layers keep their running statistics fixed (momentum 0).

    Target networks always run in train mode (batch statistics), so their running statistics are never
    read; freezing them keeps the target bitwise identical on every rank, where each rank sees
    different data.
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return net
