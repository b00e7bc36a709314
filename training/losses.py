"""Losses: InfoNCE against a queue, the BYOL regression loss, SimCLR's NT-Xent, and the Un-Mix weighting.

All return per-sample losses (``[N]``) so the Un-Mix weighting can pair each mixture with its
sources; callers take the mean. Computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def _identity(x: Tensor) -> Tensor:
    return x


def nt_xent_log_probs(
    a: Tensor, b: Tensor, T: float, gather: Callable[[Tensor], Tensor] = _identity
) -> tuple[Tensor, int]:
    """SimCLR's NT-Xent log-probabilities of this rank's 2N anchors over the global 2WN candidates.

    Args:
        a, b: this rank's two embeddings of the same N samples, NxC (normalised here); pair i is
            ``(a[i], b[i])``.
        T: temperature.
        gather: concatenates a tensor over ranks along dim 0 *with* its gradient (identity on one process;
            :func:`unmix.training.simclr.gather_with_grad`); it must put this rank's rows at
            ``offset = rank * N``.
    Returns:
        ``(log_p, offset)``: ``log_p`` (2N x 2WN), row ``i`` for anchor ``a[i]`` and row ``N + i`` for
        ``b[i]``; columns are ``[gather(a); gather(b)]``, so ``a[i]`` is column ``offset + i`` and ``b[i]``
        column ``WN + offset + i``. An anchor's own column is excluded (log-probability -inf): every anchor
        has 2WN - 1 candidates, its positive and 2WN - 2 negatives.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    n = a.shape[0]
    a_all, b_all = gather(a), gather(b)  # a_all, b_all: (W*N)xC
    wn = a_all.shape[0]
    offset = _rank_offset(a, a_all)
    anchors = torch.cat([a, b])  # anchors: 2NxC
    logits = anchors @ torch.cat([a_all, b_all]).T / T  # logits: 2Nx2WN
    rows = torch.arange(2 * n, device=logits.device)
    own = torch.cat([rows[:n] + offset, rows[:n] + wn + offset])  # each anchor's own column
    self_mask = torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, own), torch.tensor(True))
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.log_softmax(logits, dim=1), offset


def _rank_offset(mine: Tensor, gathered: Tensor) -> int:
    """Where this rank's rows start in ``gathered`` (``rank * N``; 0 on one process)."""
    if gathered.shape[0] == mine.shape[0]:
        return 0
    import torch.distributed as dist

    return dist.get_rank() * mine.shape[0]


def nt_xent_pairs(log_p: Tensor, offset: int, partner: Tensor | None = None) -> Tensor:
    """Per-pair NT-Xent from :func:`nt_xent_log_probs`: ``(l(a[i] -> b[j]) + l(b[j] -> a[i])) / 2``.

    ``j = partner[i]`` (default ``j = i``: the clean pairs). The mean over pairs is NT-Xent's mean over
    the 2N anchors. With ``partner = N-1-i`` on the mixture's log-probabilities it is the loss of
    ``(a.flip(0), b)`` paired by index, reordered: see :func:`nt_xent_unmix`.
    """
    n = log_p.shape[0] // 2
    wn = log_p.shape[1] // 2
    i = torch.arange(n, device=log_p.device)
    j = i if partner is None else partner.to(log_p.device)
    from_a = -log_p[i, wn + offset + j]  # anchor a[i], positive b[j]
    from_b = -log_p[n + j, offset + i]  # anchor b[j], positive a[i]
    return (from_a + from_b) / 2


def nt_xent(a: Tensor, b: Tensor, T: float, gather: Callable[[Tensor], Tensor] = _identity) -> Tensor:
    """SimCLR's NT-Xent of the pairs ``(a[i], b[i])`` over the global batch; per-pair loss, N.

    The mean of the result is the paper's loss: the mean over all 2N anchors (both directions) of
    ``-log(exp(s_pos / T) / sum_{k != anchor} exp(s_k / T))`` with cosine similarities ``s``.
    """
    log_p, offset = nt_xent_log_probs(a, b, T, gather)
    return nt_xent_pairs(log_p, offset)


def nt_xent_unmix(
    z_m: Tensor, z2: Tensor, lam: Tensor, T: float, gather: Callable[[Tensor], Tensor] = _identity
) -> Tensor:
    """Un-Mix for SimCLR: ``lam * L(z_m, z2) + (1 - lam) * L(z_m.flip(0), z2)``, L = NT-Xent (a scalar).

    The negatives of a mixture anchor ``z_m[i]``: every other embedding of the two sets the criterion is
    applied to, over the global batch: all mixtures ``z_m[j]`` (j != i, every rank) and all view-2
    embeddings except its positive, 2WN - 2 in all. No clean view-1 embedding takes part. Both terms
    score an anchor against the *same* candidates (``z_m.flip(0)`` is a reordering of ``z_m``), so their
    sum is a cross-entropy with a soft target over one softmax: weight ``lam`` on ``z2[i]`` and
    ``1 - lam`` on the partner's ``z2[N-1-i]``, the two images the mixture holds. The partner's view-2
    embedding is thus not pushed away on balance; the partner's mixture ``z_m[N-1-i]`` (the same two
    images, weights swapped) stays a negative, as the base criterion makes it. NT-Xent is symmetric, so
    each term also has view-2 anchors, scored against all mixtures and the other view-2 embeddings.
    One similarity matrix serves both terms. ``lam``: N (one value per batch, or per sample: mixture i
    holds sample i with weight ``lam[i]``, the reversed pair weight ``1 - lam[N-1-i]``).
    """
    log_p, offset = nt_xent_log_probs(z_m, z2, T, gather)
    n = z_m.shape[0]
    rev = torch.arange(n - 1, -1, -1)
    # pair k of (z_m.flip(0), z2) is (z_m[N-1-k], z2[k]): partner map N-1-k -> k, reordered by k
    loss_mix = nt_xent_pairs(log_p, offset)  # pair i: (z_m[i], z2[i])
    loss_rev = nt_xent_pairs(log_p, offset, rev)[rev]  # pair k: (z_m[N-1-k], z2[k])
    return unmix_weighted(loss_mix, loss_rev, lam)
