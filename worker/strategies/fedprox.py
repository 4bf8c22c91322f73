"""FedProx: FedAvg on the server, a proximal term ``mu/2 * ||w - w_global||^2`` in client training.

Li et al., 2020, "Federated Optimization in Heterogeneous Networks". The server side is FedAvg;
what differs is the ``mu`` handed to clients, which keeps their local models near the global one
when their data distributions differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.sitetask import FEDPROX_MU
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights


@dataclass(frozen=True)
class FedProx:
    """Weighted averaging with a proximal term of strength ``mu`` for the clients."""

    mu: float = FEDPROX_MU
    name: str = "fedprox"

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise BadInputError(f"strategy.mu must be >= 0, got {self.mu}")

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Same as FedAvg."""
        return Aggregate(updates.weighted_mean())

    def client_options(self) -> dict[str, float]:
        """Clients add the proximal term."""
        return {"mu": self.mu}
