"""``backbone.pt``: the exported backbone and its metadata, one typed and versioned record.

Written once at the end of pretraining (:func:`save_backbone`), read by every evaluation
(:func:`load_backbone`); nothing else opens the file or looks inside its metadata. The file is a plain
dict of tensors and builtins (it loads weights-only)::

    {"format_version": 2,
     "state_dict": <backbone state_dict, torchvision key names without fc.*>,
     "meta": {"arch": "resnet50", "small_images": False, "width": 64, "feature_dim": 2048,
              "crop": 224, "method": "moco_v2", "unmix": True, "epochs": 200, "steps": 250200, "seed": 0,
              "mlflow_run_id": "...", "mlflow_tracking_uri": "...", "mlflow_experiment": "...",
              "written_by": "<unmix version>"}}

so evaluation needs neither DeepSpeed nor any key rewriting. Format versions:

- 1: the layout before versioning: no ``format_version`` and no ``written_by``; the metadata keys were
  those of version 2 (``width`` only in later files). Migrated on load: every key of version 2 is kept,
  a missing one is filled from the weights (``width``, ``small_images``) or left unknown (None).
- 2: ``format_version`` and ``written_by`` added; every metadata key is typed and checked on load.

A newer version than :data:`FORMAT_VERSION` is refused with one line naming the file and the version.
A bare torchvision ResNet state_dict (with or without ``fc.*``) loads too, given the architecture.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import unmix
from unmix.training import safe_load
from unmix.training.atomic import replacing
from unmix.training.backbones import build_backbone
from unmix.training.config import ARCHS
from unmix.training.tracking import without_credentials

FORMAT_VERSION = 2
# The fields the backbone module itself determines (the rest record where it came from).
_SHAPE_FIELDS = ("arch", "small_images", "width", "feature_dim")


@dataclass(frozen=True)
class BackboneMeta:
    """What ``backbone.pt`` records beside the weights. None: not known (a bare state dict, a floor)."""

    arch: str  # a torchvision ResNet name, or "pixels" for the pixel floor (never in a file)
    small_images: bool | None  # CIFAR stem (3x3 conv, stride 1, no max-pool); None: not a ResNet
    width: int | None  # base channel count (torchvision: 64); None: not a ResNet
    feature_dim: int  # D of the pooled features [N, D]
    crop: int | None = None  # the pretraining crop (evaluation's default crop)
    method: str | None = None  # moco_v2 | moco_v1 | byol | simclr
    unmix: bool | None = None  # trained with the Un-Mix loss
    epochs: int | None = None
    steps: int | None = None  # optimizer steps done
    seed: int | None = None
    mlflow_run_id: str | None = None  # the pretraining run evaluations report to
    mlflow_tracking_uri: str | None = None  # stored without credentials
    mlflow_experiment: str | None = None
    written_by: str | None = None  # the unmix version that wrote the file (None before version 2)

    @classmethod
    def of(cls, backbone: nn.Module, **provenance: Any) -> BackboneMeta:
        """The record of a module from :func:`~unmix.training.backbones.build_backbone`, plus
        ``provenance`` (the other fields, by name)."""
        return cls(
            arch=backbone.arch,
            small_images=backbone.small_images,
            width=backbone.width,
            feature_dim=backbone.feature_dim,
            **provenance,
        )

    def to_saved(self) -> dict[str, Any]:
        """The ``meta`` dict of the file (builtins only)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# Field name -> the builtin type of its value in a file (None is allowed for every field: not known).
FIELD_TYPES: dict[str, type] = {
    name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    for name, hint in typing.get_type_hints(BackboneMeta).items()
}


def save_backbone(path: str | Path, backbone: nn.Module, meta: BackboneMeta) -> Path:
    """Write ``backbone.pt`` (format :data:`FORMAT_VERSION`) atomically: temporary file, then rename.

    ``meta`` must describe ``backbone`` (:meth:`BackboneMeta.of`); a tracking URI is stored without
    credentials and ``written_by`` is this unmix's version.
    """
    path = Path(path)
    described = {k: getattr(meta, k) for k in _SHAPE_FIELDS}
    actual = {k: getattr(backbone, k, None) for k in _SHAPE_FIELDS}
    if described != actual:
        raise ValueError(f"{path}: the metadata {described} does not describe the backbone {actual}")
    uri = without_credentials(meta.mlflow_tracking_uri) if meta.mlflow_tracking_uri else None
    meta = dataclasses.replace(meta, mlflow_tracking_uri=uri, written_by=unmix.__version__)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    with replacing(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, "state_dict": state, "meta": meta.to_saved()}, tmp)
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


def _check_version(path: Path, version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path}: backbone.pt format_version {version!r} is not a version unmix writes "
            f"(1 to {FORMAT_VERSION}); export the backbone again with `unmix train`"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: backbone.pt format version {version} is newer than this unmix ({unmix.__version__}) "
            f"reads (1 to {FORMAT_VERSION}); evaluate it with the unmix version that wrote it, or upgrade"
        )
    return version


def _parse_meta(path: Path, version: int, meta: Any) -> dict[str, Any]:
    """The metadata dict of a file of format ``version``, migrated to the current fields and type-checked;
    ValueError naming the file, the key and the value."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: backbone.pt 'meta' is a {type(meta).__name__}, expected a dict")
    if version == 1:  # the unversioned layout: same keys, nothing else was ever written
        meta = {k: v for k, v in meta.items() if k in FIELD_TYPES}
    unknown = sorted(set(meta) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(
            f"{path}: backbone.pt (format version {version}) has unknown metadata key(s) {', '.join(unknown)}"
        )
    for key, value in meta.items():
        kind = FIELD_TYPES[key]
        if value is not None and not (isinstance(value, kind) and (kind is bool) == isinstance(value, bool)):
            raise ValueError(f"{path}: backbone.pt metadata {key}={value!r} is not of type {kind.__name__}")
    if meta.get("arch") is not None and meta["arch"] not in ARCHS:
        known = ", ".join(ARCHS)
        raise ValueError(f"{path}: backbone.pt metadata arch={meta['arch']!r} is not one of {known}")
    return meta


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict and the (migrated, checked) metadata of ``path``; metadata None for a bare state
    dict. ValueError (one line naming the file) for anything else."""
    try:
        obj = safe_load.load(path)  # weights only: a file holding code is refused, naming the global
    except (FileNotFoundError, safe_load.UnsafeFileError):
        raise
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{path}: not a readable backbone file: {_why_unreadable(path, exc)}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        version = _check_version(path, obj.get("format_version", 1))
        return obj["state_dict"], _parse_meta(path, version, obj.get("meta", {}))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(f"{path}: expected a backbone.pt dict or a ResNet state_dict")


def load_backbone(
    path: str | Path,
    *,
    arch: str | None = None,
    small_images: bool | None = None,
    crop: int | None = None,
    width: int | None = None,
) -> tuple[nn.Module, BackboneMeta]:
    """Load an exported backbone (or a bare torchvision ResNet state_dict, with ``arch`` given).

    Returns the module (CPU, eval mode, parameters as stored) and its metadata, whose architecture
    fields are the module's. Keys that do not match the architecture raise ``ValueError`` listing the
    missing and unexpected keys.
    """
    path = Path(path)
    state, meta = _read(path)
    meta = meta or {}
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
    provenance = {k: v for k, v in meta.items() if k not in _SHAPE_FIELDS}
    return net.eval(), BackboneMeta.of(net, **provenance)
