"""Frozen-backbone features: freezing, batched extraction, and the check that nothing moved.

The backbone stays in eval mode (BatchNorm uses its running statistics, which therefore never update)
with ``requires_grad=False`` on every parameter, and runs under ``torch.no_grad``; the evaluation code
never hands its parameters to an optimizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def freeze(backbone: nn.Module) -> nn.Module:
    """Put ``backbone`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PixelFeatures(nn.Module):
    """The "backbone" of ``unmix linear --pixels``: the loader's resized, normalised image, flattened.

    ``[B, 3, crop, crop] -> [B, 3 * crop * crop]``; no parameters. A probe on these is the cheapest honest
    baseline: features that do not beat it have learnt nothing a linear model could not read off pixels.
    """

    def __init__(self, crop: int) -> None:
        super().__init__()
        self.crop = crop
        self.feature_dim = 3 * crop * crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # x: B x 3 x crop x crop -> B x 3*crop*crop


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[B, D]`` (float32) of a frozen backbone."""
    if backbone.training:
        raise RuntimeError("embed: the backbone must be in eval mode (call eval.features.freeze first)")
    return backbone(images).float().flatten(1)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every batch ({"image": [B,3,H,W], "label": [B]}) of this rank's shard.

    Returns ``(features [N, D] float32, labels [N] int64)`` on ``device``.
    """
    feats, labels = [], []
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        feats.append(embed(backbone, x))
        labels.append(batch["label"].to(device).long().reshape(-1))
    if feats:
        f, y = torch.cat(feats), torch.cat(labels)
    else:
        dim = getattr(backbone, "feature_dim", 0)
        f, y = torch.zeros((0, dim), device=device), torch.zeros((0,), dtype=torch.long, device=device)
    return f, y
