"""Linear evaluation on plain tensors (no DALI): accuracy, schedules, overrides, the frozen backbone."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from unmix.eval.distributed import DistContext
from unmix.eval.features import freeze, state_fingerprint
from unmix.eval.linear import (
    LinearClassifier,
    evaluate_head,
    linear_eval,
    topk_correct,
)
from unmix.eval.protocols import (
    KNN_KEYS,
    LINEAR_KEYS,
    byol_protocol,
    fixed,
    moco_protocol,
    parse_overrides,
    resolve_protocol,
    with_crop,
)

CPU = DistContext.single(torch.device("cpu"))


def _blobs(
    n: int, dim: int, classes: int, seed: int, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around well-separated class means (linearly separable with high probability)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + noise * torch.randn(n, dim, generator=g), y


def test_separable_features_reach_100_percent(train_probe):
    f_tr, y_tr = _blobs(1000, 32, 10, seed=1)
    f_va, y_va = _blobs(500, 32, 10, seed=2)
    proto = fixed(moco_protocol(), epochs=5, batch_size=100, lr=1.0)
    result = train_probe(f_tr, y_tr, f_va, y_va, proto, 10)
    assert result.val_samples == 500
    assert result.top1 >= 99.0
    assert result.top5 == 100.0
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] / 10


def test_choose_hparams_takes_the_lowest_held_out_loss_and_skips_a_stopped_pair():
    """The (lr, weight_decay) search against a naive reference: each pair trained on train less logreg's
    held-out split and scored on it (cross-entropy and top-1); lr 1000 behind the BN ends mis-scaled, so
    the guard stops it and it is skipped; the pair with the lowest held-out loss is refit on all of train."""
    import torch.nn.functional as F

    from unmix.eval.divergence import ProbeDivergedError
    from unmix.eval.linear import choose_hparams, sgd_probe
    from unmix.eval.logreg import stratified_holdout

    torch.set_num_threads(1)
    f, y = _blobs(400, 16, 4, seed=1, noise=5.0)  # overlapping classes: the pairs score differently
    proto = dataclasses.replace(
        moco_protocol(), epochs=6, batch_size=64, lr_grid=(0.003, 0.3, 1000.0), wd_grid=(0.0, 0.1)
    )
    chosen, scores = choose_hparams(f, y, 4, proto, CPU)
    held = stratified_holdout(y, 0.1, 0)
    loss, top1 = {}, {}
    for lr in (0.003, 0.3):
        for wd in (0.0, 0.1):
            p = fixed(proto, lr=lr, weight_decay=wd)
            head = sgd_probe(f[~held], y[~held], f[held], y[held], 4, p, CPU).head.eval()
            with torch.no_grad():
                logits = head(f[held])
            loss[lr, wd] = F.cross_entropy(logits, y[held]).item()
            top1[lr, wd] = 100.0 * (logits.argmax(1) == y[held]).float().mean().item()
    assert scores[1000.0, 0.0] is None and scores[1000.0, 0.1] is None
    for pair in loss:
        assert scores[pair].loss == pytest.approx(loss[pair], rel=1e-5)
        assert scores[pair].top1 == pytest.approx(top1[pair]) and scores[pair].total == int(held.sum())
    best = min(loss, key=loss.get)
    assert len({round(v, 4) for v in loss.values()}) == 4 and (chosen.lr, chosen.weight_decay) == best
    assert (chosen.lr_grid, chosen.wd_grid) == ((), ())
    # sgd_probe: the search, then the chosen pair refit on all of train and scored on val
    result = sgd_probe(f, y, f, y, 4, proto, CPU)
    assert result.search == scores and (result.lr, result.weight_decay) == best
    assert result.top1 == sgd_probe(f, y, f, y, 4, fixed(proto, lr=best[0], weight_decay=best[1]), CPU).top1
    with pytest.raises(ProbeDivergedError, match=r"every lr of lr_grid=500,1000 .*give smaller values"):
        choose_hparams(f, y, 4, dataclasses.replace(proto, lr_grid=(500.0, 1000.0)), CPU)


def test_random_labels_stay_at_chance(train_probe):
    g = torch.Generator().manual_seed(3)
    f_tr, f_va = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    y_tr, y_va = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    proto = fixed(moco_protocol(), epochs=5, batch_size=100, lr=1.0)
    result = train_probe(f_tr, y_tr, f_va, y_va, proto, 10)
    # chance is 10 % (top-1) and 50 % (top-5); one binomial sd at n=2000 is 0.7 % / 1.1 %
    assert 5.0 < result.top1 < 15.0
    assert 43.0 < result.top5 < 57.0


def test_classifier_init_is_mocos():
    head = LinearClassifier(2048, 1000)
    assert torch.all(head.fc.bias == 0)
    assert abs(head.fc.weight.std().item() - 0.01) < 5e-4
    assert abs(head.fc.weight.mean().item()) < 5e-4


def test_topk_correct_against_manual_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.1, 0.9]])
    labels = torch.tensor([1, 2, 0, 1])
    # top-1 predictions 1, 0, 1, 2 -> one hit; top-2: {1,0}, {0,2}, {1,0}, {2,1} -> 4 hits; k=5 capped at C=3
    assert topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [1, 4, 4]


def test_evaluate_head_counts_every_sample_once():
    head = LinearClassifier(4, 3)
    f = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    batches = [(f[:4], y[:4]), (f[4:7], y[4:7]), (f[7:], y[7:])]
    top1, _, total, loss = evaluate_head(head, batches)
    assert total == 10
    head.eval()
    assert top1 == pytest.approx(100.0 * (head(f).argmax(1) == y).sum().item() / 10)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(head(f), y).item(), rel=1e-6)


def test_moco_schedule_steps_at_60_and_80():
    p = moco_protocol("none")  # the published keys
    assert (p.epochs, p.batch_size, p.momentum, p.weight_decay, p.nesterov) == (100, 256, 0.9, 0.0, False)
    assert p.lr_at(0) == pytest.approx(30.0)
    assert p.lr_at(59.9) == pytest.approx(30.0)
    assert p.lr_at(60) == pytest.approx(3.0)
    assert p.lr_at(80) == pytest.approx(0.3)
    assert dataclasses.replace(p, batch_size=512).lr_at(0) == pytest.approx(60.0)  # linear scaling
    short = dataclasses.replace(p, epochs=10)  # milestones scale with the run length
    assert [short.lr_at(e) for e in (5, 6, 8)] == pytest.approx([30.0, 3.0, 0.3])


def test_byol_schedule_is_cosine_without_warmup():
    p = byol_protocol("none")  # the published keys
    assert (p.epochs, p.batch_size, p.nesterov, p.weight_decay) == (80, 1024, True, 0.0)
    assert p.lr_at(0) == pytest.approx(0.8)  # 0.2 x 1024 / 256
    assert p.lr_at(40) == pytest.approx(0.4)
    assert p.lr_at(80) == pytest.approx(0.0, abs=1e-12)


def test_overrides_apply_and_unknown_keys_are_named():
    proto = resolve_protocol(
        parse_overrides(["protocol=byol", "epochs=3", "data.crop=32", "features=cached"])
    )
    assert (proto.protocol, proto.epochs, proto.crop, proto.features, proto.batch_size) == (
        "byol",
        3,
        32,
        "cached",
        256,  # the BN head's batch (head_norm=none: BYOL's 1024)
    )
    with pytest.raises(ValueError, match=r"unknown key 'epoch'.*allowed keys: protocol, epochs"):
        parse_overrides(["epoch=3"])
    with pytest.raises(ValueError, match="unknown key 'epochs'"):
        parse_overrides(["epochs=3"], KNN_KEYS)
    with pytest.raises(ValueError, match="expected int"):
        resolve_protocol(parse_overrides(["epochs=many"]))
    with pytest.raises(ValueError, match="features='fast'"):
        resolve_protocol(parse_overrides(["features=fast"]))
    with pytest.raises(ValueError, match="protocol='simclr'"):
        resolve_protocol(parse_overrides(["protocol=simclr"]))
    assert "num_threads" in LINEAR_KEYS and "device" in LINEAR_KEYS


def test_crop_defaults_to_the_pretraining_crop():
    assert with_crop(moco_protocol(), 32).crop == 32
    assert with_crop(moco_protocol(), None).crop == 224
    assert with_crop(resolve_protocol({"data.crop": "64"}), 32).crop == 64


class FakeLoader:
    """Stands in for build_eval_loader: fixed images, this rank's contiguous part; train = flipped."""

    def __init__(self, images, labels, batch_size, split, shard_id, num_shards, **_):
        n = len(labels)
        lo, hi = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.images, self.labels = images[lo:hi], labels[lo:hi]
        self.batch_size, self.split = batch_size, split

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            x = self.images[i : i + self.batch_size]
            if self.split == "train":
                x = x.flip(3)  # an "augmentation"
            yield {"image": x.clone(), "label": self.labels[i : i + self.batch_size].clone()}


