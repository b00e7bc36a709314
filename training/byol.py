"""BYOL with the Un-Mix loss: online = backbone + projector + predictor; target = EMA of the first two.

The target is fp32 and lives here, outside the DeepSpeed engine; the loop updates it with
:func:`unmix.training.ema.update_momentum` after each optimizer step, at the cosine tau of that step.
:class:`BYOL` implements :class:`unmix.training.methods.Method`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from unmix.training.config import ByolConfig
from unmix.training.heads import Network, byol_mlp, freeze_bn_stats
from unmix.training.losses import byol_regression, unmix_weighted


def build(
    backbone: torch.nn.Module, run_cfg, cfg: ByolConfig, world: int, micro_batch: int, device
) -> tuple[Network, BYOL]:
    """The online network on ``device`` and :class:`BYOL` (its target copied from it)."""
    online = build_online(backbone, cfg).to(device)
    return online, BYOL(online, cfg, run_cfg.seed, device)


def build_online(backbone: torch.nn.Module, cfg: ByolConfig) -> Network:
    """Online network: backbone -> projector (4096-256) -> predictor (4096-256)."""
    projector = byol_mlp(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
    predictor = byol_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
    return Network(backbone, projector, predictor)


def cosine_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL's target momentum: ``1 - (1 - tau_base) * (cos(pi * step / total) + 1) / 2``."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)) + 1) / 2


class BYOL:
    """Target network and the symmetric BYOL loss (+ Un-Mix). ``online`` is not stored."""

    # BYOL's reference computes batch statistics across devices in both networks (training/sync_bn.py)
    sync_target = True

    def __init__(self, online: Network, cfg: ByolConfig, seed: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.sync_bn = cfg.sync_bn
        target = Network(copy.deepcopy(online.backbone), copy.deepcopy(online.head))  # no predictor
        self.target = freeze_bn_stats(target).float().to(device)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.queue = None

    def online_inputs(self, batch: dict[str, Tensor], unmix: bool) -> tuple[Tensor, ...]:
        views = (batch["view1"], batch["view2"])
        return views + ((batch["mixed"],) if unmix else ())

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, ...]:
        """Target projections of the clean views: ``(z1', z2')``."""
        self.target.train()
        return self.target(batch["view1"], batch["view2"])

    def loss(
        self, outs: tuple[Tensor, ...], targets: tuple[Tensor, ...], lam: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``L(p1, z2') + L(p2, z1')`` plus, for each clean target ``z'`` of the mixture term,
        ``lam * L(p_m, z') + (1 - lam) * L(p_m.flip(0), z')``. Returns (loss, clean, mix).

        The mixture (of view 1) goes through the online branch only. ``mix_targets: both`` (default)
        regresses it onto the target projections of both clean views, as the symmetric loss scores the
        clean views against both (the authors' symmetric MoCo form); ``view2`` onto view 2's only (the
        one-target form of unmix 0.1.0, to compare with runs made with it). Each L is a mean over the
        batch; the terms are summed.
        """
        p1, p2 = outs[0], outs[1]  # p: NxC, online predictions
        z1, z2 = targets  # z': NxC, target projections
        clean = byol_regression(p1, z2).mean() + byol_regression(p2, z1).mean()
        if lam is None:
            return clean, clean.detach(), torch.zeros_like(clean).detach()
        p_m = outs[2]  # p_m: NxC, predictions for the mixtures
        mix_targets = (z2, z1) if self.cfg.mix_targets == "both" else (z2,)
        mix = sum(
            unmix_weighted(byol_regression(p_m, z), byol_regression(p_m.flip(0), z), lam) for z in mix_targets
        )
        return clean + mix, clean.detach(), mix.detach()

    def gathered(self, targets: tuple[Tensor, ...]) -> None:
        return None

    def after_step(self, gathered: Tensor) -> None:
        pass

    def momentum(self, step: int, total_steps: int) -> float:
        return cosine_tau(step, total_steps, self.cfg.tau_base)

    def replicated(self) -> list[Tensor]:
        return [*self.target.parameters(), *self.target.buffers()]

    def expected_unmix_cost(self) -> str:
        return "~1.4x (one online pass added to two, plus two target forwards)"

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
