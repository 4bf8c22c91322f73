"""FedAvg: the example-weighted mean of client weights.

McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data".
Streaming: memory stays at about one model whatever the number of clients.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


@dataclass(frozen=True)
class FedAvg:
    """Weighted averaging; no parameters."""

    name: str = "fedavg"

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """The new global model is the example-weighted mean of the accepted updates."""
        return Aggregate(updates.weighted_mean())

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
