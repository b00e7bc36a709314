"""Backbones: the ResNet trunks every method trains and every evaluation reads.

The backbone is a torchvision ResNet with ``fc`` replaced by ``nn.Identity`` (output: the pooled
feature, ``[N, feature_dim]``). For small images (crop <= 64) the CIFAR variant is used: a 3x3
stride-1 stem and no max-pool, as in the Un-Mix paper's CIFAR experiments.

The exported file (``backbone.pt``) is :mod:`unmix.training.backbone_file`.
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from unmix.training.config import ARCHS

SMALL_IMAGE_MAX_CROP = 64


def _resnet10(**kwargs: Any) -> ResNet:
    """ResNet with one BasicBlock per stage: a quick backbone for CPU demos and tests."""
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


def _set_width(net: ResNet, block: type[nn.Module], layers: list[int], width: int) -> None:
    """Rebuild ``net``'s stages with ``width`` base channels instead of 64 (same key names)."""
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i, n in enumerate(layers):
        setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(width * 8 * block.expansion, 1000)
    for m in net.modules():  # torchvision's initialisation, for the rebuilt modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(
    arch: str, *, small_images: bool | None = None, crop: int | None = None, width: int = 64
) -> nn.Module:
    """A randomly initialised ResNet trunk with ``fc = Identity`` and a ``feature_dim`` attribute.

    Args:
        arch: one of :data:`ARCHS` (torchvision names, plus ``resnet10``).
        small_images: force the CIFAR stem (3x3 conv, stride 1, no max-pool) on or off.
        crop: when ``small_images`` is None, the CIFAR stem is used for ``crop <= 64``.
        width: base channel count (torchvision: 64); narrower trunks for CPU demos and tests.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if small_images is None:
        small_images = crop is not None and crop <= SMALL_IMAGE_MAX_CROP
    if width < 8 or width % 8:
        raise ValueError(f"model.width: {width} is not a positive multiple of 8")
    net = _resnet10() if arch == "resnet10" else getattr(torchvision.models, arch)(weights=None)
    if width != 64:
        if arch == "wide_resnet50_2":
            raise ValueError(
                "model.width: wide_resnet50_2 has a fixed width; use resnet50 with a width instead"
            )
        block = type(net.layer1[0])
        _set_width(net, block, [len(getattr(net, f"layer{i}")) for i in range(1, 5)], width)
    if small_images:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.feature_dim = feature_dim
    net.arch = arch
    net.small_images = bool(small_images)
    net.width = width
    return net
