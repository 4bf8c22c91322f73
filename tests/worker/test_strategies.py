"""Aggregation math against hand-computed values, update validation, and poisoned updates."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtrain.contract.errors import BadInputError, RejectedUpdatesError, TemporaryStorageError
from fedtrain.contract.sitetask import UPDATE_HEADER_LIMIT, ExampleBounds
from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.strategies import Aggregate, UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.strategies.arrays import FlatModel
from fedtrain.worker.strategies.fedopt import server_step
from fedtrain.worker.strategies.krum import pairwise_squared_distances
from fedtrain.worker.strategies.validation import non_finite_tensor, weight_caps
from fedtrain.worker.weights import (
    Weights,
    read_weights,
    read_weights_file,
    save_weights,
    save_weights_file,
    write_json,
)

CURRENT = {"w": np.zeros(2, dtype=np.float32), "bn.num_batches_tracked": np.array(0, dtype=np.int64)}


Updates = Mapping[str, tuple[Sequence[float], int]]  # client -> (values of "w", num_examples)


def write_updates(folder: Path, updates: Updates, tracked: int = 4) -> list[UpdateFile]:
    files = []
    for client, (values, examples) in updates.items():
        path = folder / f"{client}.safetensors"
        weights = {"w": np.array(values, dtype=np.float32), "bn.num_batches_tracked": np.array(tracked)}
        save_weights_file(path, weights, {"num_examples": examples})
        files.append(UpdateFile(client, DirectoryStore(folder), path.name))
    return files


def run(name: str, folder: Path, updates: Updates, params: dict[str, Any] | None = None,
        state: Weights | None = None, max_norm_ratio: float = 0.0, min_updates: int = 1) -> tuple[Aggregate, UpdateSet]:
    strategy = make_strategy(name, params)
    update_set = UpdateSet(CURRENT, write_updates(folder, updates), max_norm_ratio, min_updates)
    return strategy.aggregate(CURRENT, update_set, state or {}), update_set


def test_fedavg_weights_by_examples(tmp_path: Path) -> None:
    result, updates = run("fedavg", tmp_path, {"a": ([1, 2], 1), "b": ([3, 6], 3)})
    np.testing.assert_allclose(result.weights["w"], [2.5, 5.0])
    assert result.weights["w"].dtype == np.float32
    assert result.weights["bn.num_batches_tracked"] == 4
    assert updates.accepted == ["a", "b"] and updates.rejected == {}


def test_fedprox_averages_like_fedavg_and_hands_mu_to_clients(tmp_path: Path) -> None:
    result, _ = run("fedprox", tmp_path, {"a": ([1, 2], 1), "b": ([3, 6], 3)}, {"mu": "0.1"})
    np.testing.assert_allclose(result.weights["w"], [2.5, 5.0])
    assert make_strategy("fedprox", {"mu": 0.1}).client_options() == {"mu": 0.1}


def test_fedadam_first_step_by_hand(tmp_path: Path) -> None:
    # mean of clients = [1, -2]; delta = mean - 0; m = 0.1 * delta; v = 0.99 * tau^2 + 0.01 * delta^2
    result, _ = run("fedadam", tmp_path, {"a": ([1, -2], 5)}, {"eta": 0.5, "tau": 0.01})
    m = np.array([0.1, -0.2])
    v = 0.99 * 0.01**2 + 0.01 * np.array([1.0, 4.0])
    np.testing.assert_allclose(result.weights["w"], 0.5 * m / (np.sqrt(v) + 0.01), rtol=1e-6)
    np.testing.assert_allclose(result.state["m/w"], m)
    np.testing.assert_allclose(result.state["v/w"], v)
    assert "m/bn.num_batches_tracked" not in result.state  # statistics are averaged, never stepped


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_server_step_that_overflows_float32_is_named_before_it_is_written(tmp_path: Path) -> None:
    result, _ = run("fedadam", tmp_path, {"a": ([1, -2], 5)}, {"eta": 1e39})
    assert non_finite_tensor(result.weights) == "w"  # finite updates, an infinite step
    assert non_finite_tensor(result.state) is None


@pytest.mark.parametrize(("weights", "found"), [
    ({"w": np.array([1.0, np.nan], dtype=np.float32)}, "w"),
    ({"a": np.zeros(2, dtype=np.float16), "b": np.array([-np.inf])}, "b"),
    ({"w": np.array([3e38], dtype=np.float32), "n": np.array(7, dtype=np.int64)}, None),
])
def test_non_finite_tensor_names_the_first_tensor_with_nan_or_inf(weights: Weights, found: str | None) -> None:
    assert non_finite_tensor(weights) == found


def test_fedadam_uses_the_saved_state(tmp_path: Path) -> None:
    state = {"m/w": np.array([1.0, 1.0]), "v/w": np.array([4.0, 4.0])}
    result, _ = run("fedadam", tmp_path, {"a": ([0, 0], 1)}, {"eta": 1.0, "tau": 1e-3}, state)
    # delta 0: m = 0.9, v = 0.99 * 4 = 3.96
    np.testing.assert_allclose(result.weights["w"], [0.9 / (np.sqrt(3.96) + 1e-3)] * 2, rtol=1e-6)


@pytest.mark.parametrize(("kind", "expected_v"), [
    ("adagrad", 0.5 + 4.0),
    ("adam", 0.99 * 0.5 + 0.01 * 4.0),
    ("yogi", 0.5 - 0.01 * 4.0 * np.sign(0.5 - 4.0)),
])
def test_second_moment_rules(kind: str, expected_v: float) -> None:
    _, m, v = server_step(kind, np.array([0.0]), np.array([2.0]), np.array([0.0]), np.array([0.5]),
                          eta=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_allclose(m, [0.2])
    np.testing.assert_allclose(v, [expected_v])


def test_fedmedian_by_hand(tmp_path: Path) -> None:
    result, _ = run("fedmedian", tmp_path, {"a": ([1, 5], 1), "b": ([2, 6], 1), "c": ([100, -100], 1)})
    np.testing.assert_allclose(result.weights["w"], [2, 5])


def test_trimmed_mean_by_hand(tmp_path: Path) -> None:
    updates = {"a": ([1, 0], 1), "b": ([2, 0], 1), "c": ([3, 0], 1), "d": ([100, 0], 1)}
    result, _ = run("trimmedmean", tmp_path, updates, {"beta": 0.25})
    np.testing.assert_allclose(result.weights["w"], [2.5, 0])


def test_krum_picks_the_update_closest_to_its_neighbours(tmp_path: Path) -> None:
    updates: Updates = {"a": ([0, 0], 1), "b": ([1, 0], 1), "c": ([0, 1], 1), "d": ([0.5, 0.5], 1),
                        "evil": ([50, 50], 1)}
    result, _ = run("krum", tmp_path, updates, {"f": 1})
    # scores (n-f-2 = 2 nearest): d is 0.5 from each of a, b, c -> the lowest
    np.testing.assert_allclose(result.weights["w"], [0.5, 0.5])
    assert result.details["selected"] == ["d"]


def test_multikrum_averages_the_best_m_weighted_by_examples(tmp_path: Path) -> None:
    updates: Updates = {"a": ([0, 0], 1), "b": ([1.5, 0], 3), "c": ([0, 2], 2), "d": ([0.5, 0.5], 4),
                        "evil": ([50, 50], 1)}
    result, _ = run("multikrum", tmp_path, updates, {"f": 1, "m": 3})
    # squared distances: a-d 0.5, b-d 1.25, a-b 2.25, c-d 2.5, a-c 4, b-c 6.25, evil ~5000 from all.
    # scores (sum over the n-f-2 = 2 nearest): d 0.5+1.25 = 1.75, a 0.5+2.25 = 2.75, b 1.25+2.25 = 3.5,
    # c 2.5+4 = 6.5, evil ~9800: the best three are d, a, b
    assert result.details["selected"] == ["d", "a", "b"]
    # their example-weighted mean (4, 1 and 3 examples): x = (4*0.5 + 1*0 + 3*1.5) / 8, y = (4*0.5) / 8
    np.testing.assert_allclose(result.weights["w"], [0.8125, 0.25], rtol=1e-6)
    assert result.weights["w"].dtype == np.float32 and result.weights["bn.num_batches_tracked"] == 4


def test_krum_needs_enough_updates(tmp_path: Path) -> None:
    with pytest.raises(RejectedUpdatesError, match="n > 2f"):
        run("krum", tmp_path, {"a": ([0, 0], 1), "b": ([1, 0], 1), "c": ([0, 1], 1)}, {"f": 1})


HONEST: Updates = {f"c{i}": ([1.0 + 0.1 * i, -1.0 - 0.1 * i], 10) for i in range(5)}
POISONED: Updates = {**HONEST, "evil": ([-30.0, 30.0], 10)}


@pytest.mark.parametrize(("name", "params"), [
    ("fedmedian", {}), ("trimmedmean", {"beta": 0.2}), ("krum", {"f": 1}), ("multikrum", {"f": 1, "m": 3}),
])
def test_robust_strategies_neutralise_a_poisoned_update(tmp_path: Path, name: str, params: dict[str, Any]) -> None:
    poisoned, _ = run(name, tmp_path, POISONED, params)
    honest_mean = np.mean([v for v, _ in HONEST.values()], axis=0)
    assert np.abs(poisoned.weights["w"] - honest_mean).max() < 0.3


@pytest.mark.parametrize(("name", "expected"), [("fedavg", [0.25, 0.75]), ("fedmedian", [0.5, 0.5])])
def test_no_client_weighs_more_than_the_examples_the_coordinator_allows_it(tmp_path: Path, name: str,
                                                                           expected: list[float]) -> None:
    """A site claiming 10^9 examples would be the whole mean: its update is refused, the others' mean is kept."""
    updates: Updates = {"a": ([1, 0], 10), "b": ([0, 1], 30), "c": ([1, 1], 10), "evil": ([-50, -50], 10**9)}
    update_set = UpdateSet(CURRENT, write_updates(tmp_path, updates), bounds=ExampleBounds(1000, (("c", 5),)))
    result = make_strategy(name).aggregate(CURRENT, update_set, {})
    assert "claims 1000000000 examples, more than the 1000" in update_set.rejected["evil"]
    assert "claims 10 examples, more than the 5" in update_set.rejected["c"]  # its own, smaller bound
    assert sorted(update_set.accepted) == ["a", "b"]
    np.testing.assert_allclose(result.weights["w"], expected)  # fedavg: (10 * [1, 0] + 30 * [0, 1]) / 40


