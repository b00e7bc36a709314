"""Fixtures of the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unmix.eval.linear import LinearClassifier, cached_batches, train_linear_head


def _train_probe(f_tr, y_tr, f_va, y_va, proto, classes: int, head_norm: str = "none"):
    """A linear head trained on cached features (``f [N, D]``, ``y [N]``) by ``proto``, validated on
    ``(f_va, y_va)``: what :func:`train_linear_head` returns."""
    torch.manual_seed(proto.seed)
    head = LinearClassifier(f_tr.shape[1], classes, head_norm)
    bs = proto.batch_size
    steps = -(-f_tr.shape[0] // bs)
    gen = torch.Generator().manual_seed(0)
    return train_linear_head(
        head,
        proto,
        lambda e: cached_batches(f_tr, y_tr, bs, steps, gen),
        steps,
        lambda: [(f_va[i : i + bs], y_va[i : i + bs]) for i in range(0, len(y_va), bs)],
    )


@pytest.fixture
def train_probe() -> Callable:
    return _train_probe
