"""Un-Mix image mixtures inside the DALI graph (Shen et al., AAAI 2022; DESIGN.md section 3).

Per batch of N normalised views x (float32 CHW, or HWC for channels_last output):

- partner = the batch in reversed order (sample i pairs with N-1-i), ``fn.permute_batch``;
- lam ~ Beta(alpha, alpha), ONE value for the batch (drawn per sample, then sample 0's value is given to
  every sample with ``fn.permute_batch(lam, indices=[0] * N)``);
- one mode coin for the batch: with probability ``p_mixup`` a global mixture
  ``m = lam * x + (1 - lam) * partner``; otherwise CutMix: one box for the whole batch, side
  ``floor(sqrt(1 - lam) * W)`` x ``floor(sqrt(1 - lam) * H)``, centre uniform on the pixel grid, clipped to
  the image; pixels inside the box come from the partner and lam is recomputed as
  ``1 - box_area / image_area`` (the authors' ``rand_bbox``). One departure: a side that would be empty
  (``sqrt(1 - lam) * W < 2``, frequent at small alpha or small crops) is 1 px, ``[c, c + 1)``, so the box
  is never empty (DALI's GPU ``fn.multi_paste`` does not close a zero-size region: the partner would
  leak over much of the image while lam says 1); lam is recomputed from that box like any other.

Cost: the mode is one per batch, so a batch-level conditional (a per-sample predicate that is identical
across the batch) runs exactly one of the two branches; each costs about one pass over the mixture.
Mixing happens after normalisation: it is linear, so mixing normalised views equals normalising mixed
pixels, and the returned ``mixed`` is then exactly ``lam * view1 + (1 - lam) * partner`` (mixup) or a
pixel-wise selection of ``view1`` and ``partner`` (CutMix: the box copied from the partner with
``fn.multi_paste``, see :func:`paste_box`).

Options beyond the paper (off by default), in :class:`unmix.pipeline.mix_config.UnmixConfig`:
``per_sample_lambda`` (a lam and a box per sample; the mode stays per batch) and ``random_partner`` (a
random permutation without fixed points instead of the reversal; the loader then also returns the
partner indices; pipeline only, the trainer refuses it).
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from unmix.pipeline.mix_config import UnmixConfig  # the settings, shared with the trainer

__all__ = ["UnmixConfig", "batch_broadcast", "paste_box", "unmix"]


def batch_broadcast(x, batch_size: int):
    """Give every sample of the batch sample 0's value (one draw per batch)."""
    return fn.permute_batch(x, indices=[0] * batch_size)


def _to(x, device: str):
    return x.gpu() if device == "gpu" else x


def paste_box(x, partner, box, size: tuple[int, int], channels: int = 3, layout: str = "CHW"):
    """CutMix: ``x`` with the pixels of ``box`` = (x1, y1, x2, y2) (per-sample scalars, x2/y2 exclusive)
    taken from ``partner``, in every channel. ``x``, ``partner``: float images of ``size`` = (H, W) in
    ``layout`` (``"CHW"``, or ``"HWC"`` for channels_last output).

    ``fn.multi_paste`` copies regions between HWC images: the output is ``x`` (region 0, the whole
    canvas) with the box pasted from ``partner``. An HWC image is pasted as it is (one region holds every
    channel); a CHW sample is viewed as a [channels * H, W, 1] image (a reshape, no copy) and the box is
    pasted once per channel plane, at rows ``c * H + y1``. A pure copy, exact, and about 4x cheaper on the
    CPU than blending with a 0/1 mask. ``box`` must not be empty: the CPU operator pastes nothing for an
    empty region, the GPU one does not close it (see :func:`unmix`).
    """
    if layout not in ("CHW", "HWC"):
        raise ValueError(f"layout must be 'CHW' or 'HWC', got {layout!r}")
    H, W = size
    x1, y1, x2, y2 = (fn.cast(v, dtype=types.INT32) for v in box)
    h, w = y2 - y1, x2 - x1
    zero = x1 * 0
    planes = 1 if layout == "HWC" else channels  # box regions: one per channel plane for CHW
    # one (row, column) pair per region: the whole canvas, then the box (in each channel plane)
    anchors = fn.stack(fn.stack(zero, zero), *(fn.stack(y1 + c * H, x1) for c in range(planes)))
    shapes = fn.stack(fn.stack(zero + planes * H, zero + W), *(fn.stack(h, w) for _ in range(planes)))
    if layout == "HWC":
        return fn.multi_paste(x, partner, in_anchors=anchors, out_anchors=anchors, shapes=shapes)
    flat = [channels * H, W, 1]
    canvas = fn.reshape(x, shape=flat, layout="HWC")
    source = fn.reshape(partner, shape=flat, layout="HWC")
    pasted = fn.multi_paste(
        canvas, *([source] * channels), in_anchors=anchors, out_anchors=anchors, shapes=shapes
    )
    return fn.reshape(pasted, shape=[channels, H, W], layout="CHW")


