"""Losses against naive per-sample references; the Un-Mix weighting on toy embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unmix.training.losses import (
    byol_regression,
    info_nce,
    info_nce_mixed,
    info_nce_mixed_keys,
    unmix_weighted,
)


def _naive_info_nce(q, k, queue, T):
    q, k = q.detach(), k.detach()
    out = []
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        pos = math.exp(float(qi @ ki) / T)
        neg = sum(math.exp(float(qi @ queue[:, j]) / T) for j in range(queue.shape[1]))
        out.append(-math.log(pos / (pos + neg)))
    return torch.tensor(out)


def test_info_nce_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = F.normalize(torch.randn(8, 11, generator=g), dim=0)
    got = info_nce(q, k, queue, 0.2)
    torch.testing.assert_close(got, _naive_info_nce(q, k, queue, 0.2), rtol=1e-5, atol=1e-5)


def test_info_nce_analytic_value():
    # q == k and all negatives orthogonal: loss = -log(e^{1/T} / (e^{1/T} + K))
    q = torch.eye(4)[:1]
    queue = torch.eye(4)[:, 1:]
    T = 0.5
    expected = -math.log(math.exp(1 / T) / (math.exp(1 / T) + 3))
    assert abs(float(info_nce(q, q, queue, T)[0]) - expected) < 1e-6


def test_info_nce_gradient_only_into_queries():
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    info_nce(q, k, F.normalize(torch.randn(4, 6), dim=0), 0.2).mean().backward()
    assert q.grad is not None and k.grad is None


def test_byol_regression_matches_naive_reference():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    ref = torch.tensor([float(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()) for i in range(6)])
    torch.testing.assert_close(byol_regression(p, z), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(byol_regression(p, p), torch.zeros(6), atol=1e-6)  # identical: 0
    assert torch.allclose(byol_regression(p, -p), torch.full((6,), 4.0), atol=1e-5)  # opposite: 4


def test_unmix_weighting_against_reference_on_toy_embeddings():
    """Mixtures of view 1 with its reversed partner, embedded by a per-sample encoder (no BN)."""
    g = torch.Generator().manual_seed(2)
    N, D, C = 6, 10, 4
    encoder = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))
    x1 = torch.randn(N, D, generator=g)
    keys = torch.randn(N, C, generator=g)
    queue = F.normalize(torch.randn(C, 7, generator=g), dim=0)
    lam_value = 0.3
    lam = torch.full((N,), lam_value)
    mixed = lam_value * x1 + (1 - lam_value) * x1.flip(0)
    z_m = encoder(mixed)

    got = unmix_weighted(info_nce(z_m, keys, queue, 0.2), info_nce(z_m.flip(0), keys, queue, 0.2), lam)

    # Reference: sample i's mixture holds x1[i] with weight lam -> scored against key i with weight lam;
    # the reversed mixture (a forward on mixed.flip(0)) holds x1[i] with weight 1-lam -> key i, 1-lam.
    z_rev = encoder(mixed.flip(0))
    ref = 0.0
    for i in range(N):
        ref += lam_value * float(_naive_info_nce(z_m[i : i + 1], keys[i : i + 1], queue, 0.2)[0])
        ref += (1 - lam_value) * float(_naive_info_nce(z_rev[i : i + 1], keys[i : i + 1], queue, 0.2)[0])
    assert abs(float(got.detach()) - ref / N) < 1e-4


def test_unmix_weighting_with_per_sample_lambda_pairs_partners():
    # loss_mix_rev[i] belongs to mixture N-1-i, whose weight on x[i] is 1 - lam[N-1-i].
    lam = torch.tensor([0.1, 0.2, 0.9])
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    expected = ((0.1 * 1 + 0.1 * 10) + (0.2 * 2 + 0.8 * 20) + (0.9 * 3 + 0.9 * 30)) / 3
    assert abs(float(unmix_weighted(a, b, lam)) - expected) < 1e-6


def test_info_nce_mixed_equals_two_info_nce_with_the_queue_product_once():
    torch.manual_seed(0)
    z_m = torch.randn(6, 8, requires_grad=True)
    keys, queue = torch.randn(6, 8), F.normalize(torch.randn(8, 32), dim=0)
    got = info_nce_mixed(z_m, keys, queue, 0.2)
    ref = info_nce(z_m, keys, queue, 0.2), info_nce(z_m.flip(0), keys, queue, 0.2)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad(sum(x.sum() for x in got), z_m)
    (g_ref,) = torch.autograd.grad(sum(x.sum() for x in ref), z_m)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_info_nce_mixed_keys_equals_info_nce_mixed_per_key():
    torch.manual_seed(1)
    z_m = torch.randn(6, 8, requires_grad=True)
    k2, k1, queue = torch.randn(6, 8), torch.randn(6, 8), F.normalize(torch.randn(8, 32), dim=0)
    got = info_nce_mixed_keys(z_m, (k2, k1), queue, 0.2)
    for pair, k in zip(got, (k2, k1), strict=True):
        for g, r in zip(pair, info_nce_mixed(z_m, k, queue, 0.2), strict=True):
            torch.testing.assert_close(g, r)
