"""A round's client updates: read from safetensors, validated, offered streaming or all at once.

FedAvg and the server-optimiser strategies only need the example-weighted mean, which is linear:
`UpdateSet.weighted_mean` reads each file once and keeps a running sum, so memory stays at about
one model whatever the number of clients. Norm outliers are only known once every norm has been
seen; their (rare) files are read a second time and their contribution subtracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtrain.worker.errors import BadDataError, RejectedUpdatesError
from fedtrain.worker.strategies.arrays import cast_like, flat_delta_norm
from fedtrain.worker.strategies.protocol import Update
from fedtrain.worker.strategies.validation import norm_outliers, structural_problem
from fedtrain.worker.weights import Weights, read_weights


@dataclass(frozen=True)
class UpdateFile:
    """Where one client's update lies."""

    client: str
    path: Path


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

    def _read(self, source: UpdateFile) -> Update | None:
        try:
            weights, meta = read_weights(source.path)
        except BadDataError as error:
            self.rejected[source.client] = str(error)
            return None
        problem = structural_problem(weights, self.current, meta.get("num_examples"))
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
        sums: dict[str, np.ndarray] = {}
        norms: dict[str, float] = {}
        for source in self.files:
            update = self._read(source)
            if update is None:
                continue
            norms[update.client] = flat_delta_norm(update.weights, self.current)
            self.examples[update.client] = update.num_examples
            _accumulate(sums, update.weights, update.num_examples)
        outliers = self._settle(norms)
        for source in self.files:
            if source.client in outliers:
                update = self._read(source)
                assert update is not None  # it was valid a moment ago
                _accumulate(sums, update.weights, -update.num_examples)
        total = float(sum(self.examples[c] for c in self.accepted))
        return cast_like({name: value / total for name, value in sums.items()}, self.current)

    def all(self) -> list[Update]:
        """Every accepted update, in memory at once (for coordinate-wise and distance-based strategies)."""
        updates = [u for u in (self._read(s) for s in self.files) if u is not None]
        norms = {u.client: flat_delta_norm(u.weights, self.current) for u in updates}
        self.examples = {u.client: u.num_examples for u in updates}
        outliers = self._settle(norms)
        return [u for u in updates if u.client not in outliers]


def _accumulate(sums: dict[str, np.ndarray], weights: Weights, factor: int) -> None:
    for name, array in weights.items():
        contribution = np.asarray(array, dtype=np.float64) * factor
        if name in sums:
            sums[name] += contribution
        else:
            sums[name] = contribution
