"""Local training learns, FedProx stays near the anchor, evaluation reports per class, weights round-trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.worker.data.gtsrb import load_tree
from fedtrain.worker.data.images import load_samples
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.strategies.arrays import is_statistic
from fedtrain.worker.training import (
    TrainConfig,
    evaluate,
    load_numpy_state,
    make_optimizer,
    state_to_numpy,
    train_local,
)
from fedtrain.worker.weights import read_weights_file, save_weights_file


@pytest.fixture(scope="module")
def arrays(synth_tree: Path) -> tuple[np.ndarray, np.ndarray]:
    tree = load_tree(synth_tree)
    few = [s for s in tree.train if s.class_id < 5]
    return load_samples(tree, few, 32, True)


def distance(a: dict, b: dict) -> float:
    """Squared distance over trainable parameters (batch-norm statistics are no parameters)."""
    return float(sum(np.square(a[k] - b[k]).sum() for k in a
                     if np.issubdtype(a[k].dtype, np.floating) and not is_statistic(k)))


def test_training_fits_the_training_data(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = arrays
    model = build_model(ModelConfig("tiny_cnn", 5, 32))
    before = evaluate(model, images, labels, 5).loss
    result = train_local(model, images, labels, TrainConfig(local_epochs=15, batch_size=8, learning_rate=0.01,
                                                            scheduler="cosine", seed=1))
    after = evaluate(model, images, labels, 5)
    assert result.num_examples == 40 and result.images_per_second > 0
    assert after.loss < before and after.accuracy > 0.5
    assert len(after.per_class_accuracy) == 5 and np.array(after.confusion).sum() == 40


def test_training_is_reproducible_by_seed(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = arrays
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig("tiny_cnn", 5, 32))
        load_numpy_state(model, state_to_numpy(build_model(ModelConfig("tiny_cnn", 5, 32))) if not runs else runs[0][1])
        start = state_to_numpy(model)
        train_local(model, images, labels, TrainConfig(optimizer="sgd", learning_rate=0.05, seed=4))
        runs.append((state_to_numpy(model), start))
    assert distance(runs[0][0], runs[1][0]) == 0.0


def test_fedprox_term_keeps_the_client_near_the_global_model(arrays: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = arrays
    start = state_to_numpy(build_model(ModelConfig("tiny_cnn", 5, 32)))
    moved = {}
    for mu in (0.0, 10.0):
        model = build_model(ModelConfig("tiny_cnn", 5, 32))
        load_numpy_state(model, start)
        train_local(model, images, labels, TrainConfig(local_epochs=3, optimizer="sgd", learning_rate=0.05,
                                                       mu=mu, seed=2))
        moved[mu] = distance(state_to_numpy(model), start)
    assert moved[10.0] < 0.7 * moved[0.0]


@pytest.mark.parametrize(("optimizer", "reference"), [
    ("sgd", lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)),
    ("adam", lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-3, foreach=False)),
])
def test_the_fused_optimisers_take_the_steps_of_torchs_reference_loop(optimizer: str, reference: Any) -> None:
    """The worker's optimisers run in torch's fused kernels, which agree with its per-tensor loop to float32 rounding
    (the vectorised kernel may fuse a multiply-add the loop rounds twice)."""
    config = TrainConfig(optimizer=optimizer, learning_rate=0.05 if optimizer == "sgd" else 0.01, weight_decay=1e-3)
    models = [build_model(ModelConfig("tiny_cnn", 5, 16)) for _ in range(2)]
    load_numpy_state(models[1], state_to_numpy(models[0]))
    optimizers = [make_optimizer(models[0], config), reference(list(models[1].parameters()))]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        gradients = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, step in zip(models, optimizers, strict=True):
            for parameter, gradient in zip(model.parameters(), gradients, strict=True):
                parameter.grad = gradient.clone()
            step.step()
    fused, plain = (state_to_numpy(m) for m in models)
    assert max(float(np.abs(fused[k] - plain[k]).max()) for k in fused) <= 1e-6


def test_evaluation_marks_absent_classes() -> None:
    model = build_model(ModelConfig("tiny_cnn", 3, 16))
    scores = evaluate(model, np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 0]), 3)
    assert scores.per_class_accuracy[1] is None and scores.per_class_accuracy[2] is None


@pytest.mark.parametrize(("config", "message"), [
    (TrainConfig(optimizer="rmsprop"), "training.optimizer 'rmsprop' is unknown"),
    (TrainConfig(scheduler="step"), "training.scheduler 'step' is unknown"),
    (TrainConfig(batch_size=0), "training.batchSize must be >= 1"),
    (TrainConfig(learning_rate=0), "training.learningRate must be > 0"),
])
def test_bad_training_settings_name_the_field(config: TrainConfig, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        config.check()


def test_weights_round_trip_and_tampering_is_caught(tmp_path: Path) -> None:
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    digest = save_weights_file(path, weights, {"num_examples": 3})
    loaded, meta = read_weights_file(path)
    assert meta["sha256"] == digest and meta["num_examples"] == 3
    assert loaded["n"].shape == () and np.array_equal(loaded["a"], weights["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.safetensors"]  # no temporary left
    path.write_bytes(path.read_bytes().replace(b"\x00\x00\x80?", b"\x00\x00\x00@"))
    with pytest.raises(BadDataError, match="does not match its sidecar"):
        read_weights_file(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(BadDataError, match=r"x.json: missing"):
        read_weights_file(path)


def test_after_epoch_sees_each_epoch_and_training_goes_on_in_train_mode(
        arrays: tuple[np.ndarray, np.ndarray]) -> None:
    """A learning curve from one run: the callback runs after every epoch, and evaluating in it does not leave
    the model in eval mode (BatchNorm would stop learning its statistics)."""
    images, labels = arrays
    model = build_model(ModelConfig("tiny_cnn", 5, 32))
    seen: list[tuple[int, bool]] = []

    def after(epoch: int) -> None:
        seen.append((epoch, model.training))
        model.eval()

    train_local(model, images, labels, TrainConfig(local_epochs=3, batch_size=8), after_epoch=after)
    assert seen == [(1, True), (2, True), (3, True)]
    assert model.training
