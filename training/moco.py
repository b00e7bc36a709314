"""MoCo v2 (and v1) with the Un-Mix loss, after facebookresearch/moco ``builder.py``.

The query encoder (``online``) is the module DeepSpeed trains; the key encoder and the queue are fp32
and live here, outside the engine. :class:`MoCo` implements :class:`unmix.training.methods.Method`: the loop
calls ``targets`` (keys, no gradient, Shuffle-BN), the engine's forward, ``loss``, the optimizer step,
then the momentum update (:func:`unmix.training.ema.update_momentum`) and ``after_step`` (the queue update) on
the keys gathered from all ranks.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import Tensor

from unmix.training import batchnorm, dist
from unmix.training.config import ConfigError, MocoConfig
from unmix.training.heads import Network, freeze_bn_stats, moco_head
from unmix.training.losses import info_nce, info_nce_mixed_keys, unmix_weighted
from unmix.training.queue import KeyQueue


def build(
    backbone: torch.nn.Module, run_cfg, cfg: MocoConfig, world: int, micro_batch: int, device
) -> tuple[Network, MoCo]:
    """The query encoder (SplitBatchNorm on one process with Shuffle-BN) on ``device``, and :class:`MoCo`."""
    online = split_bn(build_online(backbone, cfg), cfg, world, micro_batch).to(device)
    return online, MoCo(online, cfg, run_cfg.seed, device)


def build_online(backbone: torch.nn.Module, cfg: MocoConfig) -> Network:
    """The query encoder: backbone + projection head (MLP for v2, linear for v1).

    The MLP's hidden width is ``cfg.hidden_dim``, or the backbone's feature width when it is None (the
    authors' ``dim_mlp = fc.in_features``: 2048 for ResNet-50, 512 for ResNet-18).
    """
    hidden = cfg.hidden_dim if cfg.hidden_dim is not None else backbone.feature_dim
    return Network(backbone, moco_head(backbone.feature_dim, hidden, cfg.dim, bool(cfg.mlp)))


AUTO_BN_SPLITS = 8  # the authors' and MoCo's CIFAR code (--bn-splits 8): one process plays 8 GPUs


def bn_splits(cfg: MocoConfig, world: int, micro_batch: int) -> int:
    """How many BN splits a run uses: on one process with Shuffle-BN on, ``cfg.bn_splits``, else 1.

    With several processes Shuffle-BN spreads the keys over the ranks' own BN batches; on one process
    SplitBatchNorm plays the ranks (see :mod:`unmix.training.batchnorm`). ``bn_splits: null`` (the
    default) takes 8, or for a per-process batch that 8 does not divide the largest number of groups
    below 8 that divides it with at least 2 images a group (1 = off where none does). An explicit value
    that does not divide the batch raises :class:`ConfigError` naming the key.
    """
    if world != 1 or not cfg.shuffle_bn:
        return 1
    if cfg.bn_splits is None:
        fits = [s for s in range(AUTO_BN_SPLITS, 1, -1) if micro_batch % s == 0 and micro_batch // s >= 2]
        return fits[0] if fits else 1
    if cfg.bn_splits <= 1:
        return 1
    if micro_batch % cfg.bn_splits:
        raise ConfigError(
            f"method.moco.bn_splits: a batch of {micro_batch} image(s) per step cannot be split into "
            f"{cfg.bn_splits} equal BatchNorm groups; choose optim.batch_size / optim.grad_accum divisible "
            "by it, method.moco.bn_splits=null (automatic) or 1 (off)"
        )
    return cfg.bn_splits


def split_bn(online: Network, cfg: MocoConfig, world: int, micro_batch: int) -> Network:
    """The query encoder with SplitBatchNorm when :func:`bn_splits` says so (one process, Shuffle-BN).

    Both encoders get it, as in the authors' and MoCo's CIFAR code: the key encoder is copied from this
    one, and the query encoder's BN then normalises groups the size of one GPU's batch too.
    """
    splits = bn_splits(cfg, world, micro_batch)
    if splits > 1:  # one process: say what plays the ranks (the automatic choice depends on the batch)
        print(
            f"[unmix] one process with Shuffle-BN: SplitBatchNorm in {splits} groups of "
            f"{micro_batch // splits} image(s) (method.moco.bn_splits)",
            file=sys.stderr,
            flush=True,
        )
    return batchnorm.split_batchnorm(online, splits)


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
    On one process the batch is shuffled when the encoder has SplitBatchNorm (each split then plays one
    GPU: a random subset of the batch); without it the forward is plain (shuffling within one BN batch
    changes nothing). With a ``group`` the collectives run over it whatever its size (``unmix bench gpu``
    runs them on a one-process NCCL group).
    """
    if group is not None:
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    else:
        world, rank = dist.world_size(), dist.rank()
    if world == 1 and group is None:
        if batchnorm.num_splits(encoder) <= 1:
            return encoder.embed(x)
        idx_shuffle = _to(torch.randperm(x.shape[0], generator=generator), x)  # the authors' shuffle
        return encoder.embed(x[idx_shuffle])[torch.argsort(idx_shuffle)]  # k: NxC, input order
    x_all = gather_images(x, group)  # x_all: (W*N)x3xHxW in x's layout; bf16 under bf16 autocast
    idx_shuffle = _to(torch.randperm(x_all.shape[0], generator=generator), x)  # same on every rank
    idx_unshuffle = torch.argsort(idx_shuffle)
    mine = idx_shuffle.view(world, -1)[rank]
    k_all = dist.gather_rows(encoder.embed(x_all[mine]), group)  # k_all: (W*N)xC, shuffled order
    return k_all[idx_unshuffle.view(world, -1)[rank]]  # k: NxC, this rank's input order


def _to(idx: Tensor, x: Tensor) -> Tensor:
    """A CPU index onto ``x``'s device; from pinned memory, so the copy does not wait for queued work."""
    return idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx


class MoCo:
    """Key encoder (EMA of the query encoder), queue, and the loss. ``online`` is not stored."""

    sync_target = False  # the key encoder keeps per-rank BN: Shuffle-BN needs it (training/sync_bn.py)

    def __init__(self, online: Network, cfg: MocoConfig, seed: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.sync_bn = cfg.sync_bn
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

        Symmetric (the authors' ``unmix_c10.py``): ``L(q1, k2) + L(q2, k1)`` for the clean part, and the
        mixture (of view 1, encoded by the query encoder only) is scored against both clean keys,
        ``lam * L(z_m, k2) + (1 - lam) * L(z_m.flip(0), k2)`` plus the same with ``k1``.
        Each L is a mean over the batch; the terms are summed, as the authors' (and MoCo's CIFAR demo).
        """
        T, queue = float(self.cfg.T), self.queue.queue
        if self.cfg.symmetric:
            q1, q2 = outs[0], outs[1]
            clean = info_nce(q1, keys[0], queue, T).mean() + info_nce(q2, keys[1], queue, T).mean()
        else:
            clean = info_nce(outs[0], keys[0], queue, T).mean()
        if lam is None:
            return clean, clean.detach(), torch.zeros_like(clean).detach()
        z_m = outs[-1]  # z_m: NxC, embeddings of the mixtures
        mix = sum(unmix_weighted(*pair, lam) for pair in info_nce_mixed_keys(z_m, keys, queue, T))
        return clean + mix, clean.detach(), mix.detach()

    def gathered(self, keys: tuple[Tensor, ...]) -> Tensor:
        """This rank's keys for the queue (the loop gathers them from all ranks)."""
        return torch.cat(keys) if len(keys) > 1 else keys[0]

    def after_step(self, keys_all: Tensor) -> None:
        """Enqueue the keys of every rank (the same on every rank, so the queues stay identical)."""
        self.queue.enqueue(keys_all)

    def momentum(self, step: int, total_steps: int) -> float:
        return self.cfg.m

    def replicated(self) -> list[Tensor]:
        return [*self.target.parameters(), *self.target.buffers(), self.queue.queue]

    def expected_unmix_cost(self) -> str:
        if self.cfg.symmetric:
            return "~1.4x for symmetric MoCo (one query pass added to two, plus two key forwards)"
        return "~1.75x for asymmetric MoCo (one query pass added to one, plus one key forward)"

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        self.queue.load_state_dict(state["queue"])
