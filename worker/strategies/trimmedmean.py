"""Trimmed mean: per coordinate, drop the ``beta`` share of largest and smallest values, average the rest.

Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtrain.contract.errors import BadInputError, RejectedUpdatesError
from fedtrain.worker.strategies.arrays import cast_like, coordinate_wise
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


def trimmed_mean(block: np.ndarray, trim: int) -> np.ndarray:
    """Mean of each row of a ``(coordinates, clients)`` block without its ``trim`` smallest and largest values.

    A partition (in place) around the two cut points finds the kept values without sorting them
    all; the mean accumulates in float64 without a float64 copy of the block.
    """
    count = block.shape[1]
    if count - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} from each side of {count} values")
    if trim:
        block.partition([trim, count - trim - 1], axis=1)
    return block[:, trim:count - trim].mean(axis=1, dtype=np.float64)


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
            merged = coordinate_wise(current, [u.weights for u in accepted], lambda block: trimmed_mean(block, trim))
        except ValueError as error:
            raise RejectedUpdatesError(f"trimmed mean: {error}") from error
        return Aggregate(cast_like(merged, current), details={"trimmed_per_side": trim})

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
