"""FedAdam: server-side adaptive optimisation whose second moment is Adam's exponential moving average.

Reddi et al., 2021, "Adaptive Federated Optimization". The shared step lives in `fedopt`.
"""

from __future__ import annotations

from fedtrain.worker.strategies.fedopt import DEFAULT_ETA, ServerOptimizer


def make_fedadam(eta: float = DEFAULT_ETA, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> ServerOptimizer:
    """FedAdam with the given server learning rate, moment decays and adaptivity."""
    return ServerOptimizer("adam", "fedadam", eta, beta1, beta2, tau)
