"""A safetensors file's header read without numpy: what the coordinator checks of a masked upload before it counts.

A secure round cannot drop a client once the survivors have revealed the shares that unmask it, so
a site's masked vector must be right before its training counts: exactly one uint32 tensor
``masked`` of one element per value of the global model and one for the weight. The relay (in the
operator's image, which holds no numpy) checks that from the file's header (an 8-byte length and
a JSON table), and the global model's element count from its own.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fedtrain.contract.errors import BadDataError

MASKED_TENSOR = "masked"
MASKED_HEADER_LIMIT = 4096  # a masked update's safetensors header: one tensor's name, dtype and shape
HEADER_LENGTH_BYTES = 8


def header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The tensor table of a safetensors file's bytes and where its data starts; `BadDataError` naming ``where``."""
    if len(data) < HEADER_LENGTH_BYTES:
        raise BadDataError(f"{where}: {len(data)} bytes, too short for a safetensors file")
    size = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    if size > len(data) - HEADER_LENGTH_BYTES:
        raise BadDataError(f"{where}: its header claims {size} bytes, more than the file holds")
    try:
        table = json.loads(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + size])
    except (ValueError, RecursionError) as error:
        raise BadDataError(f"{where}: its safetensors header is not JSON ({error})") from error
    if not isinstance(table, dict):
        raise BadDataError(f"{where}: its safetensors header is not a table of tensors")
    table.pop("__metadata__", None)
    return table, HEADER_LENGTH_BYTES + size


def element_count(data: bytes, where: str) -> int:
    """How many values a weights file holds (all tensors, 0-d ones counting one)."""
    table, _ = header(data, where)
    try:
        return sum(math.prod(int(n) for n in entry["shape"]) for entry in table.values())
    except (TypeError, KeyError, ValueError) as error:
        raise BadDataError(f"{where}: a tensor of its header has no shape ({error})") from error


def check_masked(data: bytes, length: int, where: str) -> None:
    """Refuse a masked upload that is not exactly one uint32 tensor ``masked`` of ``length`` elements."""
    table, start = header(data, where)
    entry = table.get(MASKED_TENSOR)
    expected = {"dtype": "U32", "shape": [length], "data_offsets": [0, 4 * length]}
    if set(table) != {MASKED_TENSOR} or not isinstance(entry, dict) or \
            {k: entry.get(k) for k in expected} != expected or len(data) != start + 4 * length:
        shown = json.dumps(table)[:200]
        raise BadDataError(f"{where}: must hold one uint32 tensor {MASKED_TENSOR!r} of {length} elements (one per "
                           f"value of the global model, and the weight), and nothing else; it holds {shown}")