@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("fedadam", {"eta": 1.0, "tau": 1e-9}),
                                              ("multikrum", {"f": 0, "m": 4})])
def test_no_accepted_update_weighs_more_than_its_multiple_of_the_rounds_median(
        tmp_path: Path, name: str, params: dict[str, Any]) -> None:
    """Within maxExamples, a claim of 1000 against three of 10 is capped at 7 x 10, not refused."""
    updates: Updates = {"a": ([1, 0], 10), "b": ([0, 1], 10), "c": ([1, 1], 10), "big": ([4, 2], 1000),
                        "broken": ([1], 10**6)}  # refused (its shape): not part of the median
    update_set = UpdateSet(CURRENT, write_updates(tmp_path, updates), max_weight_over_median=7)
    result = make_strategy(name, params).aggregate(CURRENT, update_set, {})
    assert sorted(update_set.accepted) == ["a", "b", "big", "c"] and list(update_set.rejected) == ["broken"]
    assert update_set.capped == {"big": "claims 1000 examples; weighted as 70 (7 x the round's median 10, "
                                        "clients.maxWeightOverMedian)"}
    assert update_set.examples["big"] == 1000 and update_set.counted == {"a": 10, "b": 10, "c": 10, "big": 70}
    # (10 * [1, 0] + 10 * [0, 1] + 10 * [1, 1] + 70 * [4, 2]) / 100; uncapped, big's share would be 97%
    expected = [3.0, 1.6] if name != "fedadam" else [1.0, 1.0]  # Adam's first step: eta * sign, tau ~ 0
    np.testing.assert_allclose(result.weights["w"], expected, rtol=1e-5)


