"""MoCo's queue of negative keys: fp32, a ring buffer written with the keys gathered from all ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class KeyQueue:
    """``K`` normalised keys of dimension ``dim`` (``queue``: dim x K) and a write pointer.

    Kept outside the DeepSpeed module so it stays fp32; every rank enqueues the same gathered keys,
    so the queue is identical everywhere after every step.
    """

    def __init__(self, dim: int, K: int, seed: int = 0, device: torch.device | str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.queue = F.normalize(torch.randn(dim, K, generator=g), dim=0).to(device)  # queue: CxK
        self.ptr = 0

    @property
    def K(self) -> int:  # noqa: N802 (the paper's symbol)
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (NxC, any N) at the pointer, wrapping around the end; keeps the newest K."""
        keys = F.normalize(keys.detach().float(), dim=1)
        n = keys.shape[0]
        if n >= self.K:
            keys, n = keys[-self.K :], self.K
        idx = (self.ptr + torch.arange(n, device=self.queue.device)) % self.K
        self.queue[:, idx] = keys.T
        self.ptr = (self.ptr + n) % self.K

    def state_dict(self) -> dict:
        return {"queue": self.queue.cpu().clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.queue.copy_(state["queue"])
        self.ptr = int(state["ptr"])
