"""Linear-evaluation protocols (logreg, MoCo's, BYOL's) and the ``key=value`` overrides of ``unmix linear``.

logreg (the reference, :mod:`unmix.eval.logreg`): CLIP's linear probe on cached features: standardised,
multinomial logistic regression fitted by L-BFGS to convergence, L2 strength from a log grid on a held-out
10 % of train. The default: ``unmix linear`` with no ``protocol=`` runs it, unless ``features=augmented`` or a
key only the SGD protocols have (``SGD_KEYS``: ``epochs``, ``lr``, ``lr_grid``, ``weight_decay``,
``wd_grid``, ``head_norm``, ``eval_every``) is given: then ``moco``.

Features (``features=``): ``cached`` (the default, every protocol) extracts train and val features once with
the val transform; ``augmented`` runs the backbone on RandomResizedCrop + flip batches every epoch, the
papers' data path. Augmented training is not a default because it understates a backbone by an amount that
depends on how invariant its features are to the augmentation, not on what they hold: on the digits sample at
crop 32 (docs/benchmarks.md "Linear probe: augmented features") a random-init ResNet-10 reads 98.05 with
``logreg`` and 97.4 with moco at lr 0.3 and weight decay 0.001 on cached features, but 78.0 with moco on
augmented ones (92.5 with only a random 4-pixel shift, 79.9 with the shift and flips). Ask for it to
train the way the papers do, and compare its numbers only with each other.

MoCo (He et al. 2020, ``main_lincls.py``; DESIGN.md §3): frozen backbone in eval mode, ``fc`` initialised
N(0, 0.01) with bias 0, SGD lr 30 per 256 images, momentum 0.9, weight decay 0, batch 256, 100 epochs,
lr x0.1 at epochs 60 and 80.

BYOL (Grill et al. 2020, arXiv 2006.07733, Appendix C.1 "Linear evaluation on ImageNet"; reference config
``deepmind-research/byol/configs/eval.py``): SGD with Nesterov momentum 0.9, no weight decay or other
regularisation, 80 epochs, batch 1024, cosine-decayed learning rate without warm-up; the released config's
default base learning rate is 0.2 per 256 images (scaled linearly with the batch).

``head_norm`` (both SGD protocols): ``bn`` (the default) puts a BatchNorm without affine parameters in
front of the linear layer, MAE's linear-probe practice (He et al. 2022, ``main_linprobe.py``), which makes
the probe insensitive to the features' scale. On unit-variance inputs the published learning rates are far
too large (lr 30 gives training losses of hundreds), and no single smaller pair suits every data set: lr 0.3
per 256 with weight decay 0.001 lands within 1 point of ``logreg`` on the ResNet features of digits and
photos, but 2.7-3.1 points below on the hard shifted-digits sample (and on its pixels moco is stopped by the
guard). So with ``bn``, on cached features, both protocols choose their (lr, weight_decay) as ``logreg``
chooses its L2: each pair of ``lr_grid`` (0.03, 0.1, 0.3) x ``wd_grid`` (0.001, 0.01, 0.1) trains on train
less the stratified, seeded held-out ``holdout`` (10 %), and the pair with the lowest held-out
cross-entropy is refit on all of train: 9 fits and a refit, cheap on cached features. The held-out
cross-entropy, not its top-1: on a small held-out part the top-1 moves in one-image steps, and the highest
of nine such numbers picks worse heads (docs/benchmarks.md "Choosing lr and weight decay on held-out
train"). ``lr=`` or ``weight_decay=`` fixes that value (no search on its axis); on augmented features (a
backbone pass per epoch) both protocols train at lr 0.3 and weight decay 0.001. BYOL's batch is 256 with
``bn``: the same epochs at the same cost, 4x the steps (at batch 1024 a small set gets 2 steps an epoch,
160 in all, and the head is under-trained: 1.5-3.6 points below ``logreg`` on the digits sample). Measured
over 5 seeds (docs/benchmarks.md "Linear probe: protocols"): within 1 point of ``logreg`` on average on
every feature set of digits and shifted-digits (random-init, pretrained, raw pixels) and on photos'
random-init features; on photos' raw pixels (12,288 features for 480 images) 1.5-2.7 points below, where no
pair of the grid holds at every seed: read ``logreg``. ``head_norm=none`` restores the published ``lr``
and ``weight_decay`` with no search: the paper's protocol, exactly, for features of the scale it was tuned
on (a contrastive ResNet-50's).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

PROTOCOLS = ("logreg", "moco", "byol")
SGD_PROTOCOLS = ("moco", "byol")
FEATURE_MODES = ("augmented", "cached")
DEVICES = ("gpu", "cpu")
HEAD_NORMS = ("bn", "none")
DEFAULT_CROP = 224
# with head_norm=bn (unit-variance inputs): (lr per 256, weight_decay) on augmented features, and the grids
# whose best pair on held-out train is used on cached features; measured (module docstring)
BN_HEAD_LR, BN_HEAD_WEIGHT_DECAY = 0.3, 0.001
BN_HEAD_LR_GRID, BN_HEAD_WD_GRID = (0.03, 0.1, 0.3), (0.001, 0.01, 0.1)
BYOL_BN_HEAD_BATCH = 256  # BYOL's batch with head_norm=bn (module docstring)


@dataclass
class LinearProtocol:
    """Everything that defines one linear evaluation (hyper-parameters and data handling)."""

    protocol: str = "moco"
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 30.0  # per 256 images; the applied rate is lr * batch_size / 256
    # SGD on cached features: the (lr, weight_decay) pairs of lr_grid x wd_grid are each trained on train
    # less the held-out part, the best is refit on all of train (an empty grid: `lr` / `weight_decay`).
    # Augmented features train at `lr` and `weight_decay` (a search would cost a backbone pass per epoch).
    lr_grid: tuple[float, ...] = ()
    wd_grid: tuple[float, ...] = ()
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "step"  # "step" (x0.1 at `milestones`) or "cosine"
    milestones: tuple[int, ...] = (60, 80)
    device: str = "gpu"
    crop: int | None = None  # None: the backbone's pretraining crop (BackboneMeta.crop), else 224
    features: str = "cached"  # "cached": extracted once (val transform); "augmented": forward every epoch
    num_threads: int = 4
    seed: int = 0
    eval_every: int = 1  # evaluate on val every this many epochs (and always after the last)
    head_norm: str = (
        "bn"  # "bn": BatchNorm1d(affine=False) before the linear layer (MAE); "none": as published
    )
    # protocol=logreg only
    l2: float | None = None  # None: chosen from `l2_grid` on the held-out part of train
    l2_grid: tuple[float, ...] = tuple(10.0**e for e in range(-6, 1))
    holdout: float = 0.1  # stratified held-out fraction of train for the l2 (logreg) or (lr, wd) (SGD) search
    max_iter: int = 1000  # L-BFGS iterations per fit (it stops earlier when converged)

    @property
    def is_sgd(self) -> bool:
        """An SGD-trained head (moco, byol), as opposed to the L-BFGS reference (logreg)."""
        return self.protocol in SGD_PROTOCOLS

    @property
    def searches(self) -> bool:
        """Whether the SGD head's (lr, weight_decay) is chosen on held-out train (cached features, a grid)."""
        return self.is_sgd and self.features == "cached" and bool(self.lr_grid or self.wd_grid)

    def candidates(self) -> list[tuple[float, float]]:
        """The search's (lr, weight_decay) pairs: ``lr_grid x wd_grid`` (an empty grid: the fixed value)."""
        return list(itertools.product(self.lr_grid or (self.lr,), self.wd_grid or (self.weight_decay,)))

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


