"""The contract every aggregation strategy meets, and the values passed across it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fedtrain.worker.weights import Weights

if TYPE_CHECKING:
    from fedtrain.worker.strategies.updates import UpdateSet


@dataclass(frozen=True)
class Update:
    """One client's validated weights and how many examples produced them."""

    client: str
    weights: Weights
    num_examples: int


@dataclass
class Aggregate:
    """A strategy's output: the new global weights and the server state to keep for the next round."""

    weights: Weights
    state: Weights = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """Turns the current global weights and a round's client updates into new global weights.

    ``state`` is what the strategy returned last round (empty on the first): server optimiser
    moments, for instance. Strategies take updates from the `UpdateSet` in the form they need:
    a streaming weighted mean, or every update at once.
    """

    name: str

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Aggregate one round."""
        ...

    def client_options(self) -> dict[str, float]:
        """Extra settings clients train with (FedProx's ``mu``); empty for most strategies."""
        ...
