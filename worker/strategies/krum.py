"""Krum and Multi-Krum: keep the update(s) closest to their neighbours.

Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent".
Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest others, where
``f`` is the number of Byzantine clients tolerated (needs ``n > 2f + 2``). Krum keeps the best one;
Multi-Krum (``m > 1``) averages the ``m`` best, weighted by examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtrain.contract.errors import BadInputError, RejectedUpdatesError
from fedtrain.worker.strategies.arrays import cast_like, gram_matrix, weighted_mean
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


def pairwise_squared_distances(current: Weights, updates: list[Weights]) -> np.ndarray:
    """``(n, n)`` squared L2 distances over all floating tensors, through the updates' Gram matrix."""
    gram = gram_matrix(current, updates)
    squared_norms = np.diag(gram)
    return np.maximum(squared_norms[:, None] + squared_norms[None, :] - 2 * gram, 0.0)


def krum_scores(distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Sum of squared distances from each update to its ``n - f - 2`` nearest neighbours."""
    n = distances.shape[0]
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs n > 2f + 2 updates: n={n}, f={byzantine}")
    masked = distances + np.diag(np.full(n, np.inf))
    return np.sort(masked, axis=1)[:, :neighbours].sum(axis=1)


def krum_select(distances: np.ndarray, byzantine: int, keep: int) -> list[int]:
    """Indices of the ``keep`` lowest-scored updates, best first."""
    return [int(i) for i in np.argsort(krum_scores(distances, byzantine), kind="stable")[:keep]]


@dataclass(frozen=True)
class Krum:
    """Krum (``m=1``) or Multi-Krum (``m>1``) tolerating ``f`` Byzantine clients."""

    f: int = 1
    m: int = 1
    name: str = "krum"

    def __post_init__(self) -> None:
        if self.f < 0:
            raise BadInputError(f"strategy.f must be >= 0, got {self.f}")
        if self.m < 1:
            raise BadInputError(f"strategy.m must be >= 1, got {self.m}")

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Select by Krum score, then average the selected updates."""
        accepted = updates.all()
        try:
            chosen = krum_select(pairwise_squared_distances(current, [u.weights for u in accepted]), self.f,
                                 min(self.m, len(accepted)))
        except ValueError as error:
            raise RejectedUpdatesError(f"krum: {error}") from error
        picked = [accepted[i] for i in chosen]
        merged = weighted_mean([u.weights for u in picked], [u.num_examples for u in picked])
        return Aggregate(cast_like(merged, current), details={"selected": [u.client for u in picked]})

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
