"""Weighted kNN against a brute-force NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unmix.training.knn import knn_evaluate, knn_predict


def reference_knn(queries, bank, bank_labels, num_classes, k, t):
    """Brute force: L2-normalise, cosine similarity to every bank row, k best vote with exp(s/t)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    scores = np.zeros((len(q), num_classes))
    for i, qi in enumerate(q):
        sims = b @ qi
        nearest = np.argsort(-sims, kind="stable")[:k]
        for j in nearest:
            scores[i, bank_labels[j]] += np.exp(sims[j] / t)
    return scores


@pytest.mark.parametrize("k,t,chunk", [(200, 0.1, 1024), (5, 0.07, 7), (1, 0.5, 16), (500, 0.1, 64)])
def test_knn_scores_match_numpy(k, t, chunk):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 16)).astype(np.float64)
    labels = rng.integers(0, 7, size=300)
    queries = rng.normal(size=(50, 16))
    ref = reference_knn(queries, bank, labels, 7, k, t)
    got = knn_predict(
        torch.tensor(queries), torch.tensor(bank), torch.tensor(labels), 7, k=k, t=t, chunk=chunk
    )
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4)


def test_knn_accuracy_matches_numpy():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 8)) * 1.5
    y_bank = rng.integers(0, 5, size=400)
    y_q = rng.integers(0, 5, size=120)
    bank = centers[y_bank] + rng.normal(size=(400, 8))
    queries = centers[y_q] + rng.normal(size=(120, 8))
    ref = reference_knn(queries, bank, y_bank, 5, 20, 0.1)
    ref_top1 = 100.0 * (ref.argmax(1) == y_q).mean()
    ref_top5 = 100.0  # 5 classes: the true one is always among the top 5
    res = knn_evaluate(
        torch.tensor(queries),
        torch.tensor(y_q),
        torch.tensor(bank),
        torch.tensor(y_bank),
        5,
        k=20,
        t=0.1,
        chunk=32,
    )
    assert res.total == 120
    assert res.top1 == pytest.approx(ref_top1)
    assert res.top5 == pytest.approx(ref_top5)
    assert 40.0 < res.top1 < 100.0  # informative features: well above chance (20 %)


def test_knn_rejects_bad_parameters():
    with pytest.raises(ValueError, match="k >= 1"):
        knn_evaluate(
            torch.randn(2, 3),
            torch.zeros(2, dtype=torch.long),
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            2,
            k=0,
        )
