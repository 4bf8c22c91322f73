"""Reading safetensors without copying: the same arrays as the library, and every malformed file refused."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save

from fedtrain.worker.weights import tensors_of

WEIGHTS = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bn.num_batches_tracked": np.array(7),
           "bn.running_var": np.ones(3, dtype=np.float64), "mask": np.array([True, False]),
           "empty": np.zeros((0, 3), dtype=np.float16)}


def test_views_equal_what_the_library_reads_and_copy_nothing() -> None:
    data = save(WEIGHTS)
    ours, theirs = tensors_of(data), load(data)
    assert ours.keys() == theirs.keys()
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        assert np.array_equal(ours[name], array)
    assert np.shares_memory(ours["conv.weight"], np.frombuffer(data, np.uint8))
    assert not ours["conv.weight"].flags.writeable  # a view of the file's bytes is never written through


def raw(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(("data", "message"), [
    (b"\x01\x02", "shorter than its header length"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
    (struct.pack("<Q", 3) + b"{{{", "not JSON"),
    (raw({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown or missing dtype"),
    (raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "is not a list of sizes"),
    (raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "are not [begin, end]"),
    (raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "4 bytes for shape (2,)"),
    (raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "starts at 4"),
    (raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "starts at 0"),
    (raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12), "8 bytes after the last"),
    (raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4), "runs past the end of the file"),
    (raw([1, 2], b""), "not a JSON object"),  # type: ignore[arg-type]
    (struct.pack("<Q", 100_000) + b"[" * 100_000, "not JSON"),  # nested past the parser's depth
])
def test_a_malformed_file_is_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tensors_of(data)


def test_runs_group_tensors_of_one_dtype_lying_end_to_end() -> None:
    data = save(WEIGHTS)
    weights = tensors_of(data)
    assert sorted(n for run in weights.runs for n in run.names) == sorted(WEIGHTS)
    for run in weights.runs:
        assert {weights[n].dtype for n in run.names} == {run.dtype}
        assert np.array_equal(weights.flat(run), np.concatenate([weights[n].reshape(-1) for n in run.names]))
    assert weights.intact_runs() == frozenset(weights.runs)


def test_a_replaced_entry_leaves_no_run_to_read_flat() -> None:
    """A run read flat would show the file's values, not the replacement: no run is offered then."""
    weights = tensors_of(save({"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}))
    assert len(weights.runs) == 1 and weights.intact_runs()
    weights["a"] = np.full(3, 5, np.float32)
    assert weights.intact_runs() == frozenset()


def test_a_sidecar_nested_past_the_parsers_depth_is_bad_data(tmp_path: Any) -> None:
    from fedtrain.contract.errors import BadDataError
    from fedtrain.contract.sitetask import SIDECAR_LIMIT
    from fedtrain.contract.storage import DirectoryStore
    from fedtrain.worker.weights import read_json

    store = DirectoryStore(tmp_path)
    store.write_bytes("sites/evil/round-0001/update-a1.json", b"[" * 100_000)
    with pytest.raises(BadDataError, match="not valid JSON"):
        read_json(store, "sites/evil/round-0001/update-a1.json", SIDECAR_LIMIT)
