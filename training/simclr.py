"""SimCLR (Chen et al. 2020) with the Un-Mix loss: one network, NT-Xent over the global batch.

Online network = backbone + projection MLP (Linear-BN-ReLU-Linear, hidden width = the backbone's
feature width: 2048-2048-128 on ResNet-50). There is no target network and no queue: the negatives of
each anchor are the other 2N-2 views of the *global* batch, so every rank gathers the embeddings of
all ranks, with their gradient (:func:`gather_with_grad`): a plain ``all_gather`` returns tensors
without a gradient, and each rank would then train only through its own slice of the similarity matrix.

Un-Mix (the authors' rule for any base method, szq0214/Un-Mix issue 4): the mixture of view 1 with
its reversed batch is embedded by the same network and scored against view 2,
``L(z1, z2) + lam * L(z_m, z2) + (1 - lam) * L(z_m.flip(0), z2)``; which embeddings are the negatives of
a mixture anchor, and why: :func:`unmix.training.losses.nt_xent_unmix`.
:class:`SimCLR` implements :class:`unmix.training.methods.Method`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unmix.training import dist
from unmix.training.config import SimclrConfig
from unmix.training.heads import Network, simclr_mlp
from unmix.training.losses import nt_xent, nt_xent_unmix


def build(
    backbone: torch.nn.Module, run_cfg, cfg: SimclrConfig, world: int, micro_batch: int, device
) -> tuple[Network, SimCLR]:
    """The online network (backbone + projection MLP) on ``device``, and :class:`SimCLR`."""
    return build_online(backbone, cfg).to(device), SimCLR(cfg)


def build_online(backbone: torch.nn.Module, cfg: SimclrConfig) -> Network:
    """Backbone -> projection MLP (hidden ``cfg.proj_hidden_dim``, or the backbone's width when None)."""
    hidden = cfg.proj_hidden_dim if cfg.proj_hidden_dim is not None else backbone.feature_dim
    return Network(backbone, simclr_mlp(backbone.feature_dim, hidden, cfg.proj_dim))


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums the gradient over ranks and keeps this rank's rows.

    Written here rather than taken from ``torch.distributed.nn.functional``: that module binds
    ``group=group.WORLD`` as a default argument when it is imported, so imported after
    ``init_process_group`` it keeps the process group alive past ``destroy_process_group`` until the
    interpreter's exit, where freeing it aborted CPU ranks (gloo: "terminate called without an active
    exception", SIGABRT, one run in eight).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: NxC -> (W*N)xC
        ctx.rows = slice(dist.rank() * x.shape[0], (dist.rank() + 1) * x.shape[0])
        return dist.gather_rows(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # grad: (W*N)xC, this rank's loss -> every rank's rows
        total = grad.clone(memory_format=torch.contiguous_format)  # autograd's buffer is not ours to reduce
        torch.distributed.all_reduce(total)  # every rank's loss -> these rows
        return total[ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """``x`` of every rank concatenated along dim 0 (rank order), differentiable: the backward sums the
    gradient that every rank's loss sends to this rank's rows (one ``all_reduce``, as solo-learn's
    ``GatherLayer``). Identity on one process."""
    if dist.world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class SimCLR:
    """The NT-Xent loss (+ Un-Mix) over the global batch. No target network, nothing after the step."""

    target = None
    sync_target = False

    def __init__(self, cfg: SimclrConfig):
        self.cfg = cfg
        self.sync_bn = cfg.sync_bn

    def online_inputs(self, batch: dict[str, Tensor], unmix: bool) -> tuple[Tensor, ...]:
        """View 1, view 2, then the mixture (of view 1), each embedded in its own forward (own BN batch)."""
        views = (batch["view1"], batch["view2"])
        return views + ((batch["mixed"],) if unmix else ())

    def targets(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, ...]:
        """SimCLR has no target network: both views go through the online network."""
        return ()

    def loss(
        self, outs: tuple[Tensor, ...], targets: tuple[Tensor, ...], lam: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``L(z1, z2) + lam * L(z_m, z2) + (1 - lam) * L(z_m.flip(0), z2)``; returns (loss, clean, mix).

        Each L is NT-Xent at temperature ``T``, the mean over this rank's anchors of the loss against
        the global batch's candidates. DeepSpeed averages the gradients over ranks, and the gather's
        backward brings every rank's share of each embedding's gradient home, so the update is that of
        one process holding the whole batch (tested on two gloo ranks).
        """
        T = float(self.cfg.T)
        z1, z2 = outs[0], outs[1]  # z: NxC, projections of the two views
        clean = nt_xent(z1, z2, T, gather_with_grad).mean()
        if lam is None:
            return clean, clean.detach(), torch.zeros_like(clean).detach()
        z_m = outs[2]  # z_m: NxC, projections of the mixtures
        mix = nt_xent_unmix(z_m, z2, lam, T, gather_with_grad)
        return clean + mix, clean.detach(), mix.detach()

    def momentum(self, step: int, total_steps: int) -> float:
        return 0.0

    def gathered(self, targets: tuple[Tensor, ...]) -> None:
        return None

    def after_step(self, gathered: Tensor) -> None:
        pass

    def replicated(self) -> list[Tensor]:
        return []

    def expected_unmix_cost(self) -> str:
        return "~1.5x (one online pass added to two; no target forwards)"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
