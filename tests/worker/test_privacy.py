"""Central DP: clipping bounds every update, the noise has its configured scale, ε matches published values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedtrain.contract.storage import DirectoryStore
from fedtrain.worker.strategies import UpdateFile, UpdateSet
from fedtrain.worker.strategies.privacy import clip, epsilon, private_mean
from fedtrain.worker.weights import save_weights

CURRENT = {"w": np.zeros(100_000, np.float32), "n": np.array(5, np.int64)}


def updates(folder: Path, deltas: dict[str, float]) -> UpdateSet:
    store = DirectoryStore(folder)
    files = []
    for client, value in deltas.items():
        save_weights(store, f"{client}.safetensors", {"w": np.full(100_000, value, np.float32),
                                                      "n": np.array(9, np.int64)}, {"num_examples": 10})
        files.append(UpdateFile(client, store, f"{client}.safetensors"))
    return UpdateSet(CURRENT, files, max_norm_ratio=0)


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    big = {"w": np.full(4, 3.0, np.float32), "n": np.array(7)}
    clipped, norm = clip(big, 1.5)
    assert norm == pytest.approx(6.0) and np.linalg.norm(clipped["w"]) == pytest.approx(1.5, rel=1e-6)
    assert clipped["n"] == 7  # integer buffers are not scaled
    small, _ = clip({"w": np.full(4, 0.1, np.float32)}, 1.5)
    np.testing.assert_array_equal(small["w"], np.full(4, 0.1, np.float32))


def test_without_noise_the_mean_is_of_clipped_updates_with_equal_weights(tmp_path: Path) -> None:
    # per-element 0.001 over 1e5 elements: norm 0.316 (kept); 0.1: norm 31.6 (clipped to 1)
    result, details = private_mean(CURRENT, updates(tmp_path, {"a": 0.001, "b": 0.1}), 1.0, 0.0,
                                   np.random.default_rng(0))
    expected = (0.001 + 1.0 / math.sqrt(100_000)) / 2
    np.testing.assert_allclose(result["w"], expected, rtol=1e-5)
    assert details["dp_clipped"] == ["b"] and result["n"] == 5  # integer buffers stay the global model's


def test_noise_has_the_configured_standard_deviation(tmp_path: Path) -> None:
    plain, _ = private_mean(CURRENT, updates(tmp_path, {"a": 0.001, "b": 0.002}), 1.0, 0.0, np.random.default_rng(0))
    noisy, details = private_mean(CURRENT, updates(tmp_path, {"a": 0.001, "b": 0.002}), 1.0, 2.0,
                                  np.random.default_rng(0))
    assert details["dp_noise_std"] == pytest.approx(2.0 * 1.0 / 2)
    assert np.std(noisy["w"] - plain["w"]) == pytest.approx(1.0, rel=0.02)
    again, _ = private_mean(CURRENT, updates(tmp_path, {"a": 0.001, "b": 0.002}), 1.0, 2.0, np.random.default_rng(0))
    np.testing.assert_array_equal(noisy["w"], again["w"])  # seeded: a rerun of the round writes the same model


def conversion(rdp: float, order: float, delta: float) -> float:
    """ε of one Rényi order: rdp + log(1 - 1/α) - log(δ·α)/(α - 1) (Canonne, Kamath and Steinke, 2020)."""
    return rdp + math.log1p(-1 / order) - math.log(delta * order) / (order - 1)


def test_epsilon_matches_the_published_sampled_without_replacement_gaussian() -> None:
    # The Rényi DP of the Gaussian under sampling without replacement (Wang, Balle and Kasiviswanathan, 2019)
    # for q = 0.01, a noise-to-sensitivity ratio of 2.5 and 50 steps, as published by TensorFlow Privacy in
    # tensorflow_privacy/privacy/analysis/rdp_accountant_test.py, test_compute_rdp_sequence_without_replacement
    # (to within 1e-5). Orders 1.001 (degenerate for the conversion) and infinity (infinite) are left out.
    orders = [1.5, 2.5, 5, 50, 100, 256, 512, 1024]
    published = [0.003470, 0.004638, 0.0087633, 0.098474, 167.766388, 792.838516, 1817.35871, 3865.55029]
    delta = 1e-5
    expected = min(conversion(r, a, delta) for r, a in zip(published, orders, strict=True))
    # Replacing one client moves the clipped sum by 2C, so a ratio of 2.5 is a noise multiplier z = 5
    assert epsilon(0.01, 5.0, 50, delta, orders) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.23339, abs=1e-5)  # reached at order 50


def test_all_clients_every_round_is_the_plain_gaussian_on_a_2c_sensitivity() -> None:
    # dp-accounting's test_compute_epsilon_delta_gaussian: a noise-to-sensitivity ratio of 4.530877117 is
    # exactly (1, 1e-6)-DP, over orders 1 to 100 in steps of 0.001 (the analytic Gaussian, Balle and Wang, 2018)
    fine = [0.001 * i for i in range(1000, 100_000)]
    assert epsilon(1.0, 2 * 4.530877117, 1, 1e-6, fine) == pytest.approx(1.0, abs=1e-6)
    # at the default orders too: T rounds of RDP 2α/z² each, the best order chosen
    z, rounds, delta = 1.5, 7, 1e-5
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    closed_form = min(conversion(rounds * 2 * a / z**2, a, delta) for a in orders)
    assert epsilon(1.0, z, rounds, delta) == pytest.approx(closed_form, rel=1e-9)


def test_the_budget_grows_with_rounds_with_the_sample_and_as_the_noise_shrinks() -> None:
    delta = 1e-5
    base = epsilon(0.2, 1.0, 10, delta)
    assert epsilon(0.2, 1.0, 20, delta) > base  # more rounds
    assert epsilon(0.2, 0.8, 10, delta) > base  # less noise
    assert epsilon(0.4, 1.0, 10, delta) > base  # more clients per round: less amplification
    assert epsilon(1.0, 1.0, 10, delta) > epsilon(0.4, 1.0, 10, delta)
    assert epsilon(0.2, 1.0, 10, 1e-3) < base  # a looser delta buys a smaller epsilon
    assert epsilon(1.0, 0.0, 3, delta) == math.inf and epsilon(1.0, 1.0, 0, delta) == 0.0