def fixed(proto: LinearProtocol, **changes: object) -> LinearProtocol:
    """``proto`` trained at its own ``lr`` and ``weight_decay`` (no search), with ``changes`` applied."""
    return dataclasses.replace(proto, lr_grid=(), wd_grid=(), **changes)


def _bn_head(**keys: object) -> dict[str, object]:
    """The BN head's SGD keys: (lr, weight_decay) from the grids on cached features (module docstring)."""
    return dict(
        lr=BN_HEAD_LR,
        weight_decay=BN_HEAD_WEIGHT_DECAY,
        lr_grid=BN_HEAD_LR_GRID,
        wd_grid=BN_HEAD_WD_GRID,
        **keys,
    )


def moco_protocol(head_norm: str = "bn") -> LinearProtocol:
    """MoCo's linear classification protocol; ``head_norm="none"``: exactly as published (lr 30, wd 0),
    ``"bn"`` (default): the BN head, (lr, weight_decay) chosen on held-out train from ``BN_HEAD_LR_GRID x
    BN_HEAD_WD_GRID`` on cached features, lr 0.3 per 256 and weight decay 0.001 on augmented ones."""
    if head_norm == "none":
        return LinearProtocol(head_norm="none")
    return LinearProtocol(**_bn_head(head_norm=head_norm))