def _image_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += (y.float() - 1).view(-1, 1, 1) * 2  # the class shifts the red channel's mean
    return x, y


@pytest.mark.parametrize("features", ["cached", "augmented"])
def test_backbone_bit_identical_after_linear_eval(features):
    from unmix.training.backbones import build_backbone

    torch.manual_seed(0)
    backbone = freeze(build_backbone("resnet10", crop=8))
    # make BN running statistics non-trivial so a forward in train mode would visibly move them
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(backbone.state_dict())
    before = state_fingerprint(backbone)
    x_tr, y_tr = _image_task(64, 1)
    x_va, y_va = _image_task(40, 2)

    def make_loader(shards, **kw):
        return FakeLoader(*((x_tr, y_tr) if shards == "train" else (x_va, y_va)), **kw)

    proto = fixed(moco_protocol(), epochs=3, batch_size=32, lr=0.5, crop=8, device="cpu", features=features)
    result = linear_eval(backbone, 3, proto, CPU, make_loader, "train", "val")
    assert result.val_samples == 40
    assert len(result.history) == 3 and all("val_top1" in h for h in result.history)
    assert state_fingerprint(backbone) == before
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert result.top1 > 60.0  # the red-channel shift is easy to read off even from random features


def test_state_fingerprint_sees_bn_statistics():
    from unmix.training.backbones import build_backbone

    net = build_backbone("resnet10", crop=8)
    before = state_fingerprint(net)
    net.train()
    net(torch.randn(4, 3, 8, 8))  # a train-mode forward moves running_mean/var
    assert state_fingerprint(net) != before


def test_non_finite_loss_stops_with_a_clear_error(train_probe):
    f_tr, y_tr = _blobs(100, 8, 3, seed=1)
    f_tr[5, 0] = float("inf")  # e.g. an exploding random-init feature
    proto = fixed(moco_protocol(), epochs=2, batch_size=50, lr=1.0)
    with pytest.raises(FloatingPointError, match=r"not finite in epoch 1 .*smaller lr"):
        train_probe(f_tr, y_tr, f_tr, y_tr, proto, 3)
