"""Weighted k-nearest-neighbour classification on L2-normalised features.

The protocol of Instance Discrimination (Wu et al. 2018) as used by MoCo's kNN monitor: cosine
similarity s between a query and every training feature, the k most similar neighbours vote for their
class with weight exp(s / t), the class with the largest summed weight wins (k = 200, t = 0.1).

Distributed: each rank keeps the training features of its own shard (the bank is never gathered).
Queries (val features, each counted once over ranks) are gathered; every rank computes its local
top-k for a chunk of queries, the (similarity, label) candidates of all ranks are gathered and merged
into the global top-k, so the result equals the single-process one.

It lives in ``unmix.training`` because pretraining's kNN monitor (:mod:`unmix.training.knn_monitor`) uses it
and training imports nothing from ``unmix.eval``; ``unmix knn`` (:mod:`unmix.eval.jobs`) runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` ([n_r, ...], n_r may differ per rank) over ranks in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(sizes_i), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes_i]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i, strict=True)])


def knn_scores(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Class scores from the neighbours' similarities ``sims [Q, k]`` and labels ``labels [Q, k]``."""
    w = (sims / t).exp()  # w: Q x k  (exp(-inf) = 0 for padding)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=w.dtype, device=w.device)
    return scores.scatter_add_(1, labels, w)  # scores: Q x C


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``[Q, C]`` of each query by weighted kNN (features are L2-normalised here)."""
    q = F.normalize(queries.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    out = []
    for i in range(0, q.shape[0], chunk):
        sims, idx = _local_topk(q[i : i + chunk], b, k)
        out.append(knn_scores(sims, bank_labels[idx.clamp(min=0)], num_classes, t))
    if not out:
        return torch.zeros(0, num_classes, device=queries.device)
    return torch.cat(out)


def _local_topk(q: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities ``[Q, k]`` and bank indices (-inf / -1 padding for a small bank)."""
    sim = q @ b.T  # sim: Q x N
    kk = min(k, b.shape[0])
    vals, idx = sim.topk(kk, dim=1)
    if kk < k:
        pad = k - kk
        vals = torch.cat([vals, vals.new_full((q.shape[0], pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((q.shape[0], pad), -1)], dim=1)
    return vals, idx


@dataclass
class KnnResult:
    top1: float
    top5: float
    total: int


def knn_evaluate(
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> KnnResult:
    """kNN top-1/top-5 (%) of this rank's val features against the training features of all ranks.

    Single process: plain :func:`knn_predict`. Under a process group: see the module docstring.
    """
    if k < 1 or t <= 0:
        raise ValueError(f"knn: need k >= 1 and t > 0 (got k={k}, t={t})")
    q_all, y_all = all_gather_rows(val_features.float()), all_gather_rows(val_labels.long())
    b = F.normalize(train_features.float(), dim=1)
    q_all = F.normalize(q_all, dim=1)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    hits = torch.zeros(2, dtype=torch.int64, device=q_all.device)  # read once after the loop
    kk = min(5, num_classes)
    for i in range(0, q_all.shape[0], chunk):
        q = q_all[i : i + chunk]
        sims, idx = _local_topk(q, b, k)
        labels = torch.where(idx >= 0, train_labels[idx.clamp(min=0)], torch.zeros_like(idx))
        if distributed:  # merge every rank's candidates into the global top-k
            sims, labels = _gather_cols(sims), _gather_cols(labels)
            sims, pos = sims.topk(k, dim=1)
            labels = labels.gather(1, pos)
        scores = knn_scores(sims, labels, num_classes, t)
        top = scores.topk(kk, dim=1).indices
        hit = top.eq(y_all[i : i + chunk].view(-1, 1))
        hits += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
    total = int(q_all.shape[0])
    if total == 0:
        raise RuntimeError("knn: validation set is empty")
    top1, top5 = hits.tolist()
    return KnnResult(top1=100.0 * top1 / total, top5=100.0 * top5 / total, total=total)


def _gather_cols(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t [Q, k]`` of every rank along dim 1: ``[Q, world*k]``."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)
