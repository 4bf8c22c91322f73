"""A round's client updates: read from safetensors, validated, offered streaming or all at once.

FedAvg and the server-optimiser strategies only need the example-weighted mean, which is linear:
`UpdateSet.weighted_mean` reads each file once and keeps a running sum of ``n * (update - current)``,
so memory stays at three models (current, sum, the update being added) whatever the number of
clients. Each difference is computed once and serves three ends: its squared norm (which also
catches NaN and Inf), the norm outlier test, and the running sum. Summing deltas rather than
weights keeps float32 sums precise, since deltas are small. Norm outliers, and updates that claim
more than ``max_weight_over_median`` times the round's median example count, are only known once
every file has been seen; their (rare) files are read a second time and their contribution
subtracted (an outlier's whole, a capped update's count beyond its cap). A file's sha256 is
computed on a second thread while the file is parsed, checked and added, since hashing costs about
as much as all the rest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.contract.errors import BadDataError, RejectedUpdatesError, TemporaryStorageError
from fedtrain.contract.sitetask import DEFAULT_MAX_WEIGHT_OVER_MEDIAN, UPDATE_HEADER_LIMIT, ExampleBounds
from fedtrain.contract.storage import Store
from fedtrain.worker.strategies.arrays import CHUNK, FlatModel, cast_like, tiled_runs
from fedtrain.worker.strategies.protocol import Update
from fedtrain.worker.strategies.validation import (
    delta_norm,
    first_non_finite,
    non_finite_problem,
    norm_outliers,
    structural_problem,
    weight_caps,
)
from fedtrain.worker.weights import Weights, checksum_problem, parse_weights, read_unchecked


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
    bounds: ExampleBounds = field(default_factory=ExampleBounds)  # the most examples each client may claim
    max_weight_over_median: float = DEFAULT_MAX_WEIGHT_OVER_MEDIAN  # clients.maxWeightOverMedian
    counted: dict[str, int] = field(default_factory=dict)  # each accepted update's weight: its claim or its cap
    capped: dict[str, str] = field(default_factory=dict)  # accepted updates weighted below their claim, and why

    @property
    def size_limit(self) -> int:
        """The most bytes an update file may hold: the model's tensors and a header; larger is refused unread."""
        return sum(int(array.nbytes) for array in self.current.values()) + UPDATE_HEADER_LIMIT

    def _read(self, source: UpdateFile, hasher: Executor) -> tuple[Update, Future[str], dict[str, Any]] | None:
        """The update, parsed and checked while its sha256 is computed on ``hasher``; None after noting why not.

        The caller may use the arrays before the checksum is known and must then check `_checksum_problem`.
        The checksum catches a file truncated or swapped after its sidecar was written; parsing and
        the structural checks treat every file as hostile anyway, so they need not wait for it, and
        the hash (which releases the GIL) runs beside the arithmetic instead of before it.

        Only what the client is answerable for rejects its update: a file that is missing, corrupt,
        unparsable or of the wrong shape. A store that cannot be read right now
        (`TemporaryStorageError`) or refuses our credentials (`BadInputError`) says nothing about
        the client: those propagate, and the aggregation task fails (and is retried) instead.
        """
        try:
            data, meta = read_unchecked(source.store, source.key, self.size_limit)
        except BadDataError as error:
            self.rejected[source.client] = str(error)
            return None
        digest = hasher.submit(sha256_of, data)
        try:
            weights = parse_weights(source.store, source.key, data)
            problem = structural_problem(weights, self.current, meta.get("num_examples"),
                                         self.bounds.of(source.client))
        except BadDataError as error:
            problem = str(error)
        if problem is None and self.base_sha256 is not None and meta.get("base_sha256") != self.base_sha256:
            named = str(meta.get("base_sha256") or "none")[:12]
            problem = (f"trained from another model (base sha256 {named}…), not this round's global model "
                       f"({self.base_sha256[:12]}…)")
        if problem is not None:  # a corrupt file is reported as corrupt, whatever else it shows
            self.rejected[source.client] = self._checksum_problem(source, meta, digest) or problem
            return None
        return Update(source.client, weights, int(meta["num_examples"])), digest, meta

    def _checksum_problem(self, source: UpdateFile, meta: dict[str, Any], digest: Future[str]) -> str | None:
        """Why the file does not match its sidecar's sha256, or None; waits for the hash."""
        return checksum_problem(source.store, source.key, meta, digest.result())

    def _settle(self, norms: dict[str, float]) -> dict[str, str]:
        outliers = norm_outliers(norms, self.max_norm_ratio)
        self.rejected.update(outliers)
        self.accepted = [client for client in norms if client not in outliers]
        if len(self.accepted) < max(1, self.min_updates):
            reasons = "; ".join(f"{c}: {r}" for c, r in sorted(self.rejected.items())) or "no update files"
            raise RejectedUpdatesError(
                f"{len(self.accepted)} valid update(s), {self.min_updates} needed ({reasons})"
            )
        caps = weight_caps({c: self.examples[c] for c in self.accepted}, self.max_weight_over_median)
        self.capped = {client: cap.reason for client, cap in caps.items()}
        self.counted = {c: caps[c].weight if c in caps else self.examples[c] for c in self.accepted}
        return outliers

    def _excess(self, client: str) -> int:
        """The count added for ``client`` beyond the weight it counts with: all of it for a norm outlier."""
        return self.examples.get(client, 0) - self.counted.get(client, 0)

    def weighted_mean(self) -> Weights:
        """Example-weighted mean of the accepted updates, reading each file once (outliers and capped ones twice)."""
        total = DeltaSum(self.current)
        norms: dict[str, float] = {}
        digests: dict[str, str] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
            for source in self.files:
                added = self._add(total, source, hasher)
                if added is not None:
                    norms[source.client], digests[source.client] = added
            self._settle(norms)
            for source in (s for s in self.files if self._excess(s.client) > 0):
                self._subtract(total, source, digests[source.client], hasher, self._excess(source.client))
        return total.mean(float(sum(self.counted.values())))

    def _add(self, total: DeltaSum, source: UpdateFile, hasher: Executor) -> tuple[float, str] | None:
        """Add one update to ``total``: its norm and sha256, or None after noting why it is rejected.

        The update is added while its checksum is computed, and subtracted again if the file turns
        out not to match its sidecar: the sums' rounding is then all it leaves behind. Its memory
        is freed on return, before the next file is read.
        """
        read = self._read(source, hasher)
        if read is None:
            return None
        update, digest, meta = read
        norm, problem = total.add(update.weights, update.num_examples)
        corrupt = self._checksum_problem(source, meta, digest)
        if corrupt is not None and problem is None:
            total.add(update.weights, -update.num_examples)
        if corrupt is not None or problem is not None:
            self.rejected[source.client] = corrupt or str(problem)
            return None
        self.examples[source.client] = update.num_examples
        return norm, digest.result()

    def _subtract(self, total: DeltaSum, source: UpdateFile, digest: str, hasher: Executor, count: int) -> None:
        """Take ``count`` times an update back out of the sum: the very bytes that went in.

        An outlier's whole count goes, a capped update's count beyond its cap.

        A file replaced in between (its owner can write it) would subtract something else than it
        added, so that is refused: the task fails as temporary and a new attempt reads a stable set.
        """
        again = self._read(source, hasher)
        if again is None or again[1].result() != digest:
            raise TemporaryStorageError(f"{source.store.describe(source.key)}: changed while the round was "
                                        "aggregated; aggregate the round again")
        total.add(again[0].weights, -count)

    def all(self) -> list[Update]:
        """Every accepted update, in memory at once (for coordinate-wise and distance-based strategies).

        Each carries the count it is weighted by (`counted`): its claim, or its cap.
        """
        updates: list[Update] = []
        norms: dict[str, float] = {}
        model = FlatModel(self.current)
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
            for source in self.files:
                read = self._read(source, hasher)
                if read is None:
                    continue
                update, digest, meta = read
                norm, problem = delta_norm(update.weights, model)
                problem = self._checksum_problem(source, meta, digest) or problem
                if problem is not None:
                    self.rejected[update.client] = problem
                    continue
                updates.append(update)
                norms[update.client] = norm
                self.examples[update.client] = update.num_examples
        self._settle(norms)
        return [replace(u, num_examples=self.counted[u.client]) for u in updates if u.client in self.counted]


