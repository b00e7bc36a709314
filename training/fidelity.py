"""The authors' training step, transcribed in plain PyTorch: the reference ``unmix train`` is held to.

- :class:`AuthorsMoCo`: ``ModelMoCo`` of the authors' ``unmix_c10.py`` (symmetric, the CIFAR recipe) and
  ``moco/builder.py`` + ``main_moco_unmix.py`` of their ImageNet code (asymmetric), github.com/szq0214/Un-Mix:
  the momentum update at the start of the step, the key encoder's shuffle, the three InfoNCE terms
  (clean, mixture, reversed mixture) of each direction, ``loss = L + lam * L_m + (1 - lam) * L_m_flip``,
  and the enqueue of the clean keys (symmetric: ``cat([k1, k2])``).
- :class:`PaperBYOL`: BYOL (Grill et al. 2020, Algorithm 1) with the Un-Mix rule of the paper (DESIGN.md
  §3): the symmetric regression loss, the mixture regressed onto both clean target projections, the
  target updated after the optimizer step at the cosine tau.
- :func:`authors_mix`: their mixing (``np.random.rand`` / ``np.random.beta`` / ``rand_bbox``) on a batch.

Nothing of ``unmix.training``'s methods, losses or EMA is used here: only the encoder module (the same
initial weights) comes from outside. The lockstep test (tests/training/test_fidelity.py) and ``unmix bench
fidelity`` run these beside the trainer.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def rand_bbox(size: torch.Size, lam: float, rng: np.random.RandomState) -> tuple[int, int, int, int]:
    """The authors' ``utils.rand_bbox``: box ``[bbx1:bbx2, bby1:bby2]`` over dims 2 and 3 of ``size``."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = rng.randint(W), rng.randint(H)  # uniform
    bbx1 = int(np.clip(cx - cut_w // 2, 0, W))
    bby1 = int(np.clip(cy - cut_h // 2, 0, H))
    bbx2 = int(np.clip(cx + cut_w // 2, 0, W))
    bby2 = int(np.clip(cy + cut_h // 2, 0, H))
    return bbx1, bby1, bbx2, bby2


def authors_mix(
    im_1: Tensor, rng: np.random.RandomState, prob: float = 0.5, beta: float = 1.0
) -> tuple[Tensor, float, str, tuple[int, int, int, int] | None]:
    """Their loop's mixing of view 1: returns ``(mixed_images, lam, mode, box)``.

    ``r < prob``: global ``lam * im_1 + (1 - lam) * im_1.flip(0)``; else the partner's box is pasted and
    lam is recomputed as the unpasted fraction.
    """
    r = rng.rand(1)
    lam = float(rng.beta(beta, beta))
    images_reverse = torch.flip(im_1, (0,))
    if r < prob:
        return lam * im_1 + (1 - lam) * images_reverse, lam, "mixup", None
    mixed_images = im_1.clone()
    bbx1, bby1, bbx2, bby2 = rand_bbox(im_1.size(), lam, rng)
    mixed_images[:, :, bbx1:bbx2, bby1:bby2] = images_reverse[:, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (im_1.size()[-1] * im_1.size()[-2]))
    return mixed_images, lam, "cutmix", (bbx1, bby1, bbx2, bby2)


class AuthorsMoCo(nn.Module):
    """``ModelMoCo`` of ``unmix_c10.py`` (``symmetric=True``) / the ImageNet builder (``symmetric=False``).

    ``encoder_q`` maps images to unnormalised embeddings (their ``ModelBase``: backbone + fc). ``queue``
    (dim x K, normalised) is their ``torch.randn`` buffer, passed in so both sides start alike.
    """

    def __init__(self, encoder_q: nn.Module, queue: Tensor, m: float, T: float, symmetric: bool):
        super().__init__()
        self.K, self.m, self.T, self.symmetric = queue.shape[1], m, T, symmetric
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not update by gradient
        self.register_buffer("queue", queue.clone())
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.generator: torch.Generator | None = None  # the shuffle's randomness (theirs: the global RNG)

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity
        self.queue[:, ptr : ptr + batch_size] = keys.t()  # replace the keys at ptr (dequeue and enqueue)
        self.queue_ptr[0] = (ptr + batch_size) % self.K  # move pointer

    @torch.no_grad()
    def _batch_shuffle_single_gpu(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx_shuffle = torch.randperm(x.shape[0], generator=self.generator)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    def contrastive_loss(self, im_q: Tensor, im_k: Tensor, im1_mixed: Tensor):
        q = F.normalize(self.encoder_q(im_q), dim=1)  # queries: NxC
        q_mixed = self.encoder_q(im1_mixed)
        q_mixed_flip = torch.flip(q_mixed, (0,))  # = encoder_q(im1_mixed_re): BN is order-free
        q_mixed = F.normalize(q_mixed, dim=1)
        q_mixed_flip = F.normalize(q_mixed_flip, dim=1)
        with torch.no_grad():  # no gradient to keys
            im_k_, idx_unshuffle = self._batch_shuffle_single_gpu(im_k)  # shuffle for making use of BN
            k = F.normalize(self.encoder_k(im_k_), dim=1)  # keys: NxC
            k = k[idx_unshuffle]  # undo shuffle
        queue = self.queue.clone().detach()
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # positive logits: Nx1
        l_pos_m = torch.einsum("nc,nc->n", [q_mixed, k]).unsqueeze(-1)
        l_pos_m_flip = torch.einsum("nc,nc->n", [q_mixed_flip, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue])  # negative logits: NxK
        l_neg_m = torch.einsum("nc,ck->nk", [q_mixed, queue])
        l_neg_m_flip = torch.einsum("nc,ck->nk", [q_mixed_flip, queue])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # logits: Nx(1+K)
        logits_m = torch.cat([l_pos_m, l_neg_m], dim=1) / self.T
        logits_m_flip = torch.cat([l_pos_m_flip, l_neg_m_flip], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)  # positive key indicators
        ce = nn.CrossEntropyLoss()
        return ce(logits, labels), q, k, ce(logits_m, labels), ce(logits_m_flip, labels)

    def forward(self, im1: Tensor, im2: Tensor, im1_mixed: Tensor, lam: float) -> Tensor:
        with torch.no_grad():
            self._momentum_update_key_encoder()  # update the key encoder
        if self.symmetric:  # symmetric loss (unmix_c10.py)
            loss_12, q1, k2, loss_m11, loss_m12 = self.contrastive_loss(im1, im2, im1_mixed)
            loss_21, q2, k1, loss_m21, loss_m22 = self.contrastive_loss(im2, im1, im1_mixed)
            loss = (
                loss_12
                + loss_21
                + lam * loss_m11
                + (1 - lam) * loss_m12
                + lam * loss_m21
                + (1 - lam) * loss_m22
            )
            k = torch.cat([k1, k2], dim=0)
        else:  # asymmetric loss (the ImageNet builder + main_moco_unmix.py)
            loss_0, q, k, loss_m11, loss_m12 = self.contrastive_loss(im1, im2, im1_mixed)
            loss = loss_0 + lam * loss_m11 + (1 - lam) * loss_m12
        self._dequeue_and_enqueue(k)
        return loss


def byol_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL §3.2: ``tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2``."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class PaperBYOL(nn.Module):
    """BYOL + Un-Mix from the papers: ``online`` = backbone + projector + predictor (embeds to p).

    ``online_projection`` maps images to the online projection z (no predictor): the target copies it.
    """

    def __init__(self, online: nn.Module, online_projection: nn.Module):
        super().__init__()
        self.online = online
        self.target = copy.deepcopy(online_projection)
        self._projection = online_projection  # shares parameters with ``online``
        for p in self.target.parameters():
            p.requires_grad = False

    @staticmethod
    def regression(p: Tensor, z: Tensor) -> Tensor:
        """``2 - 2 <p, z> / (|p| |z|)`` per sample."""
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)

    def forward(self, v1: Tensor, v2: Tensor, mixed: Tensor, lam: float) -> Tensor:
        p1, p2, p_m = self.online(v1), self.online(v2), self.online(mixed)  # p: NxC
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)  # z': NxC, target projections
        L = self.regression
        loss = L(p1, z2).mean() + L(p2, z1).mean()  # the symmetric BYOL loss
        for z in (z2, z1):  # the mixture of view 1, regressed onto both clean targets
            loss = loss + lam * L(p_m, z).mean() + (1 - lam) * L(p_m.flip(0), z).mean()
        return loss

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``xi <- tau * xi + (1 - tau) * theta`` after the optimizer step."""
        for p_t, p_o in zip(self.target.parameters(), self._projection.parameters(), strict=True):
            p_t.data = tau * p_t.data + (1 - tau) * p_o.data


class Embed(nn.Module):
    """The references' encoder over the trainer's network: images -> unnormalised embeddings.

    ``head(backbone(x))`` (the online projection), then the predictor where the network has one and
    ``predictor`` is set (BYOL's online branch). It shares the network's parameters: a reference that
    trains it trains ``net``.
    """

    def __init__(self, net: nn.Module, predictor: bool = True):
        super().__init__()
        self.net, self.predictor = net, predictor

    def forward(self, x: Tensor) -> Tensor:
        z = self.net.head(self.net.backbone(x))  # z: NxC
        return self.net.predictor(z) if self.predictor and self.net.predictor is not None else z


def paper_nt_xent(a: Tensor, b: Tensor, T: float) -> Tensor:
    """SimCLR's Algorithm 1 (Chen et al. 2020): the 2N x 2N cosine similarity matrix of ``[a; b]``, self
    masked, cross-entropy on the partner index; the mean over all 2N anchors."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=1)  # 2N x C
    sim = z @ z.T / T
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, target)


def paper_simclr_loss(z1: Tensor, z2: Tensor, z_m: Tensor, lam: float, T: float) -> Tensor:
    """SimCLR + Un-Mix in plain PyTorch: ``L(z1, z2) + lam L(z_m, z2) + (1 - lam) L(z_m.flip(0), z2)``
    (the authors' general rule, szq0214/Un-Mix issue 4, with NT-Xent as the criterion)."""
    L = paper_nt_xent
    return L(z1, z2, T) + lam * L(z_m, z2, T) + (1 - lam) * L(z_m.flip(0), z2, T)


class PaperSimCLR(nn.Module):
    """SimCLR + Un-Mix from the paper: ``encoder`` maps images to the projection z (no target network)."""

    def __init__(self, encoder: nn.Module, T: float):
        super().__init__()
        self.encoder, self.T = encoder, T

    def forward(self, v1: Tensor, v2: Tensor, mixed: Tensor, lam: float) -> Tensor:
        z1, z2, z_m = self.encoder(v1), self.encoder(v2), self.encoder(mixed)  # z: NxC
        return paper_simclr_loss(z1, z2, z_m, lam, self.T)
