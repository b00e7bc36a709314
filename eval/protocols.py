"""Linear-evaluation protocols (MoCo's, BYOL's) and the ``key=value`` overrides of ``unmix linear``/``knn``.

MoCo (He et al. 2020, ``main_lincls.py``; DESIGN.md §3): frozen backbone in eval mode, ``fc`` initialised
N(0, 0.01) with bias 0, SGD lr 30 per 256 images, momentum 0.9, weight decay 0, batch 256, 100 epochs,
lr x0.1 at epochs 60 and 80.

BYOL (Grill et al. 2020, arXiv 2006.07733, Appendix C.1 "Linear evaluation on ImageNet"; reference config
``deepmind-research/byol/configs/eval.py``): SGD with Nesterov momentum 0.9, no weight decay or other
regularisation, 80 epochs, batch 1024, cosine-decayed learning rate without warm-up; the paper sweeps the
base learning rate over {0.4, 0.3, 0.2, 0.1, 0.05} on a held-out split, the released config's default is
0.2 per 256 images (scaled linearly with the batch), which is the default here.

``head_norm`` (both protocols): ``bn`` (the default) puts a BatchNorm without affine parameters in front of
the linear layer, MAE's linear-probe practice (He et al. 2022, ``main_linprobe.py``), which makes the probe
insensitive to the features' scale; ``none`` is the linear layer alone, the protocols exactly as published
(MoCo's lr 30 is tuned for the small-norm features of a contrastive ResNet-50 and diverges on features of
larger scale, e.g. a random-init backbone's: docs/benchmarks.md "Linear probe: head_norm").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

PROTOCOLS = ("moco", "byol")
FEATURE_MODES = ("augmented", "cached")
DEVICES = ("gpu", "cpu")
HEAD_NORMS = ("bn", "none")
DEFAULT_CROP = 224


@dataclass
class LinearProtocol:
    """Everything that defines one linear evaluation (hyper-parameters and data handling)."""

    protocol: str = "moco"
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 30.0  # per 256 images; the applied rate is lr * batch_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "step"  # "step" (x0.1 at `milestones`) or "cosine"
    milestones: tuple[int, ...] = (60, 80)
    device: str = "gpu"
    crop: int | None = None  # None: the backbone's pretraining crop (backbone.pt meta "crop"), else 224
    features: str = "augmented"  # "augmented": backbone forward on augmented batches each epoch
    num_threads: int = 4
    seed: int = 0
    eval_every: int = 1  # evaluate on val every this many epochs (and always after the last)
    head_norm: str = (
        "bn"  # "bn": BatchNorm1d(affine=False) before the linear layer (MAE); "none": as published
    )

    def lr_at(self, epoch: float) -> float:
        """Learning rate at (fractional) ``epoch``: the batch-scaled base rate times the schedule."""
        base = self.lr * self.batch_size / 256
        if self.schedule == "cosine":
            return base * 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        # step schedule: MoCo's milestones (60, 80 of 100 epochs) scale with `epochs`, so a 10-epoch run
        # drops at 6 and 8; at the paper's 100 epochs this is exactly main_lincls.py.
        scale = self.epochs / 100 if self.protocol == "moco" else 1.0
        drops = sum(1 for m in self.milestones if int(epoch) >= round(m * scale))
        return base * (0.1**drops)


def moco_protocol() -> LinearProtocol:
    """MoCo's linear classification protocol (the default)."""
    return LinearProtocol()


def byol_protocol() -> LinearProtocol:
    """BYOL's linear evaluation protocol (see the module docstring for the source)."""
    return LinearProtocol(
        protocol="byol",
        epochs=80,
        batch_size=1024,
        lr=0.2,
        nesterov=True,
        schedule="cosine",
        milestones=(),
    )


# key -> (LinearProtocol field, parser)
_KEYS: dict[str, tuple[str, type]] = {
    "protocol": ("protocol", str),
    "epochs": ("epochs", int),
    "batch_size": ("batch_size", int),
    "lr": ("lr", float),
    "device": ("device", str),
    "data.crop": ("crop", int),
    "features": ("features", str),
    "num_threads": ("num_threads", int),
    "seed": ("seed", int),
    "eval_every": ("eval_every", int),
    "head_norm": ("head_norm", str),
}
LINEAR_KEYS = tuple(_KEYS)
KNN_KEYS = ("batch_size", "device", "data.crop", "num_threads", "seed")


def parse_overrides(items: list[str], allowed: tuple[str, ...] = LINEAR_KEYS) -> dict[str, str]:
    """``["epochs=10", "data.crop=32"]`` -> ``{"epochs": "10", "data.crop": "32"}``; unknown keys raise."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (allowed keys: {', '.join(allowed)})")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in {item!r}; allowed keys: {', '.join(allowed)}")
        out[key] = value.strip()
    return out


def resolve_protocol(overrides: dict[str, str]) -> LinearProtocol:
    """The protocol named by ``protocol=`` (default ``moco``) with the other overrides applied and checked."""
    name = overrides.get("protocol", "moco")
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r}: choose one of {', '.join(PROTOCOLS)}")
    proto = byol_protocol() if name == "byol" else moco_protocol()
    changes = {}
    for key, raw in overrides.items():
        attr, kind = _KEYS[key]
        try:
            changes[attr] = kind(raw)
        except ValueError as exc:
            raise ValueError(f"{key}={raw!r}: expected {kind.__name__}") from exc
    proto = dataclasses.replace(proto, **changes)
    if proto.device not in DEVICES:
        raise ValueError(f"device={proto.device!r}: choose one of {', '.join(DEVICES)}")
    if proto.head_norm not in HEAD_NORMS:
        raise ValueError(f"head_norm={proto.head_norm!r}: choose one of {', '.join(HEAD_NORMS)}")
    if proto.features not in FEATURE_MODES:
        raise ValueError(f"features={proto.features!r}: choose one of {', '.join(FEATURE_MODES)}")
    for key, attr in (
        ("epochs", "epochs"),
        ("batch_size", "batch_size"),
        ("data.crop", "crop"),
        ("num_threads", "num_threads"),
        ("eval_every", "eval_every"),
    ):
        if getattr(proto, attr) is not None and getattr(proto, attr) < 1:
            raise ValueError(f"{key}={getattr(proto, attr)}: must be >= 1")
    if proto.lr <= 0:
        raise ValueError(f"lr={proto.lr}: must be > 0")
    return proto


def with_crop(proto: LinearProtocol, meta: dict) -> LinearProtocol:
    """``proto`` with ``crop`` filled in: ``data.crop`` if given, else the pretraining crop, else 224."""
    if proto.crop is not None:
        return proto
    return dataclasses.replace(proto, crop=int(meta.get("crop") or DEFAULT_CROP))


def as_params(proto: LinearProtocol) -> dict[str, object]:
    """Flat MLflow params of a protocol."""
    d = dataclasses.asdict(proto)
    d["milestones"] = ",".join(str(m) for m in proto.milestones)
    return d