def test_a_capped_update_that_is_also_a_norm_outlier_is_taken_out_whole(tmp_path: Path) -> None:
    updates: Updates = {**HONEST, "evil": ([-30.0, 30.0], 1000)}
    update_set = UpdateSet(CURRENT, write_updates(tmp_path, updates), max_norm_ratio=5.0)
    result = make_strategy("fedavg").aggregate(CURRENT, update_set, {})
    assert "exceeds 5×" in update_set.rejected["evil"] and update_set.capped == {}
    np.testing.assert_allclose(result.weights["w"], np.mean([v for v, _ in HONEST.values()], axis=0), rtol=1e-6)


@pytest.mark.parametrize(("counts", "ratio", "capped"), [
    ({"a": 10, "b": 20, "c": 30, "d": 1000}, 10.0, {"d": 250}),  # median (20 + 30) / 2 = 25
    ({"a": 10, "b": 20, "c": 30, "d": 1000}, 1.1, {"c": 27, "d": 27}),  # a whole count: floor(1.1 x 25)
    ({"a": 10, "d": 1000}, 1.0, {}),  # fewer than three: no median worth the name
    ({"a": 1, "b": 1, "c": 10}, 10.0, {}),  # exactly at the cap
])
def test_weight_caps_by_hand(counts: dict[str, int], ratio: float, capped: dict[str, int]) -> None:
    assert {c: cap.weight for c, cap in weight_caps(counts, ratio).items()} == capped


