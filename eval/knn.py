"""Weighted k-nearest-neighbour classification (``unmix knn``): see :mod:`unmix.training.knn`.

One implementation serves ``unmix knn`` and the kNN monitor of pretraining; it lives in
``unmix.training`` because training imports nothing from ``unmix.eval``.
"""

from unmix.training.knn import KnnResult, knn_evaluate, knn_predict, knn_scores

__all__ = ["KnnResult", "knn_evaluate", "knn_predict", "knn_scores"]
