"""Pure helpers over weight dicts shared by several strategies: no I/O, no logging."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.worker.weights import FileWeights, Run, Weights

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


CHUNK = 1 << 15  # elements per visit: small enough to stay in cache, large enough to amortise numpy's calls


class FlatModel:
    """A model's tensors as few 1-D arrays as possible, so that arithmetic makes few numpy calls.

    Weights read from a file (`FileWeights`) come as runs of same-dtype tensors lying end to end:
    mobilenet_v3_small's 244 tensors are two runs. Other weights are one run per tensor. Another
    model (an update) is read the same way where it tiles a run identically, tensor by tensor
    where it does not, so odd files are slower but never wrong.
    """

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        if isinstance(weights, FileWeights) and weights.intact_runs():
            self.runs = weights.runs
            self.arrays = [weights.flat(run) for run in self.runs]
        else:
            self.runs = tuple(Run(a.dtype, (name,), (a.size,), -1) for name, a in weights.items())
            self.arrays = [weights[run.names[0]].reshape(-1) for run in self.runs]

    def pieces(self, other: Weights, index: int, tiled: frozenset[Run]) -> list[tuple[int, NDArray[Any]]]:
        """Run ``index`` of ``other`` as 1-D arrays with their element offsets in the run.

        One array where ``other`` tiles the run the same way (``tiled``: its `tiled_runs`), else
        one per tensor. Names, shapes and dtypes must have been checked against this model.
        """
        run = self.runs[index]
        if len(run.names) > 1 and run in tiled:
            assert isinstance(other, FileWeights)
            return [(0, other.flat(run))]
        return [(offset, other[name].reshape(-1)) for name, offset in zip(run.names, run.offsets, strict=True)]

    def name_at(self, index: int, offset: int) -> str:
        """The tensor at element ``offset`` of run ``index``."""
        run = self.runs[index]
        return run.names[bisect.bisect_right(run.offsets, offset) - 1]

    def unflatten(self, arrays: list[NDArray[Any]]) -> Weights:
        """Per-run 1-D arrays back to named tensors of this model's shapes (views, no copy)."""
        out: Weights = {}
        for run, array in zip(self.runs, arrays, strict=True):
            for name, offset, size in zip(run.names, run.offsets, run.sizes, strict=True):
                out[name] = array[offset:offset + size].reshape(self.weights[name].shape)
        return {name: out[name] for name in self.weights}


def tiled_runs(weights: Weights) -> frozenset[Run]:
    """The runs ``weights`` can be read in as one array each (none for weights not read from a file)."""
    return weights.intact_runs() if isinstance(weights, FileWeights) else frozenset()


BLOCK = 1 << 18  # values per block of coordinates across all updates (1 MiB of float32): reduced while in cache


def segments(model: FlatModel, updates: Sequence[Weights], index: int) -> list[tuple[int, list[NDArray[Any]]]]:
    """Run ``index`` of every update as (element offset, one 1-D array per update).

    The whole run at once where every update tiles it like ``model``, else tensor by tensor.
    """
    pieces = [model.pieces(update, index, tiled_runs(update)) for update in updates]
    if all(len(p) == 1 for p in pieces):
        return [(0, [p[0][1] for p in pieces])]
    run = model.runs[index]
    return [(offset, [update[name].reshape(-1) for update in updates])
            for name, offset in zip(run.names, run.offsets, strict=True)]


def coordinate_wise(current: Weights, updates: Sequence[Weights],
                    reduce: Callable[[NDArray[Any]], NDArray[Any]]) -> Weights:
    """``reduce`` over every coordinate's values across ``updates``, a block of coordinates at a time.

    ``reduce`` gets a ``(coordinates, updates)`` block, which it may reorder in place, and
    returns one value per coordinate. Stacking whole tensors instead holds a copy of the largest
    tensor per update (and `np.median` copies that again); a block is about 1 MiB, and each
    coordinate's values lie side by side for the selection. Float results keep the tensor's
    dtype, others are float64 (rounded back by `cast_like`).
    """
    model = FlatModel(current)
    columns = max(1, BLOCK // max(1, len(updates)))
    results: list[NDArray[Any]] = []
    for index, run in enumerate(model.runs):
        out = np.empty(run.size, run.dtype if np.issubdtype(run.dtype, np.floating) else np.float64)
        block = np.empty((min(columns, run.size), len(updates)), run.dtype)
        for offset, arrays in segments(model, updates, index):
            for start in range(0, arrays[0].size, columns):
                stop = min(arrays[0].size, start + columns)
                view = block[:stop - start]
                for column, array in enumerate(arrays):
                    view[:, column] = array[start:stop]
                out[offset + start:offset + stop] = reduce(view)
        results.append(out)
    return model.unflatten(results)


def gram_matrix(current: Weights, updates: Sequence[Weights]) -> NDArray[np.float64]:
    """``(n, n)`` inner products of the updates over all floating tensors, in float64, a block at a time.

    One float64 block of coordinates (about 2 MiB) instead of a float64 copy of each tensor of
    every update.
    """
    model = FlatModel(current)
    count = len(updates)
    gram = np.zeros((count, count))
    columns = max(1, BLOCK // max(1, count))
    for index, run in enumerate(model.runs):
        if not np.issubdtype(run.dtype, np.floating):
            continue
        rows = np.empty((count, min(columns, run.size)))
        for _, arrays in segments(model, updates, index):
            for start in range(0, arrays[0].size, columns):
                stop = min(arrays[0].size, start + columns)
                view = rows[:, :stop - start]
                for row, array in enumerate(arrays):
                    view[row] = array[start:stop]
                gram += view @ view.T
    return gram
