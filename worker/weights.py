"""Weights in a store: a safetensors file plus a JSON sidecar, each written atomically.

Client updates cross a trust boundary (another organisation's Job wrote them), so they are never
unpickled: safetensors holds only named arrays. The sidecar carries what the aggregator needs
besides the arrays (``num_examples``, metrics, the model config) and the file's sha256, checked on
every read so that a truncated or swapped file is caught before its numbers are used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import save as save_safetensors

from fedtrain.worker.errors import BadDataError
from fedtrain.worker.layout import sidecar_of
from fedtrain.worker.storage import DirectoryStore, Store

Weights = dict[str, NDArray[Any]]
HEADER_LENGTH_BYTES = 8
DTYPES = {"F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "I32": "i4", "I16": "i2", "I8": "i1", "U64": "u8",
          "U32": "u4", "U16": "u2", "U8": "u1", "BOOL": "?"}


def write_json(store: Store, key: str, data: dict[str, Any]) -> None:
    """Atomically write pretty JSON."""
    store.write_bytes(key, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(store: Store, key: str) -> dict[str, Any]:
    """Read a JSON object, failing with the file's name."""
    raw = store.read_bytes(key)
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as error:
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
    meta = read_json(store, sidecar_of(key))
    try:
        data = store.read_bytes(key)
    except BadDataError as error:
        raise BadDataError(f"{store.describe(key)}: missing (its sidecar exists)") from error
    digest = hashlib.sha256(data).hexdigest()
    if meta.get("sha256") != digest:
        recorded = str(meta.get("sha256"))[:12]
        raise BadDataError(f"{store.describe(key)}: sha256 {digest[:12]}… does not match its sidecar ({recorded}…)")
    try:
        weights = tensors_of(data)
    except ValueError as error:
        raise BadDataError(f"{store.describe(key)}: not a valid safetensors file ({error})") from error
    return weights, meta


def tensors_of(data: bytes) -> Weights:
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
    except ValueError as error:
        raise ValueError(f"header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted(((name, _entry(name, spec)) for name, spec in header.items()), key=lambda e: e[1][2])
    end_of_previous = 0
    weights: Weights = {}
    for name, (dtype, shape, begin, end) in entries:
        if begin != end_of_previous:
            raise ValueError(f"tensor {name!r} starts at {begin}, not where the previous one ends ({end_of_previous})")
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        if start + end > len(data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        weights[name] = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize,
                                      offset=start + begin).reshape(shape)
        end_of_previous = end
    if start + end_of_previous != len(data):
        raise ValueError(f"{len(data) - start - end_of_previous} bytes after the last tensor")
    return weights


def _entry(name: str, spec: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for type."""
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        found = spec.get("dtype") if isinstance(spec, dict) else spec
        raise ValueError(f"tensor {name!r}: unknown or missing dtype {found!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    return np.dtype(DTYPES[spec["dtype"]]).newbyteorder("<"), tuple(shape), offsets[0], offsets[1]


def read_weights_file(path: Path) -> tuple[Weights, dict[str, Any]]:
    """`read_weights` for a file on local disk (``predict --weights``, a downloaded model)."""
    return read_weights(DirectoryStore(path.parent), path.name)


def save_weights_file(path: Path, weights: Weights, meta: dict[str, Any]) -> str:
    """`save_weights` to a file on local disk."""
    return save_weights(DirectoryStore(path.parent), path.name, weights, meta)
