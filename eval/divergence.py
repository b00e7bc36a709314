"""The linear probe's divergence guard: fail instead of reporting the accuracy of a probe that blew up.

A probe diverges when its learning rate is too large for the scale of its inputs (MoCo's lr 30 on features
of a random-init backbone: training loss ~2e5, val top-1 at chance). The number it ends on is then a
statement about the optimiser, not about the features, and must not be reported. After every epoch the
guard fails when

- the epoch's mean training loss is not finite, or
- the training loss stayed above its reference for the last ``patience`` epochs while the latest val
  top-1 sits near chance (below ``min(2 x chance, chance + 10)`` %, chance = 100 / C); the reference is
  the first epoch's loss, or ``3 ln C`` when that is lower (``ln C`` is the loss of a uniform guess: a
  head three times worse than that on its own training data is not learning, while a head on features
  that carry no information hovers at ``ln C`` and reports chance, which is then the true answer);

and after the last epoch, when the final training loss is above ``3 ln C`` whatever the val accuracy
(:meth:`DivergenceGuard.check_final`): a mis-scaled probe (MoCo's lr 30 behind a BatchNorm: losses of
hundreds with val top-1 well above chance) has logits hundreds apart, and its accuracy measures the
optimiser's overshoot, not the features.

Every rank sees the same all-reduced loss and accuracy, so every rank decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unmix.eval.protocols import LinearProtocol


class ProbeDivergedError(FloatingPointError):
    """The linear probe diverged: no accuracy is reported."""


def _advice(proto: LinearProtocol) -> str:
    if proto.head_norm == "bn" and proto.lr > 1.0:
        return (
            f"lr={proto.lr:g} per 256 is far too large for head_norm=bn, whose BatchNorm feeds the layer "
            "unit-variance features: drop lr= (the default with head_norm=bn is 0.3) or, for the published "
            "protocol on small-norm features, set head_norm=none"
        )
    if proto.head_norm == "none":
        return (
            "the learning rate is too large for the scale of these features: set head_norm=bn (a BatchNorm "
            "without affine parameters before the linear layer) or a smaller lr= "
            f"(now lr={proto.lr:g} per 256)"
        )
    return f"the learning rate is too large: set a smaller lr= (now lr={proto.lr:g} per 256)"


@dataclass
class DivergenceGuard:
    """Checks each epoch's ``(train_loss, val_top1)``; :meth:`check` raises :class:`ProbeDivergedError`."""

    proto: LinearProtocol
    num_classes: int
    patience: int = 3
    losses: list[float] = field(default_factory=list)
    last_top1: float | None = None

    @property
    def chance(self) -> float:
        """Top-1 (%) of a uniform guess."""
        return 100.0 / max(self.num_classes, 1)

    @property
    def near_chance(self) -> float:
        """Val top-1 (%) below which a probe counts as no better than chance."""
        return min(2 * self.chance, self.chance + 10.0)

    def check_finite(self, epoch: int, train_loss: float) -> None:
        """Raise if epoch ``epoch``'s (1-based) training loss is not finite."""
        if not math.isfinite(train_loss):
            raise ProbeDivergedError(
                f"linear probe diverged: training loss not finite in epoch {epoch} "
                f"(lr={self.proto.lr_at(epoch - 1):.4g}, head_norm={self.proto.head_norm}); "
                f"{_advice(self.proto)}"
            )

    @property
    def loss_ceiling(self) -> float:
        """``3 ln C``: a final training loss above it is a mis-scaled probe."""
        return 3 * math.log(max(self.num_classes, 2))

    def check_final(self, train_loss: float, val_top1: float | None = None) -> None:
        """Raise if the last epoch's training loss is above ``3 ln C``, whatever ``val_top1``."""
        self.check_finite(len(self.losses) or 1, train_loss)
        if train_loss > self.loss_ceiling:
            val = f", val top-1 {val_top1:.2f} %" if val_top1 is not None else ""
            raise ProbeDivergedError(
                f"linear probe mis-scaled: final training loss {train_loss:.4g} is above 3 ln C = "
                f"{self.loss_ceiling:.3g} (C = {self.num_classes}{val}; lr={self.proto.lr:g} per 256, "
                f"head_norm={self.proto.head_norm}); {_advice(self.proto)}. No accuracy is reported."
            )

    def check(self, epoch: int, train_loss: float, val_top1: float | None = None) -> None:
        """Record epoch ``epoch`` (1-based) and raise if the probe diverged."""
        self.check_finite(epoch, train_loss)
        self.losses.append(train_loss)
        if val_top1 is not None:
            self.last_top1 = val_top1
        if len(self.losses) <= self.patience or self.last_top1 is None:
            return
        reference = min(self.losses[0], 3 * math.log(max(self.num_classes, 2)))
        recent = self.losses[-self.patience :]
        if all(v > reference for v in recent) and self.last_top1 < self.near_chance:
            raise ProbeDivergedError(
                f"linear probe diverged: training loss {recent[-1]:.4g} in epoch {epoch} stayed above "
                f"{reference:.4g} (first epoch {self.losses[0]:.4g}, "
                f"3 ln C = {3 * math.log(max(self.num_classes, 2)):.3g}) "
                f"for {self.patience} epochs while val top-1 is {self.last_top1:.2f} % (chance "
                f"{self.chance:.2f} %); {_advice(self.proto)}. No accuracy is reported."
            )
