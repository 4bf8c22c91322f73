"""The decoded-shard cache: same arrays as decoding, used only while the data is unchanged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedtrain.contract.storage import Store, open_store
from fedtrain.worker import jobs
from fedtrain.worker.data.decoded import CACHE_ENV, DecodedShard, ShardKey, decoded_shard
from fedtrain.worker.data.gtsrb import GtsrbTree, Sample, load_tree
from fedtrain.worker.data.partition import PartitionConfig
from fedtrain.worker.models import ModelConfig
from fedtrain.worker.training import TrainConfig
from fedtrain.worker.weights import read_weights


class Locator:
    """Indexes the tree and takes the first ``count`` training samples; counts how often it ran."""

    def __init__(self, root: Path, count: int = 40) -> None:
        self.root, self.count, self.calls = root, count, 0

    def __call__(self) -> tuple[GtsrbTree, list[Sample]]:
        self.calls += 1
        tree = load_tree(self.root, need_test=False)
        return tree, list(tree.train[:self.count])


@pytest.fixture()
def tree_copy(synth_tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth_tree, tmp_path / "data"))


def shard_of(root: Path, locate: Locator, cache: Path | None, expected: list[str] | None = None) -> DecodedShard:
    return decoded_shard(ShardKey("client:a", root, 16, True), locate, expected, cache)


def test_a_cached_shard_equals_a_decoded_one_and_skips_indexing(tree_copy: Path, tmp_path: Path) -> None:
    locate = Locator(tree_copy)
    plain = shard_of(tree_copy, locate, None)
    first = shard_of(tree_copy, locate, tmp_path / "cache")
    again = shard_of(tree_copy, locate, tmp_path / "cache", [s.sample_id for s in plain.samples])
    assert locate.calls == 2  # the third call was served from the cache
    for shard in (first, again):
        assert np.array_equal(shard.images, plain.images) and np.array_equal(shard.labels, plain.labels)
        assert [(s.sample_id, s.class_id, s.track) for s in shard.samples] == \
               [(s.sample_id, s.class_id, s.track) for s in plain.samples]
    chosen = plain.samples[5:9]
    assert np.array_equal(again.arrays(chosen)[0], plain.images[5:9])


def test_a_changed_image_or_other_ids_miss_the_cache(tree_copy: Path, tmp_path: Path) -> None:
    locate = Locator(tree_copy)
    cache = tmp_path / "cache"
    before = shard_of(tree_copy, locate, cache)
    shard_of(tree_copy, locate, cache, ["somewhere/else.ppm"])
    assert locate.calls == 2
    changed = tree_copy / before.samples[0].sample_id
    Image.new("RGB", (20, 20), (255, 0, 0)).save(changed, format="PPM")
    os.utime(changed, ns=(1, 1))  # a rewrite that even keeps an old mtime is caught by the size
    after = shard_of(tree_copy, locate, cache)
    assert locate.calls == 3
    assert np.all(after.images[0] == (255, 0, 0)) and not np.array_equal(after.images[0], before.images[0])


def test_an_unreadable_cache_entry_is_decoded_again(tree_copy: Path, tmp_path: Path) -> None:
    locate = Locator(tree_copy)
    cache = tmp_path / "cache"
    expected = shard_of(tree_copy, locate, cache)
    for entry in cache.iterdir():
        entry.write_bytes(b"not an npz")
    assert np.array_equal(shard_of(tree_copy, locate, cache).images, expected.images) and locate.calls == 2


def test_training_with_the_cache_writes_the_same_update(synth_tree: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "run"
    jobs.init(_store(workdir), jobs.DataConfig(str(synth_tree)), ModelConfig("tiny_cnn", 43, 16),
              PartitionConfig(num_clients=2), None, seed=1)
    workspace = jobs.Workspace.open(workdir)
    config = TrainConfig(local_epochs=1, batch_size=16)
    updates = []
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # none, a miss, a hit
        if cache is None:
            monkeypatch.delenv(CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(CACHE_ENV, str(cache))
        jobs.train(workspace, 1, "client-00", config, torch.device("cpu"))
        updates.append(read_weights(workspace.store, workspace.layout.client_update(1, "client-00"))[0])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    for other in updates[1:]:
        assert all(np.array_equal(updates[0][name], other[name]) for name in updates[0])


def _store(workdir: Path) -> Store:
    workdir.mkdir(parents=True)
    return open_store(str(workdir))
