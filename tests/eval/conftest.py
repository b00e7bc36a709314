"""Fixtures of the evaluation tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from unmix.eval.features import PixelFeatures, extract_features, freeze
from unmix.eval.linear import sgd_probe

CROP = 16  # digits are 8x8 upsampled to 32x32: a 16-pixel image loses nothing


def _train_probe(f_tr, y_tr, f_va, y_va, proto, classes: int, head_norm: str = "none"):
    """A linear head trained on cached features (``f [N, D]``, ``y [N]``) by ``proto`` (its lr and weight
    decay chosen on held-out train when ``proto`` has a grid: the BN-head defaults do), validated on
    ``(f_va, y_va)``: what :func:`~unmix.eval.linear.sgd_probe` returns."""
    return sgd_probe(f_tr, y_tr, f_va, y_va, classes, dataclasses.replace(proto, head_norm=head_norm))


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


@pytest.fixture(scope="session")
def shifted_features(tmp_path_factory):
    """``{"random" | "pixels": (f_train, y_train, f_val, y_val)}`` on the hard ``shifted-digits`` sample (a
    digit at a random place and size on a 16x16 canvas; the benchmarks' crop 16): a random-init ResNet-10
    (width 32) and the raw pixels. Here no fixed SGD lr and weight decay land near ``logreg``."""
    from unmix.pipeline.shards.sample import write_sample
    from unmix.training.backbones import build_backbone

    root = tmp_path_factory.mktemp("shifted-digits")
    write_sample("shifted-digits", root)
    torch.manual_seed(0)
    nets = {"random": build_backbone("resnet10", crop=CROP, width=32), "pixels": PixelFeatures(CROP)}
    return {name: _extract(freeze(net), root / "train", root / "val", CROP) for name, net in nets.items()}


def _extract(net, sample_train, sample_val, crop: int) -> tuple[torch.Tensor, ...]:
    from unmix.pipeline import build_eval_loader

    splits = []
    for shards in (sample_train, sample_val):
        loader = build_eval_loader(
            str(shards), batch_size=256, split="val", crop=crop, device="cpu", num_threads=1
        )
        splits.extend(extract_features(net, loader, torch.device("cpu")))
    return tuple(splits)
