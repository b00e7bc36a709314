"""MoCo v2 (and v1) with the Un-Mix loss, after facebookresearch/moco ``builder.py``.

The query encoder (``online``) is the module DeepSpeed trains; the key encoder and the queue are fp32
and live here, outside the engine. The training loop calls, in order: ``targets`` (keys, no gradient,
Shuffle-BN), the engine's forward, ``loss``, the optimizer step, then the momentum update
(:func:`training.ema.update_momentum`) and ``queue.enqueue`` on the keys gathered from all ranks.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from unmix.training import dist
from unmix.training.config import MocoConfig
from unmix.training.heads import Network, freeze_bn_stats, moco_head
from unmix.training.losses import info_nce, info_nce_mixed, unmix_weighted
from unmix.training.queue import KeyQueue


def build_online(backbone: torch.nn.Module, cfg: MocoConfig) -> Network:
    """The query encoder: backbone + projection head (MLP for v2, linear for v1)."""
    return Network(backbone, moco_head(backbone.feature_dim, cfg.hidden_dim, cfg.dim, bool(cfg.mlp)))


def gather_images(x: Tensor, group=None) -> Tensor:
    """All ranks' ``x`` concatenated, in the autocast dtype when autocast is on (bf16 under bf16).

    Every rank receives the whole global batch, so the gather's traffic is W x N images; the key
    encoder's first convolution casts its input to the autocast dtype anyway, so casting before the
    gather halves the traffic at bf16 and changes no result (the same round-to-nearest cast, earlier).
    """
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        low = torch.get_autocast_dtype(kind)
        if low.itemsize < x.dtype.itemsize:
            x = x.to(low)
    return dist.gather_rows(x, group)


@torch.no_grad()
def shuffled_embed(encoder: Network, x: Tensor, generator: torch.Generator, group=None) -> Tensor:
    """Shuffle-BN: embed ``x`` with the batch shuffled across all ranks, return keys in input order.

    Each rank's BN then normalises a random subset of the global batch, so the key statistics cannot
    leak which key belongs to which query (MoCo §3.3). ``generator`` must be in the same state on every
    rank (the loop seeds it from the run seed and the step), so no permutation is broadcast.
    On one process this is a plain forward (shuffling within one BN batch changes nothing), unless a
    ``group`` is given: then the collectives run over it whatever its size (``unmix bench gpu`` runs
    them on a one-process NCCL group).
    """
    if group is not None:
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    else:
        world, rank = dist.world_size(), dist.rank()
    if world == 1 and group is None:
        return encoder.embed(x)
    x_all = gather_images(x, group)  # x_all: (W*N)x3xHxW, NCHW; bf16 under bf16 autocast
    idx_shuffle = torch.randperm(x_all.shape[0], generator=generator)  # same on every rank (CPU generator)
    if x.is_cuda:  # from pinned memory: the copy does not wait for the device's queued work
        idx_shuffle = idx_shuffle.pin_memory().to(x.device, non_blocking=True)
    idx_unshuffle = torch.argsort(idx_shuffle)
    mine = idx_shuffle.view(world, -1)[rank]
    k_all = dist.gather_rows(encoder.embed(x_all[mine]), group)  # k_all: (W*N)xC, shuffled order
    return k_all[idx_unshuffle.view(world, -1)[rank]]  # k: NxC, this rank's input order


class MoCo:
    """Key encoder (EMA of the query encoder), queue, and the loss. ``online`` is not stored."""

    def __init__(self, online: Network, cfg: MocoConfig, seed: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.target = freeze_bn_stats(copy.deepcopy(online)).float().to(device)  # encoder_k, fp32
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(cfg.dim, cfg.K, seed=seed, device=device)

    def online_inputs(self, batch: dict[str, Tensor], unmix: bool) -> tuple[Tensor, ...]:
        """What the query encoder embeds: view 1 (and view 2 if symmetric), then the mixture."""
        views = (batch["view1"], batch["view2"]) if self.cfg.symmetric else (batch["view1"],)
        return views + ((batch["mixed"],) if unmix else ())

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, ...]:
        """Keys of the clean views: ``(k2,)`` or, symmetric, ``(k2, k1)``."""
        self.target.train()
        embed = shuffled_embed if self.cfg.shuffle_bn else lambda enc, x, _: enc.embed(x)
        k2 = embed(self.target, batch["view2"], generator)  # k2: NxC
        if not self.cfg.symmetric:
            return (k2,)
        return k2, embed(self.target, batch["view1"], generator)

    def loss(
        self, outs: tuple[Tensor, ...], keys: tuple[Tensor, ...], lam: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``L(q, k) + lam * L(z_m, k) + (1 - lam) * L(z_m.flip(0), k)``; returns (loss, clean, mix).

        Symmetric: ``L(q1, k2) + L(q2, k1)`` for the clean part; the mixture (of view 1) is scored
        against ``k2``, the key of the other view of the same images.
        """
        T, queue = float(self.cfg.T), self.queue.queue
        k2 = keys[0]
        if self.cfg.symmetric:
            q1, q2 = outs[0], outs[1]
            clean = info_nce(q1, k2, queue, T).mean() + info_nce(q2, keys[1], queue, T).mean()
        else:
            clean = info_nce(outs[0], k2, queue, T).mean()
        if lam is None:
            return clean, clean.detach(), torch.zeros_like(clean).detach()
        z_m = outs[-1]  # z_m: NxC, embeddings of the mixtures
        mix = unmix_weighted(*info_nce_mixed(z_m, k2, queue, T), lam)
        return clean + mix, clean.detach(), mix.detach()

    def keys_to_enqueue(self, keys: tuple[Tensor, ...]) -> Tensor:
        """This rank's keys for the queue (the loop gathers them from all ranks)."""
        return torch.cat(keys) if len(keys) > 1 else keys[0]

    def momentum(self, step: int, total_steps: int) -> float:
        return self.cfg.m

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        self.queue.load_state_dict(state["queue"])
