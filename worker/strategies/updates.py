"""A round's client updates: read from safetensors, validated, offered streaming or all at once.

FedAvg and the server-optimiser strategies only need the example-weighted mean, which is linear:
`UpdateSet.weighted_mean` reads each file once and keeps a running sum of ``n * (update - current)``,
so memory stays at three models (current, sum, the update being added) whatever the number of
clients. Each tensor's difference is
computed once and serves three ends: its squared norm (which also catches NaN and Inf), the norm
outlier test, and the running sum. Summing deltas rather than weights keeps float32 sums precise,
since deltas are small. Norm outliers are only known once every norm has been
seen; their (rare) files are read a second time and their contribution subtracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.worker.errors import BadDataError, RejectedUpdatesError
from fedtrain.worker.storage import Store
from fedtrain.worker.strategies.arrays import cast_like
from fedtrain.worker.strategies.protocol import Update
from fedtrain.worker.strategies.validation import delta_norm, non_finite_problem, norm_outliers, structural_problem
from fedtrain.worker.weights import Weights, read_weights


@dataclass(frozen=True)
class UpdateFile:
    """Where one client's update lies."""

    client: str
    store: Store
    key: str


@dataclass
class UpdateSet:
    """The updates of one round, with the bookkeeping of which were accepted and why others were not."""

    current: Weights
    files: Sequence[UpdateFile]
    max_norm_ratio: float = 10.0
    min_updates: int = 1
    rejected: dict[str, str] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    # The sha256 of the model the round started from; an update whose sidecar names another base was
    # trained from a stale or foreign model (a site that replayed an old round, or was sent a wrong one).
    base_sha256: str | None = None

    def _read(self, source: UpdateFile) -> Update | None:
        """The update, or None after noting why it is rejected.

        Only what the client is answerable for rejects its update: a file that is missing, corrupt,
        unparsable or of the wrong shape. A store that cannot be read right now
        (`TemporaryStorageError`) or refuses our credentials (`BadInputError`) says nothing about
        the client: those propagate, and the aggregation task fails (and is retried) instead.
        """
        try:
            weights, meta = read_weights(source.store, source.key)
        except BadDataError as error:
            self.rejected[source.client] = str(error)
            return None
        problem = structural_problem(weights, self.current, meta.get("num_examples"))
        if problem is None and self.base_sha256 is not None and meta.get("base_sha256") != self.base_sha256:
            named = str(meta.get("base_sha256") or "none")[:12]
            problem = (f"trained from another model (base sha256 {named}…), not this round's global model "
                       f"({self.base_sha256[:12]}…)")
        if problem is not None:
            self.rejected[source.client] = problem
            return None
        return Update(source.client, weights, int(meta["num_examples"]))

    def _settle(self, norms: dict[str, float]) -> dict[str, str]:
        outliers = norm_outliers(norms, self.max_norm_ratio)
        self.rejected.update(outliers)
        self.accepted = [client for client in norms if client not in outliers]
        if len(self.accepted) < max(1, self.min_updates):
            reasons = "; ".join(f"{c}: {r}" for c, r in sorted(self.rejected.items())) or "no update files"
            raise RejectedUpdatesError(
                f"{len(self.accepted)} valid update(s), {self.min_updates} needed ({reasons})"
            )
        return outliers

    def weighted_mean(self) -> Weights:
        """Example-weighted mean of the accepted updates, reading each file once (outliers twice)."""
        total = DeltaSum(self.current)
        norms: dict[str, float] = {}
        for source in self.files:
            update = self._read(source)
            if update is None:
                continue
            norm, problem = total.add(update.weights, update.num_examples)
            if problem is not None:
                self.rejected[update.client] = problem
                continue
            norms[update.client] = norm
            self.examples[update.client] = update.num_examples
            del update  # the next update is read into the memory this one frees
        outliers = self._settle(norms)
        for source in self.files:
            if source.client in outliers:
                update = self._read(source)
                assert update is not None  # it was valid a moment ago
                total.add(update.weights, -update.num_examples)
        return total.mean(float(sum(self.examples[c] for c in self.accepted)))

    def all(self) -> list[Update]:
        """Every accepted update, in memory at once (for coordinate-wise and distance-based strategies)."""
        updates: list[Update] = []
        norms: dict[str, float] = {}
        for update in (self._read(s) for s in self.files):
            if update is None:
                continue
            norm, problem = delta_norm(update.weights, self.current)
            if problem is not None:
                self.rejected[update.client] = problem
                continue
            updates.append(update)
            norms[update.client] = norm
            self.examples[update.client] = update.num_examples
        outliers = self._settle(norms)
        return [u for u in updates if u.client not in outliers]


