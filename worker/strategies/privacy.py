"""Central differential privacy for a round: clip every update, average, add Gaussian noise, count the budget.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"): each
client's update ``Δ = w_client - w_global`` is clipped to L2 norm ``C`` (by the client before it leaves,
and again here, since the server cannot trust that), the clipped updates are averaged with equal
weights (example weights would let one client's influence exceed ``C / m``), and Gaussian noise of
standard deviation ``z · C / m`` is added to the mean, ``z`` being the noise multiplier and ``m`` the
number of clients that the round averaged. Only floating-point tensors are clipped and noised;
integer buffers (BatchNorm's counters) take the current model's value.

The budget is (ε, δ)-DP at the level of one client, for the sampling the engine really does: each
round it draws a fixed number ``m = clients.perRound`` of the ``n = clients.count`` clients, uniformly
and without replacement, independently of other rounds. The bound that holds for that sampling is
the one of Wang, Balle and Kasiviswanathan (2019, "Subsampled Rényi Differential Privacy and
Analytical Moments Accountant", Theorem 27), under the *replace-one* relation: two federations are
neighbours when they have the same ``n`` clients except that one client's data (so its update)
is replaced by anything else. (The Poisson-subsampled bound would be wrong here: it assumes each
client joins independently with probability ``q``, so that the number per round varies.)

What one client can change is the sum of the ``m`` clipped updates: replacing its update moves
that sum by at most ``2C`` in L2 norm (from ``+C`` to ``-C`` in the worst case), while the noise
on the sum has standard deviation ``z · C`` (``z · C / m`` on the mean is the same mechanism,
scaled). So the Gaussian mechanism's noise-to-sensitivity ratio is ``z · C / 2C = z / 2``, and
that is what the accountant is given. (dp-accounting's ``GaussianDpEvent`` documents its multiplier
against the per-record bound ``C``, but its Rényi accountant uses it as the ratio to the
sensitivity for every neighbouring relation; with replace-one that would understate the budget.)

The accountant is dp-accounting's `RdpAccountant` (Google's, maintained) with the replace-one
relation and one `SampledWithoutReplacementDpEvent` per round, converted to (ε, δ) at its default
Rényi orders. The bound depends on the sampling rate ``m / n`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from fedtrain.worker.strategies.updates import UpdateSet
from fedtrain.worker.weights import Weights

# Replacing one client's clipped update moves the sum by up to 2C: twice the clip norm.
REPLACE_ONE_SENSITIVITY = 2.0
MAX_CLIENTS = 1_000_000  # recovers perRound / count exactly from their ratio for any federation up to this size


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


def epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
            orders: Sequence[float] | None = None) -> float:
    """(ε, δ) after ``steps`` rounds that each average ``sampling_rate · n`` of ``n`` clients drawn without replacement.

    ``noise_multiplier`` is ``z``: the noise's standard deviation on the sum of clipped updates over
    the clip norm. Infinite without noise; 0 before the first round. ``orders`` are the Rényi orders
    to minimise over (dp-accounting's defaults when None).
    """
    if noise_multiplier <= 0 or steps <= 0:
        return math.inf if steps > 0 else 0.0
    # Imported here: dp-accounting pulls in scipy (seconds), which only private rounds need.
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    sample = Fraction(sampling_rate).limit_denominator(MAX_CLIENTS)  # perRound / count, reduced
    one_round = dp_event.SampledWithoutReplacementDpEvent(
        source_dataset_size=sample.denominator, sample_size=sample.numerator,
        event=dp_event.GaussianDpEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY))
    accountant = RdpAccountant(orders, NeighboringRelation.REPLACE_ONE)
    accountant.compose(one_round, steps)
    return float(accountant.get_epsilon(delta))
