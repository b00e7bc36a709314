"""The Un-Mix mixture in torch, by the rule the DALI graph implements (:mod:`unmix.pipeline.mixing`).

For code that mixes batches outside DALI: the synthetic training source (``data.source: synthetic``) and
the torchvision baseline of ``unmix bench pipeline``. The partner is the batch reversed; one lam ~
Beta(alpha, alpha) per batch; with probability ``p_mixup`` a global mixture ``lam * x + (1 - lam) *
x.flip(0)``, otherwise one CutMix box for the batch (side ``floor(sqrt(1 - lam) * W)``, centre uniform on
the pixel grid, clipped, never empty: a side below 2 px becomes 1 px) copied from the partner, lam
recomputed as the unpasted fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MixDraw:
    """One batch's Un-Mix draw: the mode, lam (recomputed for CutMix) and the box ``(x1, y1, x2, y2)``."""

    mode: str  # "mixup" | "cutmix"
    lam: float  # weight of the image itself in its mixture
    box: tuple[int, int, int, int] | None  # CutMix region taken from the partner (x2, y2 exclusive)


def cutmix_box(lam: float, cx: int, cy: int, size: tuple[int, int]) -> tuple[int, int, int, int, float]:
    """The CutMix box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of side ``sqrt(1 - lam)`` around ``(cx, cy)``,
    clipped to ``size`` = (H, W) and never empty (a half side of 0 gives the 1-px side ``[c, c + 1)``),
    and ``lam_box = 1 - box_area / image_area``: :func:`unmix.pipeline.mixing.cutmix_box`'s rule."""
    H, W = size
    cut = math.sqrt(1.0 - lam)
    half_w, half_h = math.floor(math.floor(W * cut) / 2), math.floor(math.floor(H * cut) / 2)
    x1, x2 = min(max(cx - half_w, 0), W), min(max(cx + max(half_w, 1), 0), W)
    y1, y2 = min(max(cy - half_h, 0), H), min(max(cy + max(half_h, 1), 0), H)
    return x1, y1, x2, y2, 1.0 - (x2 - x1) * (y2 - y1) / float(W * H)


def draw_mix(rng: np.random.Generator, size: tuple[int, int], p_mixup: float, alpha: float) -> MixDraw:
    """Draw the batch's mode, lam and box with the pipeline's rule (``mixing.unmix``, per batch)."""
    H, W = size
    lam = float(rng.beta(alpha, alpha))
    cx = min(math.floor(rng.random() * W), W - 1)  # uniform centre on the pixel grid
    cy = min(math.floor(rng.random() * H), H - 1)
    if rng.random() < p_mixup:
        return MixDraw("mixup", float(np.float32(lam)), None)
    x1, y1, x2, y2, lam_box = cutmix_box(lam, cx, cy, size)
    return MixDraw("cutmix", float(np.float32(lam_box)), (x1, y1, x2, y2))


def mix(x: Tensor, draw: MixDraw) -> tuple[Tensor, Tensor]:
    """``(mixed, lam)`` for the batch ``x`` (N x C x H x W) and its reversed partner; lam: N float32."""
    partner = x.flip(0)  # partner: sample i pairs with N-1-i
    lam = torch.full((x.shape[0],), draw.lam, dtype=torch.float32, device=x.device)
    if draw.mode == "mixup":
        lam4 = lam.to(x.dtype).view(-1, 1, 1, 1)
        return x * lam4 + partner * (1 - lam4), lam
    x1, y1, x2, y2 = draw.box
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
    return mixed, lam
