"""The robust strategies (median, trimmed mean, Krum) against the bare NumPy reduction over the same files.

Usage: python bench/robust_stream.py [--updates 100] [--architecture mobilenet_v3_small] [--repeats 3]
Each strategy runs its whole path (`UpdateSet.all`: read, checksum, validate, norms; then the
reduction). Its baseline reads the same files with `read_weights` and applies the reduction in
plain NumPy, with no validation: `np.median` over the stacked tensors; `np.partition` then a mean
of the middle values for the trimmed mean; per-tensor Gram matrices, scores and a mean of the
chosen updates for Krum. Coordinate-wise reductions need every update at once, so memory grows
with the number of updates for both: printed, not a goal.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.weights import Weights, read_weights

from fedavg_stream import load, peak_mib_of, read_current, seconds_of, write_updates  # isort: skip (a sibling script: run from bench/ or the root)


def read_all(files: list[UpdateFile]) -> list[Weights]:
    """Every update's arrays, as the baseline reads them."""
    return [read_weights(f.store, f.key)[0] for f in files]


def bare_median(current: Weights, files: list[UpdateFile], **_: Any) -> Weights:
    updates = read_all(files)
    return {name: np.median(np.stack([u[name] for u in updates]), axis=0) for name in current}


def bare_trimmed_mean(current: Weights, files: list[UpdateFile], beta: float = 0.1, **_: Any) -> Weights:
    updates = read_all(files)
    n = len(updates)
    trim = math.floor(beta * n)
    merged = {}
    for name in current:
        stacked = np.stack([u[name] for u in updates])
        middle = np.partition(stacked, [trim, n - trim - 1], axis=0)[trim:n - trim] if trim else stacked
        merged[name] = middle.mean(axis=0)
    return merged


def bare_krum(current: Weights, files: list[UpdateFile], f: int = 10, **_: Any) -> Weights:
    updates = read_all(files)
    n = len(updates)
    gram = np.zeros((n, n))
    for name, array in current.items():
        if array.dtype.kind == "f":
            rows = np.stack([u[name].ravel() for u in updates]).astype(np.float64)
            gram += rows @ rows.T
    squared = np.diag(gram)
    distances = squared[:, None] + squared[None, :] - 2 * gram + np.diag(np.full(n, np.inf))
    best = int(np.argmin(np.sort(distances, axis=1)[:, :n - f - 2].sum(axis=1)))
    return dict(updates[best])


STRATEGIES: dict[str, tuple[dict[str, Any], Callable[..., Weights]]] = {
    "fedmedian": ({}, bare_median),
    "trimmedmean": ({"beta": 0.1}, bare_trimmed_mean),
    "krum": ({"f": 10}, bare_krum),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--architecture", default="mobilenet_v3_small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fedtrain-bench-robust"))
    parser.add_argument("--only", nargs="*", choices=sorted(STRATEGIES), default=sorted(STRATEGIES))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    current = read_current(args.dir, args.architecture)
    model_mib = sum(v.nbytes for v in current.values()) / 2**20
    files = write_updates(args.dir, current, args.updates)
    read_all(files)  # warm the page cache
    print(f"{args.updates} updates of {args.architecture} ({model_mib:.1f} MiB each), median of {args.repeats} "
          "runs each, files in the page cache")
    for name, (parameters, bare) in ((n, STRATEGIES[n]) for n in args.only):
        def strategy(name: str = name, parameters: dict[str, Any] = parameters) -> None:
            updates = UpdateSet(current, files, max_norm_ratio=10.0)
            make_strategy(name, parameters).aggregate(current, updates, {})
            assert len(updates.accepted) == len(files), updates.rejected

        def baseline(bare: Callable[..., Weights] = bare, parameters: dict[str, Any] = parameters) -> None:
            bare(current, files, **parameters)

        print(f"{name}: {load()}")
        (ours, ours_cpu, _), (theirs, theirs_cpu, _) = seconds_of([strategy, baseline], args.repeats)
        ours_mib, theirs_mib = peak_mib_of(strategy), peak_mib_of(baseline)
        print(f"{name:12s} strategy {ours:6.2f} s (CPU {ours_cpu:6.2f}, {ours_mib / model_mib:5.1f} models)   "
              f"bare NumPy {theirs:6.2f} s (CPU {theirs_cpu:6.2f}, {theirs_mib / model_mib:5.1f} models)   "
              f"ratio {ours / theirs:.2f} wall, {ours_cpu / theirs_cpu:.2f} CPU")
    print(f"after: {load()}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
