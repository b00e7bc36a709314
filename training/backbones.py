"""Backbones and the exported-backbone file format.

The backbone is a torchvision ResNet with ``fc`` replaced by ``nn.Identity`` (output: the pooled
feature, ``[N, feature_dim]``). For small images (crop <= 64) the CIFAR variant is used: a 3x3
stride-1 stem and no max-pool, as in the Un-Mix paper's CIFAR experiments.

``backbone.pt`` (written at the end of pretraining, read by ``eval``) is a plain dict::

    {"state_dict": <backbone state_dict, torchvision key names without fc.*>,
     "meta": {"arch": "resnet50", "small_images": False, "feature_dim": 2048, "method": "moco_v2",
              "unmix": True, "epochs": 200, "mlflow_run_id": "...", "mlflow_tracking_uri": "...", ...}}

so evaluation needs neither DeepSpeed nor any key rewriting. A bare torchvision state_dict (with or
without ``fc.*``) loads too, given the architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from unmix.training import safe_load
from unmix.training.atomic import replacing
from unmix.training.config import ARCHS
from unmix.training.tracking import without_credentials

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


def save_backbone(path: str | Path, backbone: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``backbone.pt`` atomically (temporary file, then rename); a tracking URI in ``meta`` is
    stored without credentials."""
    path = Path(path)
    meta = {
        "arch": backbone.arch,
        "small_images": backbone.small_images,
        "width": backbone.width,
        "feature_dim": backbone.feature_dim,
        **meta,
    }
    if "mlflow_tracking_uri" in meta:
        meta["mlflow_tracking_uri"] = without_credentials(meta["mlflow_tracking_uri"])
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    with replacing(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)
    return path


def _why_unreadable(path: Path, exc: Exception) -> str:
    """What is wrong with a file ``torch.load`` refused, in words (not the unpickler's opcode number)."""
    if path.is_dir():
        return "it is a directory (give the backbone.pt file inside a run's output_dir)"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return (
            f"a torch.save zip archive ({size} bytes) that cannot be loaded, truncated or damaged "
            f"({type(exc).__name__})"
        )
    if head[:1] == b"\x80":  # a pickle (legacy torch.save format or plain pickle)
        return f"a pickle file torch cannot load as tensors only ({type(exc).__name__}: {exc})"
    return (
        f"not written by torch.save (it starts with {head!r}); expected a backbone.pt from `unmix train` "
        "or a torchvision ResNet state_dict"
    )


def load_backbone(
    path: str | Path,
    *,
    arch: str | None = None,
    small_images: bool | None = None,
    crop: int | None = None,
    width: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported backbone (or a bare torchvision ResNet state_dict, with ``arch`` given).

    Returns the module (CPU, eval mode, parameters as stored) and its metadata. Keys that do not match
    the architecture raise ``ValueError`` listing the missing and unexpected keys.
    """
    path = Path(path)
    try:
        obj = safe_load.load(path)  # weights only: a file holding code is refused, naming the global
    except (FileNotFoundError, safe_load.UnsafeFileError):
        raise
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{path}: not a readable backbone file: {_why_unreadable(path, exc)}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state, meta = obj["state_dict"], dict(obj.get("meta", {}))
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise ValueError(f"{path}: expected a backbone.pt dict or a ResNet state_dict")
    arch = arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"{path}: no architecture in the file's metadata; pass the architecture explicitly")
    if small_images is None:
        small_images = meta.get("small_images")
    if small_images is None and crop is None and "conv1.weight" in state:
        small_images = tuple(state["conv1.weight"].shape[-2:]) == (3, 3)
    if width is None:
        width = meta.get("width") or (int(state["bn1.weight"].shape[0]) if "bn1.weight" in state else 64)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net = build_backbone(arch, small_images=small_images, crop=crop, width=width)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match {arch} (small_images={net.small_images}): "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"{path}: does not fit {arch}: {exc}") from exc
    meta.setdefault("arch", arch)
    meta.setdefault("small_images", net.small_images)
    meta.setdefault("width", net.width)
    meta.setdefault("feature_dim", net.feature_dim)
    return net.eval(), meta