def test_an_update_larger_than_its_model_is_refused_unread(tmp_path: Path) -> None:
    files = write_updates(tmp_path, {"a": ([1, 0], 10), "big": ([0, 1], 10)})
    with (tmp_path / "big.safetensors").open("r+b") as stream:  # the sidecar's sha256 no longer matters
        stream.truncate(UPDATE_HEADER_LIMIT + 1024)
    update_set = UpdateSet(CURRENT, files)
    make_strategy("fedavg").aggregate(CURRENT, update_set, {})
    assert "over the" in update_set.rejected["big"] and "refused without reading it" in update_set.rejected["big"]
    assert update_set.accepted == ["a"]


def test_fedavg_is_moved_by_the_same_poisoned_update(tmp_path: Path) -> None:
    """The control: without a robust strategy (and norm checks off) the attack works."""
    poisoned, _ = run("fedavg", tmp_path, POISONED)
    assert poisoned.weights["w"][0] < -3


def test_norm_outlier_is_rejected_and_subtracted_from_the_streaming_mean(tmp_path: Path) -> None:
    result, updates = run("fedavg", tmp_path, POISONED, max_norm_ratio=5.0)
    assert "evil" in updates.rejected and "exceeds 5×" in updates.rejected["evil"]
    np.testing.assert_allclose(result.weights["w"], np.mean([v for v, _ in HONEST.values()], axis=0), rtol=1e-6)


def test_invalid_updates_are_rejected_with_a_reason(tmp_path: Path) -> None:
    files = write_updates(tmp_path, {"good": ([1, 1], 2), "nan": ([np.nan, 1], 2)})
    save_weights_file(tmp_path / "shape.safetensors", {"w": np.zeros(3, np.float32),
                                                 "bn.num_batches_tracked": np.array(1)}, {"num_examples": 1})
    save_weights_file(tmp_path / "dtype.safetensors", {"w": np.zeros(2, np.float64),
                                                 "bn.num_batches_tracked": np.array(1)}, {"num_examples": 1})
    save_weights_file(tmp_path / "missing.safetensors", {"w": np.zeros(2, np.float32)}, {"num_examples": 1})
    save_weights_file(tmp_path / "zero.safetensors", {"w": np.zeros(2, np.float32),
                                                "bn.num_batches_tracked": np.array(1)}, {"num_examples": 0})
    tampered = write_updates(tmp_path, {"tampered": ([1, 1], 2)})[0]
    tampered_path = tmp_path / tampered.key
    tampered_path.write_bytes(tampered_path.read_bytes()[:-4] + b"\0\0\0\0")
    files += [UpdateFile(c, DirectoryStore(tmp_path), f"{c}.safetensors")
              for c in ("shape", "dtype", "missing", "zero", "absent")]
    files.append(tampered)
    update_set = UpdateSet(CURRENT, files, max_norm_ratio=0)
    result = make_strategy("fedavg").aggregate(CURRENT, update_set, {})
    np.testing.assert_allclose(result.weights["w"], [1, 1])
    reasons = update_set.rejected
    assert "NaN" in reasons["nan"]
    assert "shape (3,)" in reasons["shape"]
    assert "dtype float64" in reasons["dtype"]
    assert "missing tensors: bn.num_batches_tracked" in reasons["missing"]
    assert "num_examples" in reasons["zero"]
    assert "missing" in reasons["absent"]
    assert "sha256" in reasons["tampered"]
    assert tampered_path.with_suffix(".json").exists()


