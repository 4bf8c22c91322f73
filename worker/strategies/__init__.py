"""Aggregation strategies, one per module, registered by name.

`make_strategy` builds one from a name and a parameter mapping (from a spec or ``--param k=v``),
converting and checking each parameter and naming it in any error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.strategies.fedadagrad import make_fedadagrad
from fedtrain.worker.strategies.fedadam import make_fedadam
from fedtrain.worker.strategies.fedavg import FedAvg
from fedtrain.worker.strategies.fedmedian import FedMedian
from fedtrain.worker.strategies.fedprox import FedProx
from fedtrain.worker.strategies.fedyogi import make_fedyogi
from fedtrain.worker.strategies.krum import Krum
from fedtrain.worker.strategies.protocol import Aggregate, Strategy, Update
from fedtrain.worker.strategies.trimmedmean import TrimmedMean
from fedtrain.worker.strategies.updates import UpdateFile, UpdateSet

__all__ = ["STRATEGIES", "Aggregate", "Strategy", "Update", "UpdateFile", "UpdateSet", "make_strategy"]

_OPTIMISER = {"eta": float, "beta1": float, "beta2": float, "tau": float}


@dataclass(frozen=True)
class Registration:
    """How to build a strategy and which parameters (with their types) it takes."""

    factory: Callable[..., Strategy]
    parameters: Mapping[str, type]
    robust: bool = False  # tolerates poisoned updates by design


STRATEGIES: dict[str, Registration] = {
    "fedavg": Registration(FedAvg, {}),
    "fedprox": Registration(FedProx, {"mu": float}),
    "fedadam": Registration(make_fedadam, _OPTIMISER),
    "fedyogi": Registration(make_fedyogi, _OPTIMISER),
    "fedadagrad": Registration(make_fedadagrad, {k: v for k, v in _OPTIMISER.items() if k != "beta2"}),
    "fedmedian": Registration(FedMedian, {}, robust=True),
    "trimmedmean": Registration(TrimmedMean, {"beta": float}, robust=True),
    "krum": Registration(lambda f=1: Krum(f=f, m=1), {"f": int}, robust=True),
    "multikrum": Registration(lambda f=1, m=3: Krum(f=f, m=m, name="multikrum"), {"f": int, "m": int}, robust=True),
}


def make_strategy(name: str, parameters: Mapping[str, Any] | None = None) -> Strategy:
    """Build a registered strategy; unknown names or parameters and bad values name the field."""
    registration = STRATEGIES.get(name)
    if registration is None:
        raise BadInputError(f"strategy.name {name!r} is unknown; use one of {', '.join(STRATEGIES)}")
    converted: dict[str, Any] = {}
    for key, value in (parameters or {}).items():
        kind = registration.parameters.get(key)
        if kind is None:
            allowed = ", ".join(registration.parameters) or "none"
            raise BadInputError(f"strategy.{key} is not a parameter of {name} (allowed: {allowed})")
        try:
            converted[key] = kind(value)
        except (TypeError, ValueError) as error:
            raise BadInputError(f"strategy.{key} must be {kind.__name__}, got {value!r}") from error
        if kind is int and float(value) != converted[key]:
            raise BadInputError(f"strategy.{key} must be a whole number, got {value!r}")
    return registration.factory(**converted)
