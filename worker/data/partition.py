"""Splitting a data set among federated clients, deterministically by seed.

Partitioners work on *units* (GTSRB tracks: every frame of one physical sign) so that one sign is
never seen by two clients, as it would not be in a real federation of road operators. Each returns
``client -> unit indices``; `partition_samples` expands them to sample ids and builds the manifest.

Schemes:
- ``iid``: units shuffled and dealt out evenly.
- ``dirichlet``: per class, shares drawn from Dirichlet(alpha) across clients (Hsu et al., 2019);
  small alpha gives strongly skewed label distributions.
- ``classes``: each client holds a disjoint contiguous range of classes (the original road-sign
  script's scenario: one operator sees only some sign types).
- ``quantity``: labels iid, but client sizes drawn from Dirichlet(alpha).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.contract.errors import BadInputError
from fedtrain.contract.layout import client_names
from fedtrain.worker.data.gtsrb import Sample

SCHEMES = ("iid", "dirichlet", "classes", "quantity")
MAX_DRAWS = 100


@dataclass(frozen=True)
class PartitionConfig:
    """Which scheme, for how many clients, with which Dirichlet alpha and seed."""

    scheme: str = "iid"
    num_clients: int = 2
    alpha: float = 0.5
    seed: int = 0
    min_units_per_client: int = 1

    def check(self, num_units: int, num_classes: int) -> None:
        """Reject a configuration that cannot be satisfied, naming the field and the allowed values."""
        if self.scheme not in SCHEMES:
            raise BadInputError(f"partition.scheme {self.scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
        if self.num_clients < 1:
            raise BadInputError("clients.count must be >= 1")
        if self.scheme in ("dirichlet", "quantity") and not self.alpha > 0:
            raise BadInputError(f"partition.alpha must be > 0 for scheme {self.scheme}, got {self.alpha}")
        if self.num_clients * self.min_units_per_client > num_units:
            raise BadInputError(
                f"clients.count={self.num_clients} needs at least {self.num_clients * self.min_units_per_client} "
                f"tracks, but the data set has {num_units}; use fewer clients or more data"
            )
        if self.scheme == "classes" and self.num_clients > num_classes:
            raise BadInputError(
                f"partition.scheme=classes gives each client its own classes, so clients.count "
                f"({self.num_clients}) must be <= the number of classes present ({num_classes})"
            )


def partition_units(labels: NDArray[np.int64], config: PartitionConfig) -> list[NDArray[np.int64]]:
    """Assign unit indices to clients; ``labels[i]`` is the class of unit ``i``."""
    classes = np.unique(labels)
    config.check(len(labels), len(classes))
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), config.num_clients)
    elif config.scheme == "classes":
        parts = _by_class_range(labels, classes, config.num_clients)
    elif config.scheme == "quantity":
        parts = _by_quantity(len(labels), config, rng)
    else:
        parts = _by_dirichlet(labels, classes, config, rng)
    return [np.sort(part.astype(np.int64)) for part in parts]


def _by_class_range(labels: NDArray[np.int64], classes: NDArray[np.int64], clients: int) -> list[NDArray[np.int64]]:
    groups = np.array_split(classes, clients)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


def _by_quantity(units: int, config: PartitionConfig, rng: np.random.Generator) -> list[NDArray[np.int64]]:
    spare = units - config.num_clients * config.min_units_per_client
    shares = rng.dirichlet(np.full(config.num_clients, config.alpha))
    extra = np.floor(shares * spare).astype(np.int64)
    extra[np.argmax(shares)] += spare - extra.sum()
    sizes = extra + config.min_units_per_client
    order = rng.permutation(units)
    return list(np.split(order, np.cumsum(sizes)[:-1]))


def _by_dirichlet(
    labels: NDArray[np.int64], classes: NDArray[np.int64], config: PartitionConfig, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Per-class Dirichlet shares, redrawn until every client has its minimum (as in Hsu et al.)."""
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(config.num_clients)]
        for class_id in classes:
            members = rng.permutation(np.flatnonzero(labels == class_id))
            shares = rng.dirichlet(np.full(config.num_clients, config.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= config.min_units_per_client:
            return [np.array(p, dtype=np.int64) for p in parts]
    raise BadInputError(
        f"partition.alpha={config.alpha} left some of {config.num_clients} clients with fewer than "
        f"{config.min_units_per_client} tracks after {MAX_DRAWS} draws; raise alpha or use fewer clients"
    )


@dataclass
class Partition:
    """The manifest of a partition: client -> sample ids, and per-client label histograms."""

    scheme: str
    alpha: float
    seed: int
    num_classes: int
    clients: dict[str, list[str]] = field(default_factory=dict)
    histograms: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``manifest.json``."""
        return {
            "scheme": self.scheme, "alpha": self.alpha, "seed": self.seed, "num_classes": self.num_classes,
            "clients": self.clients, "histograms": self.histograms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        """Read back what `to_json` wrote."""
        return cls(data["scheme"], float(data["alpha"]), int(data["seed"]), int(data["num_classes"]),
                   dict(data["clients"]), dict(data["histograms"]))


def partition_samples(samples: Sequence[Sample], config: PartitionConfig, num_classes: int) -> Partition:
    """Partition samples by track among ``config.num_clients`` clients and describe the result."""
    tracks = sorted({s.track for s in samples})
    track_index = {track: i for i, track in enumerate(tracks)}
    track_labels = np.zeros(len(tracks), dtype=np.int64)
    for sample in samples:
        track_labels[track_index[sample.track]] = sample.class_id
    parts = partition_units(track_labels, config)
    owner = np.empty(len(tracks), dtype=np.int64)
    for client, units in enumerate(parts):
        owner[units] = client
    names = client_names(config.num_clients)
    result = Partition(config.scheme, config.alpha, config.seed, num_classes,
                       {name: [] for name in names}, {name: [0] * num_classes for name in names})
    for sample in samples:
        name = names[owner[track_index[sample.track]]]
        result.clients[name].append(sample.sample_id)
        result.histograms[name][sample.class_id] += 1
    return result