def cutmix_box(lam, cx, cy, size: tuple[int, int]):
    """The CutMix box of side ``sqrt(1 - lam)`` around the centre ``(cx, cy)`` (DALI per-sample float
    scalars), clipped to ``size`` = (H, W) and never empty; returns ``(x1, y1, x2, y2, lam_box)``.

    The authors' ``rand_bbox``: half sides ``floor(floor(W * sqrt(1 - lam)) / 2)``, the box
    ``[c - half, c + half)`` clipped to the image. A half side of 0 (``W * sqrt(1 - lam) < 2``) gives the
    1-px side ``[c, c + 1)`` instead of an empty one: DALI's GPU ``fn.multi_paste`` does not close a
    zero-width or zero-height region (the partner leaks over much of the image while lam says 1), the CPU
    one pastes nothing. ``lam_box = 1 - box_area / image_area``. The same rule as
    :func:`unmix.pipeline.torch_mixing.cutmix_box`.
    """
    H, W = size
    cut = dmath.sqrt(1.0 - lam)
    half_w = dmath.floor(dmath.floor(W * cut) / 2.0)
    half_h = dmath.floor(dmath.floor(H * cut) / 2.0)
    x1 = dmath.clamp(cx - half_w, 0.0, float(W))
    x2 = dmath.clamp(cx + dmath.max(half_w, 1.0), 0.0, float(W))
    y1 = dmath.clamp(cy - half_h, 0.0, float(H))
    y2 = dmath.clamp(cy + dmath.max(half_h, 1.0), 0.0, float(H))
    lam_box = 1.0 - (x2 - x1) * (y2 - y1) / float(W * H)
    return x1, y1, x2, y2, lam_box


def unmix(
    x, batch_size: int, cfg: UnmixConfig, size: tuple[int, int], device: str = "cpu", layout: str = "CHW"
):
    """Mix the batch ``x`` (float images in ``layout``, CHW or HWC, ``size`` = (H, W)) with its partner.

    Returns ``(mixed, lam, partner_index)``: ``mixed`` like ``x``; ``lam`` a float32 scalar per sample
    (the weight of ``x`` itself, recomputed from the clipped box for CutMix); ``partner_index`` an int32
    scalar per sample, or None for the default reversed partner. ``device`` is where ``x`` lives; the
    random draws are CPU operators (``fn.random.beta`` has no GPU variant) and move to the GPU only
    where they meet image data.
    """
    H, W = size
    if cfg.random_partner:
        partner_index = fn.batch_permutation(no_fixed_points=batch_size > 1)
        partner = fn.permute_batch(x, indices=partner_index)
    else:
        partner_index = None
        partner = fn.permute_batch(x, indices=list(range(batch_size - 1, -1, -1)))

    def per_batch(v):
        return v if cfg.per_sample_lambda else batch_broadcast(v, batch_size)

    lam = per_batch(fn.random.beta(alpha=cfg.alpha, beta=cfg.alpha))  # CPU-only operator
    # uniform box centre on the pixel grid: floor(U[0, 1) * W), clamped against U == 1
    cx = dmath.clamp(dmath.floor(per_batch(fn.random.uniform(range=[0.0, 1.0])) * W), 0.0, W - 1.0)
    cy = dmath.clamp(dmath.floor(per_batch(fn.random.uniform(range=[0.0, 1.0])) * H), 0.0, H - 1.0)
    mixup = batch_broadcast(fn.random.coin_flip(probability=cfg.p_mixup, dtype=types.BOOL), batch_size)

    if mixup:
        lam_out = lam
        lam_d = _to(lam, device)
        mixed = x * lam_d + partner * (1.0 - lam_d)
    else:
        x1, y1, x2, y2, lam_out = cutmix_box(lam, cx, cy, size)
        mixed = paste_box(x, partner, (x1, y1, x2, y2), size, layout=layout)
    lam_out = fn.cast(lam_out, dtype=types.FLOAT)
    return mixed, lam_out, partner_index
