"""FedMedian: the coordinate-wise median of client weights.

Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
Any minority of clients, however wrong their values, cannot move a coordinate past the honest ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtrain.worker.strategies.arrays import cast_like, coordinate_wise
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


def coordinate_median(block: np.ndarray) -> np.ndarray:
    """Median of each row of a ``(coordinates, clients)`` block, reordering the block in place.

    The same values as `np.median` (the mean of the two middle ones for an even count, by
    `np.mean`, in the block's own dtype for floats): a median picks values, so float64 would add
    nothing but a copy at twice the size.
    """
    count = block.shape[1]
    middle = count // 2
    first = middle - 1 if count % 2 == 0 else middle
    block.partition(sorted({first, middle}), axis=1)
    return np.mean(block[:, first:middle + 1], axis=1)


@dataclass(frozen=True)
class FedMedian:
    """Coordinate-wise median; no parameters."""

    name: str = "fedmedian"

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Median of every coordinate over the accepted updates."""
        accepted = updates.all()
        merged = coordinate_wise(current, [u.weights for u in accepted], coordinate_median)
        return Aggregate(cast_like(merged, current))

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
