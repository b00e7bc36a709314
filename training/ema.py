"""The momentum (EMA) update of a target network from the online network."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """``target = m * target + (1 - m) * online`` for every target parameter (matched by name).

    Exact at the ends: m=1 leaves the target unchanged, m=0 copies the online weights (``lerp`` is exact
    at weight 0 and 1). The online network may hold more parameters (BYOL's predictor); they are
    ignored. Online weights in bf16/fp16 are upcast; the target stays fp32.
    """
    src = dict(online.named_parameters())
    t_params, o_params = [], []
    for name, p_t in target.named_parameters():
        p_o = src[name]
        t_params.append(p_t.data)
        o_params.append(p_o.detach().to(p_t.dtype))
    torch._foreach_lerp_(t_params, o_params, 1.0 - m)