def sha256_of(data: bytes) -> str:
    """Hex sha256 of ``data`` (hashlib releases the GIL while it hashes)."""
    return hashlib.sha256(data).hexdigest()


class DeltaSum:
    """Running ``sum(n * (update - current))`` in preallocated buffers: no allocation per update.

    Fresh multi-megabyte arrays per tensor and update cost page faults that outweigh the
    arithmetic. The sums are laid out like the current model's runs (`FlatModel`), so an update
    read from a file of the same layout is added in a few long passes; differences go through a
    small scratch buffer, a chunk at a time, so the sum is the only model-sized buffer this holds.
    """

    def __init__(self, current: Weights) -> None:
        self.model = FlatModel(current)
        self.floating = [bool(np.issubdtype(run.dtype, np.floating)) for run in self.model.runs]
        self.sums = [np.zeros(run.size, run.dtype if floating else np.float64)
                     for run, floating in zip(self.model.runs, self.floating, strict=True)]
        self.scratch: dict[np.dtype[Any], NDArray[Any]] = {}
        for total in self.sums:  # per dtype, no larger than a chunk or the largest run of that dtype
            size = min(CHUNK, max(total.size, len(self.scratch.get(total.dtype, ()))))
            self.scratch[total.dtype] = np.empty(size, total.dtype)

    def _accumulate(self, index: int, offset: int, source: NDArray[Any], factor: int, limit: int | None = None
                    ) -> tuple[float, int, int]:
        """Add ``factor * (source - current)`` at ``offset`` of run ``index``, chunk by chunk.

        Returns the squared norm, the elements added and, when a chunk is not finite (its norm is
        then NaN or Inf), the offset of its first bad element; it stops before that chunk.
        ``limit`` stops after that many elements (to undo part of an update).
        """
        end = source.size if limit is None else limit
        total = self.sums[index][offset:offset + source.size]
        base = self.model.arrays[index][offset:offset + source.size]
        scratch, floating = self.scratch[total.dtype], self.floating[index]
        squared = 0.0
        for start in range(0, end, CHUNK):
            stop = min(end, start + CHUNK)
            delta = scratch[:stop - start]
            np.subtract(source[start:stop], base[start:stop], out=delta)
            if floating:
                part = float(np.dot(delta, delta))
                if not math.isfinite(part):
                    return part, start, offset + start + first_non_finite(delta)
                squared += part
            np.multiply(delta, factor, out=delta)
            np.add(total[start:stop], delta, out=total[start:stop])
        return squared, end, -1

    def add(self, weights: Weights, factor: int) -> tuple[float, str | None]:
        """Add ``factor * (weights - current)``; return the delta's norm, or why the update is unusable.

        Each chunk is differenced, measured, scaled and summed in one visit, while it is in cache.
        A chunk that is not finite rolls back what this update added (recomputing those
        differences), so the sums only ever hold whole, finite updates.
        """
        tiled = tiled_runs(weights)
        squared_norm = 0.0
        added: list[tuple[int, int, NDArray[Any]]] = []
        for index in range(len(self.model.runs)):
            for offset, source in self.model.pieces(weights, index, tiled):
                squared, reached, bad = self._accumulate(index, offset, source, factor)
                if not math.isfinite(squared):
                    self._accumulate(index, offset, source, -factor, reached)
                    for done in added:
                        self._accumulate(*done, -factor)
                    return 0.0, non_finite_problem(self.model.name_at(index, bad))
                squared_norm += squared
                added.append((index, offset, source))
        return float(np.sqrt(squared_norm)), None

    def mean(self, total_examples: float) -> Weights:
        """``current + sum / total_examples``, in each tensor's own dtype.

        Computed in the sums' own buffers (no second model): the sum is spent afterwards.
        """
        for total, base in zip(self.sums, self.model.arrays, strict=True):
            np.divide(total, total_examples, out=total)
            np.add(total, base, out=total)
        return cast_like(self.model.unflatten(self.sums), self.model.weights)
