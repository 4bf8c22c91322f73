"""Pure helpers over weight dicts shared by several strategies: no I/O, no logging."""

from __future__ import annotations

import numpy as np

from fedtrain.worker.weights import Weights

# Batch-norm statistics are averaged but never stepped by a server optimiser: an Adam step could
# push a running variance below zero.
STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str) -> bool:
    """True for batch-norm running statistics (buffers, not trainable parameters)."""
    return name.endswith(STATISTIC_SUFFIXES)


def cast_like(values: Weights, reference: Weights) -> Weights:
    """Cast float64 results back to each tensor's original dtype (rounding integer buffers).

    An array already in its dtype is returned as is, not copied.
    """
    out: Weights = {}
    for name, array in values.items():
        dtype = reference[name].dtype
        out[name] = np.rint(array).astype(dtype) if np.issubdtype(dtype, np.integer) \
            else array.astype(dtype, copy=False)
    return out


def weighted_mean(updates: list[Weights], counts: list[int]) -> Weights:
    """Example-weighted mean, tensor by tensor, in float64."""
    total = float(sum(counts))
    return {
        name: sum(np.asarray(u[name], dtype=np.float64) * (n / total) for u, n in zip(updates, counts, strict=True))
        for name in updates[0]
    }
