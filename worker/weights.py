"""Weights in a store: a safetensors file plus a JSON sidecar, each written atomically.

Client updates cross a trust boundary (another organisation's Job wrote them), so they are never
unpickled: safetensors holds only named arrays. The sidecar carries what the aggregator needs
besides the arrays (``num_examples``, metrics, the model config) and the file's sha256, checked on
every read so that a truncated or swapped file is caught before its numbers are used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import save as save_safetensors

from fedtrain.contract.errors import BadDataError, TooLargeError
from fedtrain.contract.layout import sidecar_of
from fedtrain.contract.sitetask import SIDECAR_LIMIT
from fedtrain.contract.storage import DirectoryStore, Store

Weights = dict[str, NDArray[Any]]
HEADER_LENGTH_BYTES = 8
DTYPES = {name: np.dtype(code).newbyteorder("<") for name, code in {
    "F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "I32": "i4", "I16": "i2", "I8": "i1", "U64": "u8", "U32": "u4",
    "U16": "u2", "U8": "u1", "BOOL": "?"}.items()}


def write_json(store: Store, key: str, data: dict[str, Any]) -> None:
    """Atomically write pretty JSON."""
    store.write_bytes(key, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(store: Store, key: str, limit: int | None = None) -> dict[str, Any]:
    """Read a JSON object, failing with the file's name; with ``limit``, refuse a larger file unread."""
    raw = store.read_bytes(key) if limit is None else store.read_bounded(key, limit)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # nesting past the parser's depth is bad data too
        raise BadDataError(f"{store.describe(key)}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise BadDataError(f"{store.describe(key)}: expected a JSON object")
    return data


def save_weights(store: Store, key: str, weights: Weights, meta: dict[str, Any]) -> str:
    """Write ``weights``, then their sidecar (its presence marks a complete pair); return the sha256."""
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make BatchNorm's scalar counters 1-d).
    data = save_safetensors({name: np.require(array, requirements="C") for name, array in weights.items()})
    digest = hashlib.sha256(data).hexdigest()
    store.write_bytes(key, data)
    write_json(store, sidecar_of(key), {**meta, "sha256": digest, "file": key.rsplit("/", 1)[-1]})
    return digest


def read_weights(store: Store, key: str) -> tuple[Weights, dict[str, Any]]:
    """Read weights and sidecar, verifying the checksum; fail naming the file and what is wrong."""
    data, meta = read_unchecked(store, key)
    problem = checksum_problem(store, key, meta, hashlib.sha256(data).hexdigest())
    if problem is not None:
        raise BadDataError(problem)
    return parse_weights(store, key, data), meta


def read_unchecked(store: Store, key: str, limit: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """A weights file's bytes and its sidecar, before any check (see `checksum_problem`, `parse_weights`).

    The sidecar is read within `SIDECAR_LIMIT` always (a client wrote it); the file within ``limit``
    when given (an update is no larger than its model and a header).
    """
    meta = read_json(store, sidecar_of(key), SIDECAR_LIMIT)
    try:
        return (store.read_bytes(key) if limit is None else store.read_bounded(key, limit)), meta
    except TooLargeError:
        raise
    except BadDataError as error:
        raise BadDataError(f"{store.describe(key)}: missing (its sidecar exists)") from error


def checksum_problem(store: Store, key: str, meta: dict[str, Any], digest: str) -> str | None:
    """Why a file whose sha256 is ``digest`` does not match its sidecar (truncated, swapped), or None."""
    if meta.get("sha256") == digest:
        return None
    recorded = str(meta.get("sha256"))[:12]
    return f"{store.describe(key)}: sha256 {digest[:12]}… does not match its sidecar ({recorded}…)"


def parse_weights(store: Store, key: str, data: bytes) -> FileWeights:
    """`tensors_of`, failing with a `BadDataError` that names the file."""
    try:
        return tensors_of(data)
    except ValueError as error:
        raise BadDataError(f"{store.describe(key)}: not a valid safetensors file ({error})") from error


@dataclass(frozen=True)
class Run:
    """Tensors of one dtype that lie end to end in a file's data, in file order.

    Arithmetic over a run is one pass over one flat array instead of a numpy call per tensor: a
    model's many small tensors (biases, batch-norm vectors) cost more in per-call overhead than in
    arithmetic. Two files whose runs are equal lay those tensors out identically.
    """

    dtype: np.dtype[Any]
    names: tuple[str, ...]
    sizes: tuple[int, ...]  # elements per tensor
    begin: int  # byte offset of the first tensor in the data section; -1: not in a file

    @property
    def size(self) -> int:
        """Elements in the run."""
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Element offset of each tensor in the run."""
        return tuple(itertools.accumulate(self.sizes, initial=0))[:-1]


class FileWeights(dict[str, NDArray[Any]]):
    """Weights that are read-only views into one safetensors buffer, with the runs they tile it in.

    A plain `Weights` dict to every reader; arithmetic that knows of runs (`flat`) reads a run as
    one array. Replacing an entry does not change the file: `intact_runs` is then empty.
    """

    def __init__(self, data: bytes, start: int) -> None:
        super().__init__()
        self.data, self.start = data, start
        self.runs: tuple[Run, ...] = ()
        self._views: tuple[NDArray[Any], ...] = ()

    def seal(self, runs: tuple[Run, ...]) -> None:
        """Record the runs once every tensor has been added."""
        self.runs, self._views = runs, tuple(self.values())

    def intact_runs(self) -> frozenset[Run]:
        """The runs, if every entry is still the view read from the file; else none."""
        intact = len(self) == len(self._views) and all(a is b for a, b in zip(self.values(), self._views, strict=True))
        return frozenset(self.runs) if intact else frozenset()

    def flat(self, run: Run) -> NDArray[Any]:
        """A run as one 1-D read-only array: no copy. Only for a run in `intact_runs`."""
        return np.frombuffer(self.data, run.dtype, count=run.size, offset=self.start + run.begin)


def tensors_of(data: bytes) -> FileWeights:
    """The arrays of a safetensors buffer as read-only views into it: no copy.

    ``safetensors.numpy.load`` copies every tensor, which costs about as much as reading and
    hashing the file and doubles the memory an update takes. The format is an 8-byte
    little-endian header length, a JSON header (dtype, shape, data offsets per tensor), then the
    raw little-endian data. The checks are the library's: known dtype, offsets inside the buffer,
    sizes that match the shapes, tensors tiling the data with no gap or overlap. A file that fails
    any of them raises ValueError.
    """
    if len(data) < HEADER_LENGTH_BYTES:
        raise ValueError("shorter than its header length")
    header_length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    start = HEADER_LENGTH_BYTES + header_length
    if start > len(data):
        raise ValueError(f"header length {header_length} runs past the end of the file")
    try:
        header = json.loads(data[HEADER_LENGTH_BYTES:start])
    except (ValueError, RecursionError) as error:  # nesting past the parser's depth is bad data too
        raise ValueError(f"header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted(((name, _entry(name, spec)) for name, spec in header.items()), key=lambda e: e[1][2])
    end_of_previous = 0
    weights = FileWeights(data, start)
    for name, (dtype, shape, begin, end) in entries:
        if begin != end_of_previous:
            raise ValueError(f"tensor {name!r} starts at {begin}, not where the previous one ends ({end_of_previous})")
        size = math.prod(shape)
        if end - begin != dtype.itemsize * size:
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        if start + end > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        weights[name] = np.frombuffer(data, dtype, count=size, offset=start + begin).reshape(shape)
        end_of_previous = end
    if start + end_of_previous != len(data):
        raise ValueError(f"{len(data) - start - end_of_previous} bytes after the last tensor")
    weights.seal(tuple(_runs(entries)))
    return weights


def _runs(entries: list[tuple[str, tuple[np.dtype[Any], tuple[int, ...], int, int]]]) -> Iterator[Run]:
    """Consecutive entries (in file order, already checked to tile the data) grouped by dtype."""
    for dtype, group in itertools.groupby(entries, key=lambda entry: entry[1][0]):
        members = list(group)
        yield Run(dtype, tuple(name for name, _ in members),
                  tuple((end - begin) // dtype.itemsize for _, (_, _, begin, end) in members), members[0][1][2])


def _entry(name: str, spec: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for type."""
    code = spec.get("dtype") if isinstance(spec, dict) else None
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unknown or missing dtype {code if isinstance(spec, dict) else spec!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_weights_file(path: Path) -> tuple[Weights, dict[str, Any]]:
    """`read_weights` for a file on local disk (``predict --weights``, a downloaded model)."""
    return read_weights(DirectoryStore(path.parent), path.name)


def save_weights_file(path: Path, weights: Weights, meta: dict[str, Any]) -> str:
    """`save_weights` to a file on local disk."""
    return save_weights(DirectoryStore(path.parent), path.name, weights, meta)
