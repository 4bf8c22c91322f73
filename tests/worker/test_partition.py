"""Partition properties: disjoint, complete, deterministic, and alpha really controls the skew."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.data.gtsrb import Sample
from fedtrain.worker.data.partition import PartitionConfig, partition_samples, partition_units

LABELS = np.repeat(np.arange(10), 40)  # 400 units, 10 classes


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes", "quantity"])
def test_disjoint_complete_and_deterministic(scheme: str) -> None:
    config = PartitionConfig(scheme=scheme, num_clients=5, alpha=0.5, seed=11)
    parts = partition_units(LABELS, config)
    everything = np.concatenate(parts)
    assert len(parts) == 5 and all(len(p) >= 1 for p in parts)
    assert len(everything) == len(set(everything.tolist())) == len(LABELS)  # disjoint and complete
    again = partition_units(LABELS, config)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_units(LABELS, PartitionConfig(scheme=scheme, num_clients=5, alpha=0.5, seed=12))
    assert scheme == "classes" or any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def mean_dominant_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def test_smaller_alpha_gives_more_label_skew() -> None:
    skew = {alpha: np.mean([mean_dominant_share(partition_units(LABELS, PartitionConfig(
        "dirichlet", 5, alpha, seed))) for seed in range(5)]) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.2  # near iid: about one class in ten dominates


def test_classes_scheme_gives_each_client_its_own_classes() -> None:
    parts = partition_units(LABELS, PartitionConfig("classes", 3))
    class_sets = [set(LABELS[p].tolist()) for p in parts]
    assert class_sets == [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]


def test_quantity_skew_keeps_labels_mixed_but_sizes_unequal() -> None:
    parts = partition_units(LABELS, PartitionConfig("quantity", 4, alpha=0.3, seed=2))
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]


@pytest.mark.parametrize(("config", "message"), [
    (PartitionConfig("random", 2), "partition.scheme 'random' is unknown"),
    (PartitionConfig("dirichlet", 2, alpha=0), "partition.alpha must be > 0"),
    (PartitionConfig("iid", 500), "clients.count=500 needs at least 500 tracks"),
    (PartitionConfig("classes", 11), r"clients.count \(11\) must be <="),
    (PartitionConfig("iid", 0), "clients.count must be >= 1"),
])
def test_impossible_partitions_name_the_field(config: PartitionConfig, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        partition_units(LABELS, config)


def test_samples_are_partitioned_by_track_with_histograms() -> None:
    samples = [Sample(f"{c:05d}/{t:05d}_{f:05d}.ppm", c, f"{c:05d}/{t:05d}") for c in range(4)
               for t in range(3) for f in range(5)]
    result = partition_samples(samples, PartitionConfig("iid", 3, seed=1), num_classes=4)
    owner_of_track: dict[str, str] = {}
    for client, ids in result.clients.items():
        for sample_id in ids:
            track = sample_id.rsplit("_", 1)[0]
            assert owner_of_track.setdefault(track, client) == client  # a track never spans clients
    assert sum(len(ids) for ids in result.clients.values()) == len(samples)
    assert [sum(h) for h in result.histograms.values()] == [len(ids) for ids in result.clients.values()]
    assert list(result.clients) == ["client-00", "client-01", "client-02"]
