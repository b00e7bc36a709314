"""Fixtures of the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unmix.eval.features import PixelFeatures, extract_features, freeze
from unmix.eval.linear import LinearClassifier, cached_batches, train_linear_head

CROP = 16  # digits are 8x8 upsampled to 32x32: a 16-pixel image loses nothing


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


@pytest.fixture(scope="session")
def digits_features(sample_train, sample_val):
    """``{"random" | "pixels" | "random32" | "pixels32": (f_train, y_train, f_val, y_val)}``: digits
    features (val transform) of a random-init ResNet-10 and of the raw pixels, at crop 16 and at crop 32
    (the benchmark's crop: 3,072 pixel features)."""
    from unmix.training.backbones import build_backbone

    out = {}
    for crop, tag in ((CROP, ""), (32, "32")):
        torch.manual_seed(0)
        nets = {"random": build_backbone("resnet10", crop=crop, width=32), "pixels": PixelFeatures(crop)}
        for name, net in nets.items():
            out[name + tag] = _extract(freeze(net), sample_train, sample_val, crop)
    return out


def _extract(net, sample_train, sample_val, crop: int) -> tuple[torch.Tensor, ...]:
    from unmix.pipeline import build_eval_loader

    splits = []
    for shards in (sample_train, sample_val):
        loader = build_eval_loader(
            str(shards), batch_size=256, split="val", crop=crop, device="cpu", num_threads=1
        )
        splits.extend(extract_features(net, loader, torch.device("cpu")))
    return tuple(splits)
