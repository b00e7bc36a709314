"""The linear probe on real features of the digits sample: head_norm, the floors, the divergence guard."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unmix.eval.divergence import DivergenceGuard, ProbeDivergedError
from unmix.eval.linear import LinearClassifier
from unmix.eval.protocols import byol_protocol, moco_protocol, resolve_protocol


def test_default_is_bn_and_the_published_protocols_stay_available():
    assert resolve_protocol({"protocol": "moco"}).head_norm == "bn"
    assert resolve_protocol({"head_norm": "none", "protocol": "byol"}).head_norm == "none"
    published = resolve_protocol({"head_norm": "none"})
    assert (published.lr, published.batch_size, published.epochs, published.milestones) == (
        30.0,
        256,
        100,
        (60, 80),
    )
    assert published.weight_decay == 0.0 and moco_protocol("none") == published
    byol_published = resolve_protocol({"protocol": "byol", "head_norm": "none"})
    assert (byol_published.lr, byol_published.weight_decay, byol_published.batch_size) == (0.2, 0.0, 1024)
    assert byol_protocol("none") == byol_published
    # the BN head gets a learning rate meant for unit-variance inputs; schedules and epochs unchanged
    bn = resolve_protocol({"protocol": "moco"})
    assert (bn.lr, bn.weight_decay, bn.batch_size, bn.epochs) == (0.3, 0.001, 256, 100)
    byol_bn = resolve_protocol({"protocol": "byol"})  # batch 256: 4x the steps at the same cost
    assert (byol_bn.lr, byol_bn.weight_decay, byol_bn.batch_size, byol_bn.epochs) == (0.3, 0.001, 256, 80)
    assert resolve_protocol({"head_norm": "none", "lr": "5"}).lr == 5.0
    with pytest.raises(ValueError, match=r"head_norm='layer': choose one of bn, none"):
        resolve_protocol({"head_norm": "layer"})


def test_bn_head_folds_into_one_linear_layer():
    torch.manual_seed(0)
    head = LinearClassifier(16, 5, "bn")
    f = torch.randn(64, 16) * 7 + 3
    head.train()
    for _ in range(20):
        head(f)  # moves the running statistics
    head.eval()
    fc = head.folded()
    assert isinstance(fc, torch.nn.Linear)
    torch.testing.assert_close(fc(f), head(f), rtol=1e-5, atol=1e-4)
    plain = LinearClassifier(16, 5, "none")
    torch.testing.assert_close(plain.folded()(f), plain(f))


def test_random_init_floor_far_above_chance_and_near_the_pixel_floor(digits_features, train_probe):
    """(a) the default probe (MoCo's protocol with head_norm=bn) on random-init features and on pixels."""
    proto = dataclasses.replace(moco_protocol(), epochs=10)
    random = train_probe(*digits_features["random"], proto, 10, proto.head_norm)
    pixels = train_probe(*digits_features["pixels"], proto, 10, proto.head_norm)
    assert pixels.top1 > 80.0, pixels.top1  # logistic regression on these pixels: ~90 %
    assert random.top1 > 70.0, random.top1  # chance is 10 %
    assert random.top1 > pixels.top1 - 15.0, (random.top1, pixels.top1)
    losses = [h["train_loss"] for h in random.history]
    assert losses[-1] < losses[0]


def test_guard_fires_on_the_published_protocol_over_random_features(digits_features, train_probe):
    """(c) MoCo's lr 30 without the BN in front diverges on a random-init backbone's features."""
    proto = dataclasses.replace(moco_protocol("none"), epochs=6)
    with pytest.raises(ProbeDivergedError, match=r"diverged: .*set head_norm=bn .* smaller lr= \(now lr=30"):
        train_probe(*digits_features["random"], proto, 10, proto.head_norm)


def test_guard_rules_on_plain_numbers():
    proto = dataclasses.replace(moco_protocol(), head_norm="none")
    g = DivergenceGuard(proto, num_classes=10)
    with pytest.raises(ProbeDivergedError, match="not finite in epoch 1"):
        g.check_finite(1, float("nan"))
    # uninformative features: the loss hovers at ln C and val at chance -> a true answer, no failure
    g = DivergenceGuard(proto, num_classes=10)
    for e, loss in enumerate([2.40, 2.35, 2.38, 2.41, 2.39, 2.40], start=1):
        g.check(e, loss, 9.5)
    # a loss that climbs above its first epoch while val sits at chance fails after `patience` epochs
    g = DivergenceGuard(proto, num_classes=10)
    g.check(1, 1.5, 12.0)
    g.check(2, 1.9, 11.0)
    g.check(3, 2.0, 10.0)
    with pytest.raises(ProbeDivergedError, match=r"epoch 4 stayed above 1\.5 .*val top-1 is 10\.50 %"):
        g.check(4, 2.1, 10.5)
    # ... but not while val is well above chance
    g = DivergenceGuard(proto, num_classes=10)
    for e, loss in enumerate([1.5, 1.9, 2.0, 2.1, 2.2], start=1):
        g.check(e, loss, 60.0)


def test_compare_shows_the_pixel_floor_as_its_own_row():
    from types import SimpleNamespace

    from unmix.eval import compare

    def run(rid, kind, metrics, tags=None):
        return SimpleNamespace(
            info=SimpleNamespace(run_id=rid, experiment_id="1", status="FINISHED"),
            data=SimpleNamespace(tags={"unmix.kind": kind, **(tags or {})}, params={}, metrics=metrics),
        )

    runs = [
        run("p2", "pixels", {"linear_top1": 95.5, "linear_top5": 99.4}),  # newest first
        run("p1", "pixels", {"linear_top1": 90.0, "knn_top1": 88.0}),
        run("r1", "random_init", {"linear_top1": 94.2}, {"random_init": "resnet10"}),
    ]
    assert [compare.run_kind(r) for r in runs] == ["pixels", "pixels", "random_init"]
    (row,) = compare.floor_rows(runs[:2], {"1": "demo"}, 0.0, kind=compare.PIXELS_KIND)
    assert (row.name, row.kind, row.method, row.arch) == ("raw pixels", "pixels", "pixels", "pixels")
    assert (row.linear_top1, row.knn_top1, row.run_id) == (95.5, 88.0, "p2")
    table = compare.render(compare.Comparison(rows=[row], pairs=[], eval_runs={}), "table")
    assert "raw pixels" in table and "95.50" in table