def test_too_few_valid_updates_fail_the_round_with_every_reason(tmp_path: Path) -> None:
    with pytest.raises(RejectedUpdatesError, match=r"1 valid update\(s\), 2 needed.*nan: .*NaN"):
        run("fedavg", tmp_path, {"good": ([1, 1], 2), "nan": ([np.nan, 1], 2)}, min_updates=2)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("fedsgd", {}, "strategy.name 'fedsgd' is unknown"),
    ("fedprox", {"alpha": 1}, "strategy.alpha is not a parameter of fedprox"),
    ("fedprox", {"mu": "lots"}, "strategy.mu must be float"),
    ("fedprox", {"mu": -1}, "strategy.mu must be >= 0"),
    ("krum", {"f": 1.5}, "strategy.f must be a whole number"),
    ("trimmedmean", {"beta": 0.5}, r"strategy.beta must be in \[0, 0.5\)"),
    ("fedadam", {"beta1": 1.0}, r"strategy.beta1 must be in \[0, 1\)"),
])
def test_bad_strategy_settings_name_the_field(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        make_strategy(name, params)


# A model whose float tensors form one run of ~45K values in its file: more than one chunk of the
# streaming sum and more than one block of the coordinate-wise reductions for a handful of updates.
SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "bn.weight": (4,), "bn.bias": (4,), "bn.running_mean": (4,),
          "bn.running_var": (4,), "fc.weight": (220, 200), "fc.bias": (220,)}
EPS = float(np.finfo(np.float32).eps)


def model(rng: np.random.Generator, base: dict[str, np.ndarray] | None = None, scale: float = 1e-2
          ) -> dict[str, np.ndarray]:
    """Random float32 weights (near ``base`` when given) plus a batch-norm counter."""
    weights = {name: (rng.normal(0, 1, shape) * (scale if base else 1)).astype(np.float32) + (base[name] if base else 0)
               for name, shape in SHAPES.items()}
    return {**weights, "bn.num_batches_tracked": np.array(int(rng.integers(1, 100)))}


