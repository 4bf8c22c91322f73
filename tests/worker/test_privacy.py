"""Central DP: clipping bounds every update, the noise has the configured scale, and the budget adds up."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedtrain.worker.storage import DirectoryStore
from fedtrain.worker.strategies import UpdateFile, UpdateSet
from fedtrain.worker.strategies.privacy import clip, epsilon, private_mean, rdp_subsampled_gaussian
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


def test_the_budget_grows_with_rounds_shrinks_with_noise_and_sampling() -> None:
    sigma, delta = 1.0, 1e-5
    assert rdp_subsampled_gaussian(1.0, sigma, 8) == pytest.approx(8 / 2)  # the plain Gaussian: alpha / (2 sigma^2)
    # q = 1: T*a/(2s^2) + log(1/d)/(a-1) has its real minimum T/(2s^2) + 2*sqrt(T*log(1/d)/(2s^2)); integer
    # orders can only be a little above it
    exact = epsilon(1.0, sigma, 10, delta)
    continuous = 10 / (2 * sigma**2) + 2 * math.sqrt(10 * math.log(1 / delta) / (2 * sigma**2))
    assert continuous <= exact <= continuous * 1.05
    assert epsilon(1.0, sigma, 20, delta) > exact > epsilon(1.0, 2 * sigma, 10, delta)
    assert epsilon(0.1, sigma, 10, delta) < exact / 3  # sampling 1 client in 10 amplifies privacy
    assert epsilon(1.0, 0.0, 3, delta) == math.inf and epsilon(1.0, 1.0, 0, delta) == 0.0
