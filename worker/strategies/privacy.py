"""Central differential privacy for a round: clip every update, average, add Gaussian noise, count the budget.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"): each
client's update ``Δ = w_client - w_global`` is clipped to L2 norm ``C`` (by the client before it leaves,
and again here, since the server cannot trust that), the clipped updates are averaged with equal
weights (example weights would let one client's influence exceed ``C / m``), and Gaussian noise of
standard deviation ``z · C / m`` is added to the mean, ``z`` being the noise multiplier and ``m`` the
number of clients that the round averaged. Only floating-point tensors are clipped and noised;
integer buffers (BatchNorm's counters) take the current model's value.

The budget is (ε, δ)-DP at the level of one client's participation, from the Rényi-DP accountant
of the subsampled Gaussian mechanism (Mironov, Talwar and Zhang, 2019) at integer orders, with
sampling rate ``q = clients.perRound / clients.count`` and one step per round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights

ORDERS = tuple(range(2, 257))


def clip(delta: Weights, bound: float) -> tuple[Weights, float]:
    """``delta`` scaled to L2 norm at most ``bound`` over all float tensors; also its norm before clipping."""
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values() if v.dtype.kind == "f"))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in delta.items()}, norm


def private_mean(current: Weights, updates: UpdateSet, bound: float, noise_multiplier: float,
                 rng: np.random.Generator) -> tuple[Weights, dict[str, Any]]:
    """The new global model: current + mean of clipped deltas + N(0, (z·C/m)²); and what was done."""
    accepted = updates.all()
    count = len(accepted)
    total = {k: np.zeros(v.shape, np.float64) for k, v in current.items() if v.dtype.kind == "f"}
    norms: dict[str, float] = {}
    for update in accepted:
        delta = {k: update.weights[k].astype(np.float64) - current[k] for k in total}
        clipped, norms[update.client] = clip(delta, bound)
        for key in total:
            total[key] += clipped[key]
    std = noise_multiplier * bound / count
    result: Weights = {}
    for key, value in current.items():
        if key in total:
            noisy = total[key] / count + rng.normal(0.0, std, value.shape)
            result[key] = (value + noisy).astype(value.dtype)
        else:
            result[key] = value
    details = {"dp_clipped": sorted(c for c, n in norms.items() if n > bound), "dp_noise_std": std,
               "dp_update_norms": {c: round(n, 6) for c, n in norms.items()}}
    return result, details


def rdp_subsampled_gaussian(sampling_rate: float, noise_multiplier: float, order: int) -> float:
    """Rényi DP of one step of the Poisson-subsampled Gaussian mechanism at an integer order ≥ 2.

    log(Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²))) / (α-1), summed in log space.
    """
    q, sigma = sampling_rate, noise_multiplier
    if q >= 1.0:
        return order / (2 * sigma**2)
    terms = [math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
             + (order - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0) + (k * k - k) / (2 * sigma**2)
             for k in range(order + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (order - 1)


def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """(ε, δ) after ``steps`` rounds: min over orders of T·RDP(α) + log(1/δ)/(α-1) (inf without noise)."""
    if noise_multiplier <= 0 or steps <= 0:
        return math.inf if steps > 0 else 0.0
    return min(steps * rdp_subsampled_gaussian(sampling_rate, noise_multiplier, a) + math.log(1 / delta) / (a - 1)
               for a in ORDERS)