def write_in_order(folder: Path, client: str, weights: dict[str, np.ndarray], examples: int, order: list[str]
                   ) -> UpdateFile:
    """A valid safetensors file with its tensors in ``order`` (the library always sorts them), and its sidecar."""
    header, body = {}, b""
    for name in order:
        raw = np.ascontiguousarray(weights[name]).tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[weights[name].dtype.name],
                        "shape": list(weights[name].shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + body
    store = DirectoryStore(folder)
    store.write_bytes(f"{client}.safetensors", data)
    write_json(store, f"{client}.json", {"num_examples": examples, "sha256": hashlib.sha256(data).hexdigest()})
    return UpdateFile(client, store, f"{client}.safetensors")


def round_files(folder: Path, count: int = 7, seed: int = 0, odd_layout: bool = True
                ) -> tuple[Weights, list[UpdateFile], list[dict[str, np.ndarray]], list[int]]:
    """The current model read from its file (as the aggregator has it) and ``count`` updates; with
    ``odd_layout`` the last one lays its tensors out in another order, so it is read tensor by tensor."""
    rng = np.random.default_rng(seed)
    save_weights_file(folder / "global.safetensors", model(rng), {})
    current, _ = read_weights_file(folder / "global.safetensors")
    updates = [model(rng, current) for _ in range(count)]
    examples = [int(rng.integers(1, 50)) for _ in range(count)]
    files = []
    for i, (update, n) in enumerate(zip(updates, examples, strict=True)):
        if odd_layout and i == count - 1:
            files.append(write_in_order(folder, f"c{i}", update, n, sorted(update, reverse=True)))
        else:
            save_weights_file(folder / f"c{i}.safetensors", update, {"num_examples": n})
            files.append(UpdateFile(f"c{i}", DirectoryStore(folder), f"c{i}.safetensors"))
    return current, files, updates, examples


def float64_mean(current: Weights, updates: list[dict[str, np.ndarray]], examples: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(examples))
    return {name: current[name] + sum(n * (u[name].astype(np.float64) - current[name]) for u, n in
                                       zip(updates, examples, strict=True)) / total for name in current}


def test_streaming_mean_over_runs_matches_float64_and_the_tensor_by_tensor_path(tmp_path: Path) -> None:
    current, files, updates, examples = round_files(tmp_path)
    assert len(FlatModel(current).runs) == 2  # the float tensors are read as one array
    flat = make_strategy("fedavg").aggregate(current, UpdateSet(current, files), {}).weights
    plain_current = {name: np.array(array) for name, array in current.items()}  # not from a file: tensor by tensor
    plain = make_strategy("fedavg").aggregate(plain_current, UpdateSet(plain_current, files), {}).weights
    reference = float64_mean(current, updates, examples)
    for name, expected in reference.items():
        assert np.array_equal(flat[name], plain[name]), name  # the same operations on every value
        if name == "bn.num_batches_tracked":
            assert flat[name] == np.rint(expected)
            continue
        # float32 sums of deltas: each of the k additions rounds by at most eps/2 of a partial sum
        # (at most the sum of |n * delta|), the division and the final add by eps/2 of the result.
        deltas = sum(n * np.abs(u[name].astype(np.float64) - current[name])
                     for u, n in zip(updates, examples, strict=True))
        bound = EPS * (len(updates) * deltas / sum(examples) + np.abs(expected))
        assert np.all(np.abs(flat[name] - expected) <= bound), name


@pytest.mark.parametrize(("name", "index"), [("fc.weight", (190, 3)), ("bn.bias", (2,))])
def test_a_non_finite_value_inside_a_run_names_its_tensor_and_leaves_the_sum_as_it_was(
        tmp_path: Path, name: str, index: tuple[int, ...]) -> None:
    current, files, updates, examples = round_files(tmp_path)
    broken = {k: v.copy() for k, v in updates[2].items()}
    broken[name][index] = np.inf
    save_weights_file(tmp_path / "c2.safetensors", broken, {"num_examples": examples[2]})
    update_set = UpdateSet(current, files)
    result = make_strategy("fedavg").aggregate(current, update_set, {}).weights
    assert update_set.rejected == {"c2": f"tensor {name} contains NaN or Inf (or values too large to square)"}
    assert_rounding_of(result, float64_mean(current, updates[:2] + updates[3:], examples[:2] + examples[3:]))


@pytest.mark.parametrize(("name", "index"), [("fc.weight", (190, 3)), ("bn.bias", (2,))])
def test_the_norms_for_the_robust_strategies_name_a_non_finite_tensor_inside_a_run(
        tmp_path: Path, name: str, index: tuple[int, ...]) -> None:
    current, files, updates, examples = round_files(tmp_path, odd_layout=False)
    broken = {k: v.copy() for k, v in updates[2].items()}
    broken[name][index] = np.nan
    save_weights_file(tmp_path / "c2.safetensors", broken, {"num_examples": examples[2]})
    update_set = UpdateSet(current, files)
    assert [u.client for u in update_set.all()] == ["c0", "c1", "c3", "c4", "c5", "c6"]
    assert update_set.rejected == {"c2": f"tensor {name} contains NaN or Inf (or values too large to square)"}


def test_a_corrupt_file_read_while_its_checksum_is_computed_is_taken_out_again(tmp_path: Path) -> None:
    current, files, updates, examples = round_files(tmp_path)
    path = tmp_path / "c1.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = np.array([7.0, -7.0], np.float32).tobytes()  # still a valid file, with other values
    path.write_bytes(bytes(data))
    update_set = UpdateSet(current, files)
    result = make_strategy("fedavg").aggregate(current, update_set, {}).weights
    assert list(update_set.rejected) == ["c1"] and "does not match its sidecar" in update_set.rejected["c1"]
    assert_rounding_of(result, float64_mean(current, updates[:1] + updates[2:], examples[:1] + examples[2:]))


def assert_rounding_of(result: Weights, reference: dict[str, np.ndarray]) -> None:
    """An update added and subtracted again leaves at most a few float32 roundings of the sum behind."""
    for name, expected in reference.items():
        if result[name].dtype.kind != "f":
            assert result[name] == np.rint(expected)
        else:
            np.testing.assert_allclose(result[name], expected, rtol=4 * EPS, atol=4 * EPS)


class RewritingStore(DirectoryStore):  # type: ignore[misc]  # (mypy does not map fedtrain.worker from tests)
    """A directory where a client replaces its update (file and sidecar) right after the aggregator first reads it."""

    def __init__(self, root: Path, key: str, replacement: dict[str, np.ndarray]) -> None:
        super().__init__(root)
        self.key, self.replacement = key, replacement

    def read_bytes(self, key: str) -> bytes:
        return self._replaced_after(key, super().read_bytes(key))

    def read_bounded(self, key: str, limit: int) -> bytes:
        return self._replaced_after(key, super().read_bounded(key, limit))

    def _replaced_after(self, key: str, data: bytes) -> bytes:
        if key == self.key and self.replacement:
            save_weights(DirectoryStore(self.root), key, self.replacement, {"num_examples": 10})
            self.replacement = {}
        return data


def test_an_outlier_replaced_before_it_is_taken_out_fails_the_round_as_temporary(tmp_path: Path) -> None:
    """Subtracting other values than were added would let the replacement in unchecked."""
    files = write_updates(tmp_path, POISONED)
    store = RewritingStore(tmp_path, "evil.safetensors", {"w": np.array([3.0, 3.0], np.float32),
                                                          "bn.num_batches_tracked": np.array(4)})
    files = [UpdateFile(f.client, store, f.key) for f in files]
    with pytest.raises(TemporaryStorageError, match=r"evil\.safetensors: changed while the round was aggregated"):
        make_strategy("fedavg").aggregate(CURRENT, UpdateSet(CURRENT, files, max_norm_ratio=5.0), {})


@pytest.mark.parametrize("odd_layout", [False, True], ids=["runs", "tensor-by-tensor"])
def test_robust_reductions_block_by_block_match_numpy_over_whole_tensors(tmp_path: Path, odd_layout: bool) -> None:
    current, files, updates, _ = round_files(tmp_path, odd_layout=odd_layout)
    stacked = {name: np.stack([u[name] for u in updates]) for name in current}
    median = make_strategy("fedmedian").aggregate(current, UpdateSet(current, files), {}).weights
    trimmed = make_strategy("trimmedmean", {"beta": 0.2}).aggregate(current, UpdateSet(current, files), {}).weights
    for name, values in stacked.items():
        expected_median = np.median(values, axis=0)
        middle = np.sort(values.astype(np.float64), axis=0)[1:-1].mean(axis=0)  # beta 0.2 of 7: one per side
        if values.dtype.kind != "f":
            assert median[name] == np.rint(expected_median) and trimmed[name] == np.rint(middle)
            continue
        assert np.array_equal(median[name], expected_median), name  # the same values picked the same way
        # float64 sums of at most 7 float32 values are exact to far below float32's rounding: the
        # cast to float32 is the only rounding, half an ulp of the result.
        assert np.all(np.abs(trimmed[name] - middle) <= EPS / 2 * np.abs(middle)), name
    floats = [name for name in current if current[name].dtype.kind == "f"]
    direct = np.array([[sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in floats) for b in updates]
                       for a in updates])
    np.testing.assert_allclose(pairwise_squared_distances(current, [tensors_of_update(f) for f in files]), direct,
                               rtol=1e-9, atol=1e-9 * direct.max())


def tensors_of_update(source: UpdateFile) -> Weights:
    return read_weights(source.store, source.key)[0]
