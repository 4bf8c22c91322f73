"""Checks every client update passes before any strategy sees it.

Each check returns a reason (a sentence that reaches the training's status) or None. They are
pure functions over arrays; reading files is `updates.UpdateSet`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.contract.sitetask import EXAMPLES_LIMIT
from fedtrain.worker.strategies.arrays import CHUNK, FlatModel, tiled_runs
from fedtrain.worker.weights import Weights


def structural_problem(update: Weights, current: Weights, num_examples: object,
                       max_examples: int = EXAMPLES_LIMIT) -> str | None:
    """Names, shapes, dtypes and an example count in [1, ``max_examples``]; the first problem found, if any.

    The bound is what the coordinator declared for the client: a client that claims more would
    take more than its share of an example-weighted mean, so its update is refused.
    """
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        return f"num_examples must be a positive integer, got {repr(num_examples)[:40]}"
    if num_examples > max_examples:
        return (f"claims {num_examples} examples, more than the {max_examples} the coordinator allows this client "
                "(spec.clients.maxExamples, or clients.list[].maxExamples)")
    missing = sorted(set(current) - set(update))
    if missing:
        return f"missing tensors: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
    extra = sorted(set(update) - set(current))
    if extra:
        return f"unexpected tensors: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"
    for name, expected in current.items():
        array = update[name]
        if array.shape != expected.shape:
            return f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(expected.shape)}"
        if array.dtype != expected.dtype:
            return f"tensor {name} has dtype {array.dtype}, expected {expected.dtype}"
    return None


def non_finite_problem(name: str) -> str:
    """The reason given for a tensor whose values (or their squares) are not finite."""
    return f"tensor {name} contains NaN or Inf (or values too large to square)"


def non_finite_tensor(weights: Mapping[str, NDArray[Any]]) -> str | None:
    """The first floating tensor with NaN or Inf, if any: an aggregate is checked before it is written.

    Updates are checked one by one, but their mean, a server optimiser's step or the cast back to
    float32 can still overflow; a model with one Inf poisons every client of the next round.
    """
    for name, array in weights.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return name
    return None


def first_non_finite(values: NDArray[Any]) -> int:
    """Index of the first value that is not finite or whose square is not (0 if the fault is only in a sum)."""
    bad = np.flatnonzero(~np.isfinite(np.square(values)))
    return int(bad[0]) if bad.size else 0


def delta_norm(update: Weights, model: FlatModel) -> tuple[float, str | None]:
    """L2 norm of ``update - model`` over floating tensors, or the first tensor that is not finite.

    A run at a time where the update tiles it like the model (`FlatModel`); differences go
    through one small reused buffer: a fresh array per large tensor costs page faults that
    outweigh the arithmetic.
    """
    total = 0.0
    scratch: dict[np.dtype[Any], NDArray[Any]] = {}
    tiled = tiled_runs(update)
    for index, run in enumerate(model.runs):
        if not np.issubdtype(run.dtype, np.floating):
            continue
        buffer = scratch.setdefault(run.dtype, np.empty(CHUNK, run.dtype))
        base = model.arrays[index]
        for offset, source in model.pieces(update, index, tiled):
            for start in range(0, source.size, CHUNK):
                stop = min(source.size, start + CHUNK)
                diff = np.subtract(source[start:stop], base[offset + start:offset + stop], out=buffer[:stop - start])
                squared = float(np.dot(diff, diff))
                if not math.isfinite(squared):
                    return 0.0, non_finite_problem(model.name_at(index, offset + start + first_non_finite(diff)))
                total += squared
    return float(np.sqrt(total)), None


def norm_outliers(norms: Mapping[str, float], max_ratio: float, min_count: int = 3) -> dict[str, str]:
    """Clients whose update norm exceeds ``max_ratio`` times the median norm of the round.

    Needs ``min_count`` updates for the median to mean anything; ``max_ratio <= 0`` disables the check.
    """
    if max_ratio <= 0 or len(norms) < min_count:
        return {}
    median = float(np.median(list(norms.values())))
    limit = max_ratio * median
    return {
        client: f"update norm {norm:.4g} exceeds {max_ratio:g}× the round's median norm {median:.4g}"
        for client, norm in norms.items()
        if median > 0 and norm > limit
    }


@dataclass(frozen=True)
class WeightCap:
    """An update weighted less than its claimed example count, and why (a sentence for the round's result)."""

    claimed: int
    weight: int
    reason: str


def weight_caps(examples: Mapping[str, int], max_over_median: float, min_count: int = 3) -> dict[str, WeightCap]:
    """Clients whose count exceeds ``max_over_median`` times the round's median count, and the weight each gets.

    An absolute bound (maxExamples) leaves a site free to claim a thousand times what the honest
    sites hold; bounding each weight relative to the median keeps any one client's share of the
    mean near its peers' whatever it claims, while a large honest site still counts (capped, not
    refused). Needs ``min_count`` counts for the median to mean anything; the cap is a whole count.
    """
    if len(examples) < min_count:
        return {}
    median = float(np.median(list(examples.values())))
    cap = max(1, math.floor(max_over_median * median))
    return {client: WeightCap(count, cap, f"claims {count} examples; weighted as {cap} ({max_over_median:g} x "
                                           f"the round's median {median:g}, clients.maxWeightOverMedian)")
            for client, count in examples.items() if count > cap}
