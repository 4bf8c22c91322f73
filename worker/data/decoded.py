"""A client's decoded images, cached on local disk from one round to the next.

A client trains on the same shard every round. Indexing the data set to find its samples and
decoding their images cost a small model's client about a fifth of its round, paid again every
round by a fresh task. The first task decodes and writes one uncompressed ``.npz`` per shard;
later tasks load it in milliseconds.

An entry is used only when it still describes the data: the sample ids must be the ones asked
for, and the fingerprint of the files they come from must match, namely each image's and each
label CSV's size and modification time, and the modification time of their directories (a file
added or removed). A data set regenerated or edited in place therefore misses the cache. Entries
are plain arrays read with ``allow_pickle=False``: a cache file is never a way to run code.

The cache is off unless ``FEDTRAIN_DECODED_CACHE`` names a directory: `fedtrain run` points it into
the work directory. A Kubernetes Pod starts with an empty disk, where a cache would only cost a
write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.worker.data.gtsrb import GtsrbTree, Sample
from fedtrain.worker.data.images import load_samples

CACHE_ENV = "FEDTRAIN_DECODED_CACHE"
FORMAT = 1  # bump when the entry's arrays change meaning


@dataclass(frozen=True)
class DecodedShard:
    """Samples (without their ROI: already applied) and their decoded images, in the same order."""

    samples: list[Sample]
    images: NDArray[np.uint8]
    labels: NDArray[np.int64]

    def arrays(self, chosen: Sequence[Sample]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Images and labels of some of the shard's samples, in the order given."""
        row = {sample.sample_id: index for index, sample in enumerate(self.samples)}
        rows = np.fromiter((row[s.sample_id] for s in chosen), dtype=np.int64, count=len(chosen))
        return self.images[rows], self.labels[rows]


@dataclass(frozen=True)
class ShardKey:
    """What a shard's decoded images depend on, besides the files themselves."""

    name: str  # a client, "test", "train"
    root: Path
    image_size: int
    roi_crop: bool

    def file_name(self) -> str:
        """A safe file name for any client name."""
        text = json.dumps([FORMAT, self.name, str(self.root.resolve()), self.image_size, self.roi_crop])
        return hashlib.sha256(text.encode()).hexdigest()[:32] + ".npz"


def cache_directory() -> Path | None:
    """Where entries go, from ``FEDTRAIN_DECODED_CACHE``; None: no cache."""
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def fingerprint(root: Path, sample_ids: Sequence[str]) -> str:
    """sha256 of the size and mtime of every image, of the CSVs beside them and of their folders."""
    digest = hashlib.sha256()
    folders: set[Path] = {root}
    for sample_id in sample_ids:
        path = root / sample_id
        stat = path.stat()
        digest.update(f"{sample_id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        folders.add(path.parent)
    for folder in sorted(folders):
        digest.update(f"{folder}\0{folder.stat().st_mtime_ns}\n".encode())
        with os.scandir(folder) as entries:
            for entry in sorted((e for e in entries if e.name.endswith(".csv")), key=lambda e: e.name):
                stat = entry.stat()
                digest.update(f"{entry.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decoded_shard(key: ShardKey, locate: Callable[[], tuple[GtsrbTree, list[Sample]]],
                  expected_ids: Sequence[str] | None = None, cache: Path | None = None) -> DecodedShard:
    """The shard's decoded images: from the cache when it still matches the data, else decoded now.

    ``locate`` indexes the data set and picks the shard's samples (only called on a miss);
    ``expected_ids``, when known without indexing, must equal the cached entry's sample ids.
    """
    if cache is not None:
        hit = _load(cache / key.file_name(), key.root, expected_ids)
        if hit is not None:
            return hit
    tree, samples = locate()
    images, labels = load_samples(tree, samples, key.image_size, key.roi_crop)
    shard = DecodedShard([Sample(s.sample_id, s.class_id, s.track) for s in samples], images, labels)
    if cache is not None:
        _save(cache / key.file_name(), shard, fingerprint(key.root, [s.sample_id for s in samples]))
    return shard


def _load(path: Path, root: Path, expected_ids: Sequence[str] | None) -> DecodedShard | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            arrays: dict[str, Any] = {name: entry[name] for name in entry.files}
    except (OSError, ValueError, KeyError):
        return None  # unreadable (a crash mid-write cannot leave one: writes are atomic); decode again
    ids = [str(i) for i in arrays["sample_ids"]]
    if expected_ids is not None and ids != list(expected_ids):
        return None
    try:
        if str(arrays["fingerprint"]) != fingerprint(root, ids):
            return None
    except OSError:
        return None  # a file is gone: decoding will say which
    samples = [Sample(i, int(c), str(t)) for i, c, t in zip(ids, arrays["labels"], arrays["tracks"], strict=True)]
    return DecodedShard(samples, arrays["images"], arrays["labels"].astype(np.int64))


def _save(path: Path, shard: DecodedShard, print_: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, images=shard.images, labels=shard.labels, fingerprint=np.array(print_),
                     sample_ids=np.array([s.sample_id for s in shard.samples], dtype=str),
                     tracks=np.array([s.track for s in shard.samples], dtype=str))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
