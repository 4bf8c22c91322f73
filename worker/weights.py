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
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedtrain.worker.errors import BadDataError
from fedtrain.worker.storage import DirectoryStore, Store

Weights = dict[str, NDArray[Any]]


def sidecar_of(key: str) -> str:
    """``round-0001/clients/client-00.safetensors`` -> ``.../client-00.json``."""
    return key.removesuffix(".safetensors") + ".json"


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
        weights = load_safetensors(data)
    except Exception as error:
        raise BadDataError(f"{store.describe(key)}: not a valid safetensors file ({error})") from error
    return weights, meta


def read_weights_file(path: Path) -> tuple[Weights, dict[str, Any]]:
    """`read_weights` for a file on local disk (``predict --weights``, a downloaded model)."""
    return read_weights(DirectoryStore(path.parent), path.name)


def save_weights_file(path: Path, weights: Weights, meta: dict[str, Any]) -> str:
    """`save_weights` to a file on local disk."""
    return save_weights(DirectoryStore(path.parent), path.name, weights, meta)