def byol_protocol(head_norm: str = "bn") -> LinearProtocol:
    """BYOL's linear evaluation protocol (see the module docstring for the source); ``head_norm`` as in
    :func:`moco_protocol` (``"none"``: lr 0.2 per 256, wd 0, batch 1024, as published; ``"bn"``: batch
    256)."""
    keys = dict(
        protocol="byol", epochs=80, nesterov=True, schedule="cosine", milestones=(), head_norm=head_norm
    )
    if head_norm == "none":
        return LinearProtocol(batch_size=1024, lr=0.2, weight_decay=0.0, **keys)
    return LinearProtocol(**_bn_head(batch_size=BYOL_BN_HEAD_BATCH, **keys))


def logreg_protocol() -> LinearProtocol:
    """The reference probe: L-BFGS logistic regression on cached, standardised features
    (:mod:`unmix.eval.logreg`)."""
    return LinearProtocol(protocol="logreg", features="cached", epochs=1, lr=1.0, head_norm="none")


def _floats(raw: str) -> tuple[float, ...]:
    return tuple(float(v) for v in raw.split(",") if v.strip())


# key -> (LinearProtocol field, parser)
_KEYS: dict[str, tuple[str, type]] = {
    "protocol": ("protocol", str),
    "epochs": ("epochs", int),
    "batch_size": ("batch_size", int),
    "lr": ("lr", float),
    "lr_grid": ("lr_grid", _floats),
    "wd_grid": ("wd_grid", _floats),
    "device": ("device", str),
    "data.crop": ("crop", int),
    "features": ("features", str),
    "num_threads": ("num_threads", int),
    "seed": ("seed", int),
    "eval_every": ("eval_every", int),
    "head_norm": ("head_norm", str),
    "weight_decay": ("weight_decay", float),
    "l2": ("l2", float),
    "l2_grid": ("l2_grid", _floats),
    "holdout": ("holdout", float),
    "max_iter": ("max_iter", int),
}
LINEAR_KEYS = tuple(_KEYS)
# meaningless for logreg
SGD_KEYS = ("epochs", "lr", "lr_grid", "weight_decay", "wd_grid", "head_norm", "eval_every")
LOGREG_KEYS = ("l2", "l2_grid", "max_iter")  # meaningless for moco/byol
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


def default_protocol_name(overrides: dict[str, str]) -> str:
    """``protocol=`` if given; ``moco`` for ``features=augmented`` or an SGD-only key; else ``logreg``."""
    if "protocol" in overrides:
        return overrides["protocol"]
    if overrides.get("features") == "augmented" or any(k in overrides for k in SGD_KEYS):
        return "moco"
    return "logreg"


