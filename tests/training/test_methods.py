"""MoCo/BYOL building blocks: EMA, queue, MoCo with Un-Mix off == plain MoCo, LARS, schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmix.training import byol, moco
from unmix.training.backbones import build_backbone
from unmix.training.config import ByolConfig, MocoConfig
from unmix.training.ema import update_momentum
from unmix.training.heads import Network
from unmix.training.lars import LARS, param_groups
from unmix.training.queue import KeyQueue
from unmix.training.schedules import learning_rate


def _pair():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.data.normal_()
    return online, target


def test_ema_m1_leaves_target_unchanged_m0_copies():
    online, target = _pair()
    before = [p.clone() for p in target.parameters()]
    update_momentum(online, target, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    update_momentum(online, target, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters(), strict=True))


def test_ema_formula_and_extra_online_params_ignored():
    online, target = _pair()
    online.add_module("predictor", nn.Linear(2, 2))  # BYOL: online has more parameters
    expected = [0.9 * t + 0.1 * o for t, o in zip(target.parameters(), online.parameters(), strict=False)]
    update_momentum(online, target, 0.9)
    for e, t in zip(expected, target.parameters(), strict=True):
        torch.testing.assert_close(t, e)


def test_ema_reads_low_precision_online_into_fp32_target():
    online, target = _pair()
    online = online.to(torch.bfloat16)
    update_momentum(online, target, 0.0)
    assert all(p.dtype == torch.float32 for p in target.parameters())


def test_queue_enqueue_and_wrap_around():
    q = KeyQueue(dim=2, K=5, seed=0)
    keys = F.normalize(torch.arange(1, 13, dtype=torch.float32).view(6, 2), dim=1)
    q.enqueue(keys[:3])
    assert q.ptr == 3
    torch.testing.assert_close(q.queue[:, :3], keys[:3].T)
    q.enqueue(keys[3:6])  # 2 fit at the end, 1 wraps to the front
    assert q.ptr == 1
    torch.testing.assert_close(q.queue[:, 3:5], keys[3:5].T)
    torch.testing.assert_close(q.queue[:, 0], keys[5])
    torch.testing.assert_close(q.queue[:, 1:3], keys[1:3].T)  # untouched
    q.enqueue(F.normalize(torch.randn(12, 2), dim=1))  # more than K: keeps the newest K
    assert q.ptr == 1


def test_queue_state_roundtrip_and_seeded_init():
    a, b = KeyQueue(8, 16, seed=3), KeyQueue(8, 16, seed=3)
    assert torch.equal(a.queue, b.queue)
    torch.testing.assert_close(a.queue.norm(dim=0), torch.ones(16))
    a.enqueue(torch.randn(5, 8))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.queue, b.queue) and a.ptr == b.ptr


def _plain_moco_loss(encoder_q, encoder_k, queue, im_q, im_k, T):
    """facebookresearch/moco builder.py forward (single process), as a reference."""
    q = F.normalize(encoder_q(im_q), dim=1)
    with torch.no_grad():
        k = F.normalize(encoder_k(im_k), dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return nn.CrossEntropyLoss()(logits, labels)


def test_moco_with_unmix_off_equals_plain_moco():
    torch.manual_seed(0)
    cfg = MocoConfig(K=32, dim=16, hidden_dim=32, T=0.2, mlp=True)
    online = moco.build_online(build_backbone("resnet10", crop=16), cfg)
    method = moco.MoCo(online, cfg, seed=0)
    batch = {"view1": torch.randn(4, 3, 16, 16), "view2": torch.randn(4, 3, 16, 16)}
    ref_online = copy.deepcopy(online)
    ref_target = copy.deepcopy(method.target)

    keys = method.targets(batch, torch.Generator().manual_seed(0))
    outs = online(*method.online_inputs(batch, unmix=False))
    loss, clean, mix = method.loss(outs, keys, None)
    loss.backward()

    ref = _plain_moco_loss(
        ref_online.embed, ref_target.embed, method.queue.queue, batch["view1"], batch["view2"], 0.2
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert float(mix) == 0.0
    for (n, p), p_ref in zip(online.named_parameters(), ref_online.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("shuffle_bn", [True, False])
def test_moco_shuffle_bn_switch(monkeypatch, shuffle_bn):
    cfg = MocoConfig(K=32, dim=16, hidden_dim=32, symmetric=True, shuffle_bn=shuffle_bn)
    method = moco.MoCo(moco.build_online(build_backbone("resnet10", crop=16), cfg), cfg, seed=0)
    used = []
    real = moco.shuffled_embed
    monkeypatch.setattr(moco, "shuffled_embed", lambda enc, x, g: used.append(1) or real(enc, x, g))
    batch = {"view1": torch.randn(4, 3, 16, 16), "view2": torch.randn(4, 3, 16, 16)}
    k2, k1 = method.targets(batch, torch.Generator().manual_seed(0))
    assert len(used) == (2 if shuffle_bn else 0)
    assert k2.shape == k1.shape == (4, 16)


def test_moco_unmix_loss_is_clean_plus_weighted_mix():
    torch.manual_seed(0)
    cfg = MocoConfig(K=32, dim=16, hidden_dim=32, T=0.2, mlp=True)
    online = moco.build_online(build_backbone("resnet10", crop=16), cfg)
    method = moco.MoCo(online, cfg, seed=0)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    lam = torch.full((4,), 0.25)
    batch = {"view1": x1, "view2": x2, "mixed": 0.25 * x1 + 0.75 * x1.flip(0), "lam": lam}
    keys = method.targets(batch, torch.Generator().manual_seed(0))
    q, z_m = online(*method.online_inputs(batch, unmix=True))
    loss, clean, mix = method.loss((q, z_m), keys, lam)
    from unmix.training.losses import info_nce

    queue, k = method.queue.queue, keys[0]
    expected = (
        info_nce(q, k, queue, 0.2).mean()
        + 0.25 * info_nce(z_m, k, queue, 0.2).mean()
        + 0.75 * info_nce(z_m.flip(0), k, queue, 0.2).mean()
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(clean + mix, loss.detach())


def _authors_contrastive_loss(q, k, q_mixed, queue, T):
    """szq0214/Un-Mix ``unmix_c10.py`` ``ModelMoCo.contrastive_loss`` on given embeddings."""
    q = F.normalize(q, dim=1)
    q_mixed_flip = torch.flip(q_mixed, (0,))
    q_mixed, q_mixed_flip = F.normalize(q_mixed, dim=1), F.normalize(q_mixed_flip, dim=1)
    k = F.normalize(k, dim=1)
    ce, labels = nn.CrossEntropyLoss(), torch.zeros(q.shape[0], dtype=torch.long)
    losses = []
    for z in (q, q_mixed, q_mixed_flip):
        l_pos = torch.einsum("nc,nc->n", [z, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [z, queue.clone().detach()])
        losses.append(ce(torch.cat([l_pos, l_neg], dim=1) / T, labels))
    return losses  # loss, loss_m1, loss_m2


def _moco_on_embeddings(C, K, T, symmetric, seed=0):
    cfg = MocoConfig(K=K, dim=C, T=T, mlp=False, symmetric=symmetric)
    return moco.MoCo(Network(nn.Identity(), nn.Identity()), cfg, seed=seed)


@pytest.mark.parametrize("lam_value", [0.0, 0.37, 1.0])
def test_symmetric_moco_unmix_loss_equals_the_authors(lam_value):
    """The issue's check: N=16, C=128, K=4096, T=0.2; the mixture is scored against both k2 and k1."""
    g = torch.Generator().manual_seed(13)
    N, C, K, T = 16, 128, 4096, 0.2
    method = _moco_on_embeddings(C, K, T, symmetric=True)
    q1, q2, z_m, k1, k2 = (torch.randn(N, C, generator=g) for _ in range(5))
    queue = method.queue.queue
    loss, clean, mix = method.loss((q1, q2, z_m), (k2, k1), torch.full((N,), lam_value))
    loss_12, loss_m11, loss_m12 = _authors_contrastive_loss(q1, k2, z_m, queue, T)
    loss_21, loss_m21, loss_m22 = _authors_contrastive_loss(q2, k1, z_m, queue, T)
    lam = lam_value
    ref = loss_12 + loss_21 + lam * loss_m11 + (1 - lam) * loss_m12 + lam * loss_m21 + (1 - lam) * loss_m22
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clean, loss_12 + loss_21, rtol=1e-5, atol=1e-5)
    # the k2-only mixture loss (this project's before the fix) is lower by the two k1 terms
    k2_only = loss_12 + loss_21 + lam * loss_m11 + (1 - lam) * loss_m12
    assert float(loss - k2_only) > 1.0


