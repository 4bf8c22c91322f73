"""Models: architectures, local pretrained weights (safetensors and state dicts), head-only training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedtrain.contract.errors import BadDataError, BadInputError
from fedtrain.worker.models import ModelConfig, build_model, count_parameters


def test_mobilenet_small_from_an_imagenet_checkpoint_keeps_a_fresh_head(tmp_path: Path) -> None:
    imagenet = build_model(ModelConfig("mobilenet_v3_small", num_classes=1000, image_size=32))
    path = tmp_path / "mobilenet_v3_small.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    model = build_model(ModelConfig("mobilenet_v3_small", 43, 32, pretrained_weights=str(path)))
    first = "features.0.0.weight"
    assert torch.equal(model.state_dict()[first], imagenet.state_dict()[first])
    assert model.state_dict()["classifier.3.weight"].shape == (43, 1024)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 43)


def test_torch_state_dict_file_loads_without_unpickling_code(tmp_path: Path) -> None:
    source = build_model(ModelConfig("tiny_cnn", 43, 32))
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_model(ModelConfig("tiny_cnn", 43, 32, pretrained_weights=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(),
                                                   strict=True))


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(ModelConfig("tiny_cnn", 43, 32)).state_dict().items()},
              str(path))
    with pytest.raises(BadDataError, match="no tensor matches this architecture"):
        build_model(ModelConfig("mobilenet_v3_small", 43, 32, pretrained_weights=str(path)))


def test_missing_or_garbage_weight_files(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"model.pretrainedWeights: .* does not exist"):
        build_model(ModelConfig("tiny_cnn", pretrained_weights=str(tmp_path / "none.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(BadDataError, match="not a readable weights file"):
        build_model(ModelConfig("tiny_cnn", pretrained_weights=str(garbage)))


def test_head_only_freezes_the_backbone() -> None:
    total, trainable = count_parameters(build_model(ModelConfig("mobilenet_v3_small", 43, 32, fine_tune=False)))
    full_total, full_trainable = count_parameters(build_model(ModelConfig("mobilenet_v3_small", 43, 32)))
    assert total == full_total == full_trainable
    assert 0 < trainable < total / 2


@pytest.mark.parametrize(("config", "message"), [
    (ModelConfig("resnet50"), "model.architecture 'resnet50' is unknown"),
    (ModelConfig(num_classes=1), "model.numClasses must be >= 2"),
    (ModelConfig(image_size=8), "model.imageSize must be within 16..512"),
])
def test_bad_model_settings_name_the_field(config: ModelConfig, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        build_model(config)
