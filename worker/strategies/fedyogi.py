"""FedYogi: server-side adaptive optimisation with Yogi's additive, sign-controlled second moment.

Zaheer et al., 2018: steadier than Adam when the moments are noisy.

Reddi et al., 2021, "Adaptive Federated Optimization". The shared step lives in `fedopt`.
"""

from __future__ import annotations

from fedtrain.worker.strategies.fedopt import DEFAULT_ETA, ServerOptimizer


def make_fedyogi(eta: float = DEFAULT_ETA, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> ServerOptimizer:
    """FedYogi with the given server learning rate, moment decays and adaptivity."""
    return ServerOptimizer("yogi", "fedyogi", eta, beta1, beta2, tau)