def _naive_nce(q, k, queue, T):
    qi, ki = q / q.norm(), k / k.norm()
    pos = math.exp(float(qi @ ki) / T)
    neg = sum(math.exp(float(qi @ queue[:, j]) / T) for j in range(queue.shape[1]))
    return -math.log(pos / (pos + neg))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lam_values", [[0.0] * 6, [1.0] * 6, [0.37] * 6, [0.1, 0.9, 0.5, 0.3, 0.75, 0.2]])
def test_moco_unmix_loss_per_sample_reference(symmetric, lam_values):
    """Per sample: mixture i holds x1[i] (weight lam_i) and x1[N-1-i] (1 - lam_i); every clean key of
    image i scores mixture i with weight lam_i and mixture N-1-i (= z_m.flip(0)[i]) with 1 - lam_{N-1-i}."""
    g = torch.Generator().manual_seed(3)
    N, C, K, T = 6, 8, 24, 0.2
    method = _moco_on_embeddings(C, K, T, symmetric)
    q1, q2, z_m, k1, k2 = (torch.randn(N, C, generator=g) for _ in range(5))
    lam = torch.tensor(lam_values)
    outs, keys = ((q1, q2, z_m), (k2, k1)) if symmetric else ((q1, z_m), (k2,))
    loss, clean, mix = method.loss(outs, keys, lam)
    queue = method.queue.queue
    pairs = [(q1, k2), (q2, k1)] if symmetric else [(q1, k2)]
    ref_clean = sum(sum(_naive_nce(q[i], k[i], queue, T) for i in range(N)) / N for q, k in pairs)
    ref_mix = 0.0
    for k in keys:
        for i in range(N):
            j = N - 1 - i
            ref_mix += float(lam[i]) * _naive_nce(z_m[i], k[i], queue, T) / N
            ref_mix += (1 - float(lam[j])) * _naive_nce(z_m[j], k[i], queue, T) / N
    assert abs(float(clean) - ref_clean) < 1e-4
    assert abs(float(mix) - ref_mix) < 1e-4
    assert abs(float(loss) - ref_clean - ref_mix) < 1e-4


