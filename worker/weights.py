"""Weights on disk: a safetensors file plus a JSON sidecar, written atomically.

Client updates cross a trust boundary (another organisation's Job wrote them), so they are never
unpickled: safetensors holds only named arrays. The sidecar carries what the aggregator needs
besides the arrays (``num_examples``, metrics, the model config) and the file's sha256, checked on
every read so that a truncated or swapped file is caught before its numbers are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedtrain.worker.errors import BadDataError

Weights = dict[str, NDArray[Any]]


def sidecar_of(path: Path) -> Path:
    """``round-0001/clients/client-00.safetensors`` -> ``.../client-00.json``."""
    return path.with_suffix(".json")


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write pretty JSON."""
    write_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, failing with the file's name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise BadDataError(f"{path}: missing") from error
    except (OSError, ValueError) as error:
        raise BadDataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise BadDataError(f"{path}: expected a JSON object")
    return data


def save_weights(path: Path, weights: Weights, meta: dict[str, Any]) -> str:
    """Write ``weights`` and their sidecar; return the sha256 of the weights file."""
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make BatchNorm's scalar counters 1-d).
    data = save_safetensors({name: np.require(array, requirements="C") for name, array in weights.items()})
    digest = hashlib.sha256(data).hexdigest()
    write_atomically(path, data)
    write_json(sidecar_of(path), {**meta, "sha256": digest, "file": path.name})
    return digest


def read_weights(path: Path) -> tuple[Weights, dict[str, Any]]:
    """Read weights and sidecar, verifying the checksum; fail naming the file and what is wrong."""
    meta = read_json(sidecar_of(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise BadDataError(f"{path}: missing (its sidecar exists)") from error
    digest = hashlib.sha256(data).hexdigest()
    if meta.get("sha256") != digest:
        recorded = str(meta.get("sha256"))[:12]
        raise BadDataError(f"{path}: sha256 {digest[:12]}… does not match its sidecar ({recorded}…)")
    try:
        weights = load_safetensors(data)
    except Exception as error:
        raise BadDataError(f"{path}: not a valid safetensors file ({error})") from error
    return weights, meta