def resolve_protocol(overrides: dict[str, str]) -> LinearProtocol:
    """The protocol named by ``protocol=`` (default: :func:`default_protocol_name`) with the other
    overrides applied and checked. ``head_norm=none`` on moco/byol restores the published lr and wd."""
    name = default_protocol_name(overrides)
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r}: choose one of {', '.join(PROTOCOLS)}")
    if overrides.get("features", "cached") not in FEATURE_MODES:
        raise ValueError(f"features={overrides['features']!r}: choose one of {', '.join(FEATURE_MODES)}")
    changes = {}
    for key, raw in overrides.items():
        attr, kind = _KEYS[key]
        try:
            changes[attr] = kind(raw)
        except ValueError as exc:
            raise ValueError(f"{key}={raw!r}: expected {getattr(kind, '__name__', 'a number')}") from exc
    changes["protocol"] = name
    if name == "logreg":
        bad = [k for k in SGD_KEYS if k in overrides]
        if bad:
            raise ValueError(
                f"{bad[0]}={overrides[bad[0]]} is a key of the SGD protocols (moco, byol); protocol=logreg "
                "fits L-BFGS to convergence: drop it, or pass protocol=moco"
            )
        if overrides.get("features", "cached") != "cached":
            raise ValueError("protocol=logreg works on cached features: drop features= or pass protocol=moco")
        proto = logreg_protocol()
    else:
        bad = [k for k in LOGREG_KEYS if k in overrides]
        if bad:
            raise ValueError(f"{bad[0]}= is a key of protocol=logreg, not of protocol={name}")
        head_norm = overrides.get("head_norm", "bn")
        proto = (byol_protocol if name == "byol" else moco_protocol)(head_norm)
    proto = dataclasses.replace(proto, **changes)
    if proto.is_sgd:
        proto = _settle_grids(proto, overrides)
    if proto.device not in DEVICES:
        raise ValueError(f"device={proto.device!r}: choose one of {', '.join(DEVICES)}")
    if proto.head_norm not in HEAD_NORMS:
        raise ValueError(f"head_norm={proto.head_norm!r}: choose one of {', '.join(HEAD_NORMS)}")
    for key, attr in (
        ("epochs", "epochs"),
        ("batch_size", "batch_size"),
        ("data.crop", "crop"),
        ("num_threads", "num_threads"),
        ("eval_every", "eval_every"),
    ):
        if getattr(proto, attr) is not None and getattr(proto, attr) < 1:
            raise ValueError(f"{key}={getattr(proto, attr)}: must be >= 1")
    for lr in (proto.lr, *proto.lr_grid):
        if not (lr > 0 and math.isfinite(lr)):  # NaN fails every comparison: test the good range
            raise ValueError(f"lr={lr}: must be finite and > 0")
    for wd in (proto.weight_decay, *proto.wd_grid):
        if not (wd >= 0 and math.isfinite(wd)):
            raise ValueError(f"weight_decay={wd}: must be finite and >= 0")
    if proto.l2 is not None and not (proto.l2 >= 0 and math.isfinite(proto.l2)):
        raise ValueError(f"l2={proto.l2}: must be finite and >= 0")
    if not proto.l2_grid or any(not (v >= 0 and math.isfinite(v)) for v in proto.l2_grid):
        raise ValueError(f"l2_grid={','.join(map(str, proto.l2_grid))}: give finite values >= 0")
    if not 0.0 < proto.holdout < 1.0:
        raise ValueError(f"holdout={proto.holdout}: must be in (0, 1)")
    if proto.max_iter < 1:
        raise ValueError(f"max_iter={proto.max_iter}: must be >= 1")
    return proto


def _settle_grids(proto: LinearProtocol, overrides: dict[str, str]) -> LinearProtocol:
    """The search grids an SGD protocol keeps: ``lr=`` without ``lr_grid=`` fixes the lr (likewise
    ``weight_decay=`` / ``wd_grid=``); augmented features train at the fixed values (a grid given for them
    is an error)."""
    given = [k for k in ("lr_grid", "wd_grid") if k in overrides]
    if proto.features == "augmented":
        if given:
            raise ValueError(
                f"{given[0]}= searches on cached features: pass features=cached, or lr= / weight_decay= alone"
            )
        return fixed(proto)
    if "lr" in overrides and "lr_grid" not in overrides:
        proto = dataclasses.replace(proto, lr_grid=())
    if "weight_decay" in overrides and "wd_grid" not in overrides:
        proto = dataclasses.replace(proto, wd_grid=())
    return proto


def with_crop(proto: LinearProtocol, pretrain_crop: int | None) -> LinearProtocol:
    """``proto`` with ``crop`` filled in: ``data.crop`` if given, else the pretraining crop, else 224."""
    if proto.crop is not None:
        return proto
    return dataclasses.replace(proto, crop=int(pretrain_crop or DEFAULT_CROP))


def as_params(proto: LinearProtocol) -> dict[str, object]:
    """Flat MLflow params of a protocol: only the keys that protocol uses."""
    d = dataclasses.asdict(proto)
    d["milestones"] = ",".join(str(m) for m in proto.milestones)
    d["l2_grid"] = ",".join(f"{v:g}" for v in proto.l2_grid)
    d["lr_grid"] = ",".join(f"{v:g}" for v in proto.lr_grid)
    d["wd_grid"] = ",".join(f"{v:g}" for v in proto.wd_grid)
    sgd_only = ("momentum", "nesterov", "schedule", "milestones", *SGD_KEYS)
    drop = sgd_only if proto.protocol == "logreg" else LOGREG_KEYS
    return {k: v for k, v in d.items() if k not in drop}