@pytest.mark.parametrize("mix_targets", ["both", "view2"])
@pytest.mark.parametrize("lam_values", [[0.0] * 4, [0.37] * 4, [1.0] * 4, [0.2, 0.6, 0.9, 0.4]])
def test_byol_unmix_loss_per_sample_reference(mix_targets, lam_values):
    g = torch.Generator().manual_seed(4)
    N, C = 4, 8
    cfg = ByolConfig(mix_targets=mix_targets)
    method = byol.BYOL(Network(nn.Identity(), nn.Identity()), cfg, seed=0)
    p1, p2, p_m, z1, z2 = (torch.randn(N, C, generator=g, requires_grad=True) for _ in range(5))
    lam = torch.tensor(lam_values)
    loss, clean, mix = method.loss((p1, p2, p_m), (z1, z2), lam)

    def reg(p, z):
        return float(((p / p.norm() - z / z.norm()) ** 2).sum().detach())

    ref_clean = sum(reg(p1[i], z2[i]) + reg(p2[i], z1[i]) for i in range(N)) / N
    ref_mix = 0.0
    for z in (z2, z1) if mix_targets == "both" else (z2,):
        for i in range(N):
            j = N - 1 - i
            ref_mix += (float(lam[i]) * reg(p_m[i], z[i]) + (1 - float(lam[j])) * reg(p_m[j], z[i])) / N
    assert abs(float(clean) - ref_clean) < 1e-5
    assert abs(float(mix) - ref_mix) < 1e-5
    loss.backward()  # the mixture term never reaches the targets
    assert z1.grad is None and z2.grad is None and p_m.grad is not None


def test_byol_loss_symmetric_and_target_has_no_predictor():
    torch.manual_seed(0)
    cfg = ByolConfig(proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=32)
    online = byol.build_online(build_backbone("resnet10", crop=16), cfg)
    method = byol.BYOL(online, cfg, seed=0)
    assert method.target.predictor is None
    batch = {"view1": torch.randn(4, 3, 16, 16), "view2": torch.randn(4, 3, 16, 16)}
    z1, z2 = method.targets(batch, torch.Generator())
    p1, p2 = online(batch["view1"], batch["view2"])
    loss, _, _ = method.loss((p1, p2), (z1, z2), None)
    ref = sum(
        float(((F.normalize(a, dim=1) - F.normalize(b, dim=1)) ** 2).sum(1).mean().detach())
        for a, b in ((p1, z2), (p2, z1))
    )
    assert abs(float(loss.detach()) - ref) < 1e-4


def test_target_bn_statistics_frozen():
    cfg = ByolConfig(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)
    method = byol.BYOL(byol.build_online(build_backbone("resnet10", crop=16), cfg), cfg, seed=0)
    before = {k: v.clone() for k, v in method.target.state_dict().items() if "running" in k}
    method.targets(
        {"view1": torch.randn(4, 3, 16, 16), "view2": torch.randn(4, 3, 16, 16)}, torch.Generator()
    )
    after = method.target.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_lars_excludes_bias_and_norm_and_matches_manual_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = param_groups(model, weight_decay=0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_adapt"] is False
    opt = LARS(groups, lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    w, b = model[0].weight, model[0].bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    model(torch.randn(8, 3)).pow(2).sum().backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    opt.step()
    d = gw + 0.1 * w0
    expected_w = w0 - 0.5 * (0.02 * w0.norm() / d.norm()) * d
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # plain SGD: no decay, no trust ratio


def test_schedules():
    assert learning_rate(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert learning_rate(100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(50, 100, 0.3, schedule="constant") == 0.3
    assert learning_rate(119, 200, 1.0, schedule="step", milestone_steps=(120, 160)) == 1.0
    assert learning_rate(120, 200, 1.0, schedule="step", milestone_steps=(120, 160)) == pytest.approx(0.1)
    assert learning_rate(199, 200, 1.0, schedule="step", milestone_steps=(120, 160)) == pytest.approx(0.01)
    assert byol.cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert byol.cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert byol.cosine_tau(50, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)
