"""Trimmed mean: per coordinate, drop the ``beta`` share of largest and smallest values, average the rest.

Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtrain.worker.errors import BadInputError, RejectedUpdatesError
from fedtrain.worker.strategies.arrays import cast_like
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


def trimmed_mean(stacked: np.ndarray, trim: int) -> np.ndarray:
    """Mean over axis 0 after dropping the ``trim`` smallest and ``trim`` largest values per coordinate.

    A partition around the two cut points finds the kept values without sorting them all; the
    mean accumulates in float64 without a float64 copy of the stack.
    """
    count = stacked.shape[0]
    if count - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} from each side of {count} values")
    kept = np.partition(stacked, [trim, count - trim - 1], axis=0)[trim:count - trim] if trim else stacked
    return kept.mean(axis=0, dtype=np.float64)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean with trim share ``beta`` per side."""

    beta: float = 0.1
    name: str = "trimmedmean"

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise BadInputError(f"strategy.beta must be in [0, 0.5), got {self.beta}")

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Trimmed mean of every coordinate over the accepted updates."""
        accepted = updates.all()
        trim = math.floor(self.beta * len(accepted))
        try:
            merged = {name: trimmed_mean(np.stack([u.weights[name] for u in accepted]), trim) for name in current}
        except ValueError as error:
            raise RejectedUpdatesError(f"trimmed mean: {error}") from error
        return Aggregate(cast_like(merged, current), details={"trimmed_per_side": trim})

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
