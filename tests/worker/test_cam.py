"""Class activation maps: exact CAM for a linear head, well-formed maps and a sheet for MobileNetV3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedtrain.worker.cam import class_activation_maps, overlay, save_cam_sheet
from fedtrain.worker.models import ModelConfig, build_model
from fedtrain.worker.training import to_tensor_batch


def test_linear_head_gives_exact_cam_whose_mean_is_the_logit() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig("tiny_cnn", 5, 32)).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        features = model.features(to_tensor_batch(images, torch.device("cpu")))
        weights, bias = model.classifier[1].weight, model.classifier[1].bias
        manual = torch.einsum("nchw,kc->nkhw", features, weights) + bias[None, :, None, None]
        logits = model(to_tensor_batch(images, torch.device("cpu")))
    np.testing.assert_allclose(manual.mean(dim=(2, 3)).numpy(), logits.numpy(), rtol=1e-4, atol=1e-5)
    maps, chosen, probability = class_activation_maps(model, images, classes=[0, 1, 2])
    expected = manual[torch.arange(3), torch.tensor([0, 1, 2])].numpy()
    expected = (expected - expected.min(axis=(1, 2), keepdims=True)) / np.ptp(expected, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert chosen.tolist() == [0, 1, 2] and np.all((probability > 0) & (probability < 1))


def test_mobilenet_maps_overlay_and_sheet(tmp_path: Path) -> None:
    model = build_model(ModelConfig("mobilenet_v3_small", 43, 64))
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    maps, chosen, _ = class_activation_maps(model, images)
    assert maps.shape == (2, 2, 2) and maps.min() >= 0 and maps.max() <= 1
    assert chosen.shape == (2,)
    assert overlay(images[0], maps[0]).shape == (64, 64, 3)
    sheet = save_cam_sheet(tmp_path / "cam.png", images, maps, ["a", "b"])
    assert sheet.stat().st_size > 1000
