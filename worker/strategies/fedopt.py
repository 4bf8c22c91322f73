"""Server-side adaptive optimisers shared by FedAdam, FedYogi and FedAdagrad.

Reddi et al., 2021, "Adaptive Federated Optimization" (Algorithm 2). The round's pseudo-gradient
is ``Δ = mean(client weights) - current``; the server keeps first and second moments ``m`` and
``v`` between rounds (saved as the strategy state) and steps ``x += eta * m / (sqrt(v) + tau)``.
Only trainable parameters are stepped; batch-norm statistics take the plain weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.strategies.arrays import cast_like, is_statistic
from fedtrain.worker.strategies.protocol import Aggregate
from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights

SECOND_MOMENTS = ("adam", "yogi", "adagrad")


def second_moment(kind: str, v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """The three update rules for ``v`` in Reddi et al., Algorithm 2."""
    squared = delta * delta
    if kind == "adagrad":
        return v + squared
    if kind == "adam":
        return beta2 * v + (1 - beta2) * squared
    if kind == "yogi":
        return v - (1 - beta2) * squared * np.sign(v - squared)
    raise ValueError(f"unknown second moment {kind!r}; use one of {SECOND_MOMENTS}")


def server_step(
    kind: str, current: np.ndarray, mean: np.ndarray, m: np.ndarray | None, v: np.ndarray | None,
    eta: float, beta1: float, beta2: float, tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One server optimiser step on one tensor; returns (new weights, new m, new v)."""
    delta = mean - current
    m_prev = np.zeros_like(delta) if m is None else m
    v_prev = np.full_like(delta, tau * tau) if v is None else v
    m_new = beta1 * m_prev + (1 - beta1) * delta
    v_new = second_moment(kind, v_prev, delta, beta2)
    return current + eta * m_new / (np.sqrt(v_new) + tau), m_new, v_new


# The server step. At 0.01 (the earlier default) FedAdam and FedYogi moved too little per round and reached
# 0.46 of central training on synthetic GTSRB under label skew; at 0.1 they reached 0.86, above FedAvg
# (docs/benchmarks.md, docs/strategies.md). Still a setting to tune per task.
DEFAULT_ETA = 0.1


@dataclass(frozen=True)
class ServerOptimizer:
    """FedAdam, FedYogi or FedAdagrad, by ``kind``."""

    kind: str
    name: str
    eta: float = DEFAULT_ETA
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise BadInputError(f"strategy.eta must be > 0, got {self.eta}")
        for field_name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                raise BadInputError(f"strategy.{field_name} must be in [0, 1), got {value}")
        if not self.tau > 0:
            raise BadInputError(f"strategy.tau must be > 0, got {self.tau}")

    def aggregate(self, current: Weights, updates: UpdateSet, state: Weights) -> Aggregate:
        """Weighted mean of the clients, then one optimiser step from the current weights towards it."""
        mean = updates.weighted_mean()
        new_weights: Weights = {}
        new_state: Weights = {}
        for name, target in mean.items():
            if is_statistic(name) or not np.issubdtype(target.dtype, np.floating):
                new_weights[name] = target
                continue
            stepped, m, v = server_step(
                self.kind, current[name].astype(np.float64), target.astype(np.float64),
                state.get(f"m/{name}"), state.get(f"v/{name}"), self.eta, self.beta1, self.beta2, self.tau,
            )
            new_weights[name] = stepped
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        return Aggregate(cast_like(new_weights, current), new_state)

    def client_options(self) -> dict[str, float]:
        """Clients train plainly."""
        return {}
