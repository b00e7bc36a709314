"""Losses: InfoNCE against a queue, the BYOL regression loss, and the Un-Mix weighting.

All return per-sample losses (``[N]``) so the Un-Mix weighting can pair each mixture with its
sources; callers take the mean. Computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _nce(q: Tensor, k: Tensor, l_neg: Tensor, T: float) -> Tensor:
    """Per-sample InfoNCE from normalised ``q``, ``k`` (NxC) and the negatives' logits ``l_neg`` (NxK)."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # l_pos: Nx1
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # logits: Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives: index 0
    return F.cross_entropy(logits, labels, reduction="none")


def info_nce(q: Tensor, k: Tensor, queue: Tensor, T: float) -> Tensor:
    """MoCo's InfoNCE: the positive ``k`` against the ``queue`` negatives.

    Args:
        q: queries, NxC (normalised here).
        k: keys, NxC (normalised here; no gradient flows into them).
        queue: negatives, CxK, already normalised.
        T: temperature.
    Returns:
        per-sample loss, N.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    return _nce(q, k, torch.einsum("nc,ck->nk", q, queue.detach()), T)  # l_neg: NxK


def info_nce_mixed(z_m: Tensor, k: Tensor, queue: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """``(info_nce(z_m, k), info_nce(z_m.flip(0), k))`` with the NxK product against the queue done once.

    The reversed mixtures' negatives are the same rows in reverse order (``l_neg.flip(0)``); only the
    positives differ. Saves one of the two largest matrix products of the Un-Mix loss (and its backward).
    """
    return info_nce_mixed_keys(z_m, (k,), queue, T)[0]


def info_nce_mixed_keys(
    z_m: Tensor, keys: Sequence[Tensor], queue: Tensor, T: float
) -> list[tuple[Tensor, Tensor]]:
    """:func:`info_nce_mixed` for each key in ``keys``, sharing one NxK product against the queue.

    The symmetric Un-Mix loss scores the same mixtures against both clean keys (``k2`` and ``k1``): the
    negatives do not depend on the key, so the product with the queue is computed once for all of them.
    """
    z = F.normalize(z_m.float(), dim=1)
    l_neg = torch.einsum("nc,ck->nk", z, queue.detach())  # l_neg: NxK
    out = []
    for k in keys:
        k = F.normalize(k.float(), dim=1).detach()
        out.append((_nce(z, k, l_neg, T), _nce(z.flip(0), k, l_neg.flip(0), T)))
    return out


def byol_regression(p: Tensor, z: Tensor) -> Tensor:
    """BYOL: ``2 - 2 cos(p, z)`` = squared distance of the normalised vectors; ``z`` is the target.

    Args:
        p: online predictions, NxC.
        z: target projections, NxC (no gradient flows into them).
    Returns:
        per-sample loss, N.
    """
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.float(), dim=1).detach()
    return 2 - 2 * (p * z).sum(dim=1)


def unmix_weighted(loss_mix: Tensor, loss_mix_rev: Tensor, lam: Tensor) -> Tensor:
    """Un-Mix: ``mean_i(lam_i * L(z_m[i], k[i]) + (1 - lam_j) * L(z_m[j], k[i]))`` with ``j = N-1-i``.

    ``loss_mix[i]`` pairs mixture i (``lam_i * x[i] + (1 - lam_i) * x[N-1-i]``) with key i;
    ``loss_mix_rev[i]`` pairs the reversed-order mixture ``z_m.flip(0)[i]`` (= mixture N-1-i, which holds
    ``x[i]`` with weight ``1 - lam_{N-1-i}``) with key i. With one lam per batch (the pipeline's) this is
    ``lam * L(z_m, k) + (1 - lam) * L(z_m.flip(0), k)``.
    """
    lam = lam.float()
    return (lam * loss_mix + (1 - lam.flip(0)) * loss_mix_rev).mean()
