"""Aggregation math against hand-computed values, update validation, and poisoned updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtrain.worker.errors import BadInputError, RejectedUpdatesError
from fedtrain.worker.storage import DirectoryStore
from fedtrain.worker.strategies import UpdateFile, UpdateSet, make_strategy
from fedtrain.worker.strategies.fedopt import server_step
from fedtrain.worker.weights import save_weights_file

CURRENT = {"w": np.zeros(2, dtype=np.float32), "bn.num_batches_tracked": np.array(0, dtype=np.int64)}


def write_updates(folder: Path, updates: dict[str, tuple[list[float], int]], tracked: int = 4) -> list[UpdateFile]:
    files = []
    for client, (values, examples) in updates.items():
        path = folder / f"{client}.safetensors"
        weights = {"w": np.array(values, dtype=np.float32), "bn.num_batches_tracked": np.array(tracked)}
        save_weights_file(path, weights, {"num_examples": examples})
        files.append(UpdateFile(client, DirectoryStore(folder), path.name))
    return files


def run(name: str, folder: Path, updates: dict[str, tuple[list[float], int]], params: dict | None = None,
        state: dict | None = None, max_norm_ratio: float = 0.0, min_updates: int = 1):
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
    updates = {"a": ([0, 0], 1), "b": ([1, 0], 1), "c": ([0, 1], 1), "d": ([0.5, 0.5], 1), "evil": ([50, 50], 1)}
    result, _ = run("krum", tmp_path, updates, {"f": 1})
    # scores (n-f-2 = 2 nearest): d is 0.5 from each of a, b, c -> the lowest
    np.testing.assert_allclose(result.weights["w"], [0.5, 0.5])
    assert result.details["selected"] == ["d"]


def test_multikrum_averages_the_best_m_weighted_by_examples(tmp_path: Path) -> None:
    updates = {"a": ([0, 0], 1), "b": ([1.5, 0], 3), "c": ([0, 2], 2), "d": ([0.5, 0.5], 4), "evil": ([50, 50], 1)}
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


HONEST = {f"c{i}": ([1.0 + 0.1 * i, -1.0 - 0.1 * i], 10) for i in range(5)}
POISONED = {**HONEST, "evil": ([-30.0, 30.0], 10)}


@pytest.mark.parametrize(("name", "params"), [
    ("fedmedian", {}), ("trimmedmean", {"beta": 0.2}), ("krum", {"f": 1}), ("multikrum", {"f": 1, "m": 3}),
])
def test_robust_strategies_neutralise_a_poisoned_update(tmp_path: Path, name: str, params: dict) -> None:
    poisoned, _ = run(name, tmp_path, POISONED, params)
    honest_mean = np.mean([v for v, _ in HONEST.values()], axis=0)
    assert np.abs(poisoned.weights["w"] - honest_mean).max() < 0.3


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
def test_bad_strategy_settings_name_the_field(name: str, params: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        make_strategy(name, params)
