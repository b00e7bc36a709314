"""LARS (You et al. 2017) as used by BYOL: SGD with momentum and a per-tensor trust ratio.

Biases and normalisation parameters (every 1-D tensor) get neither the trust-ratio adaptation nor
weight decay, as in BYOL; :func:`param_groups` splits a model's parameters accordingly.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool = True) -> list[dict]:
    """Two groups: regular weights (decay + adaptation) and biases/norm params (neither)."""
    regular, excluded = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (excluded if exclude_bias_norm and p.ndim <= 1 else regular).append(p)
    groups = [{"params": regular, "weight_decay": weight_decay, "lars_adapt": True}]
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_adapt": False})
    return groups


class LARS(torch.optim.Optimizer):
    """Per tensor: ``d = g + wd * w``; ``d *= eta * ||w|| / ||d||`` (adapted groups only);
    ``v = mu * v + d``; ``w -= lr * v``.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm)
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
