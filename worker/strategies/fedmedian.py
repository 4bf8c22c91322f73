"""FedMedian: the coordinate-wise median of client weights.

Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
Any minority of clients, however wrong their values, cannot move a coordinate past the honest ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtrain.worker.strategies.arrays import cast_like
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Median over axis 0 of an ``(n_clients, ...)`` array, in its own dtype.

    A median picks values (or the midpoint of two), so float64 adds nothing but a copy of every
    update at twice the size.
    """
    return np.median(stacked, axis=0)


@dataclass(frozen=True)
class FedMedian:
    """Coordinate-wise median; no parameters."""

    name: str = "fedmedian"

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Median of every coordinate over the accepted updates."""
        accepted = updates.all()
        merged = {name: coordinate_median(np.stack([u.weights[name] for u in accepted])) for name in current}
        return Aggregate(cast_like(merged, current))

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