CHUNK = 1 << 15  # elements per visit: small enough to stay in cache, large enough to amortise numpy's calls


class DeltaSum:
    """Running ``sum(n * (update - current))`` in preallocated buffers: no allocation per update.

    Fresh multi-megabyte arrays per tensor and update cost page faults that outweigh the
    arithmetic. Differences go through a small scratch buffer, a chunk at a time, so the sum is
    the only model-sized buffer this holds.
    """

    def __init__(self, current: Weights) -> None:
        self.current = current
        self.floating = {name: bool(np.issubdtype(a.dtype, np.floating)) for name, a in current.items()}
        self.sums = {name: np.zeros(a.shape, a.dtype if self.floating[name] else np.float64)
                     for name, a in current.items()}
        self.scratch: dict[np.dtype[Any], NDArray[Any]] = {}
        for total in self.sums.values():  # per dtype, no larger than a chunk or the largest tensor of that dtype
            size = min(CHUNK, max(total.size, len(self.scratch.get(total.dtype, ()))))
            self.scratch[total.dtype] = np.empty(size, total.dtype)

    def _accumulate(self, name: str, array: NDArray[Any], factor: int, limit: int | None = None
                    ) -> tuple[float, int]:
        """Add ``factor * (array - current)`` chunk by chunk; the squared norm and the elements added.

        Stops before a chunk that is not finite (its norm is then NaN or Inf). ``limit`` stops
        after that many elements (to undo part of a tensor).
        """
        total, source, base = self.sums[name].reshape(-1), array.reshape(-1), self.current[name].reshape(-1)
        scratch, floating = self.scratch[total.dtype], self.floating[name]
        squared, end = 0.0, total.size if limit is None else limit
        for start in range(0, end, CHUNK):
            stop = min(end, start + CHUNK)
            delta = scratch[:stop - start]
            np.subtract(source[start:stop], base[start:stop], out=delta)
            if floating:
                part = float(np.dot(delta, delta))
                if not np.isfinite(part):
                    return part, start
                squared += part
            np.multiply(delta, factor, out=delta)
            np.add(total[start:stop], delta, out=total[start:stop])
        return squared, end

    def add(self, weights: Weights, factor: int) -> tuple[float, str | None]:
        """Add ``factor * (weights - current)``; return the delta's norm, or why the update is unusable.

        Each chunk is differenced, measured, scaled and summed in one visit, while it is in cache.
        A chunk that is not finite rolls back what this update added (recomputing those
        differences), so the sums only ever hold whole, finite updates.
        """
        squared_norm = 0.0
        added: list[str] = []
        for name, array in weights.items():
            squared, reached = self._accumulate(name, array, factor)
            if not np.isfinite(squared):
                self._accumulate(name, array, -factor, reached)
                for done in added:
                    self._accumulate(done, weights[done], -factor)
                return 0.0, non_finite_problem(name)
            squared_norm += squared
            added.append(name)
        return float(np.sqrt(squared_norm)), None

    def mean(self, total_examples: float) -> Weights:
        """``current + sum / total_examples``, in each tensor's own dtype.

        Computed in the sums' own buffers (no second model): the sum is spent afterwards.
        """
        for name, total in self.sums.items():
            np.divide(total, total_examples, out=total)
            np.add(total, self.current[name], out=total)
        return cast_like(self.sums, self.current)
