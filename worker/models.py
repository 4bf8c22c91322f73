"""Models a federation can train: torchvision MobileNetV3 (small, large) and a tiny CNN for tests.

Pretrained weights always come from a local file (safetensors or a torch state dict): nothing is
downloaded, here or on an air-gapped cluster. An ImageNet checkpoint has a 1000-way last layer;
every tensor whose shape fits is loaded and the last layer keeps its fresh ``num_classes`` head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fedtrain.contract.errors import BadDataError, BadInputError

ARCHITECTURES = ("mobilenet_v3_small", "mobilenet_v3_large", "tiny_cnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's MobileNetV3 uses BatchNorm momentum 0.01: running statistics then need thousands of
# steps to settle. A federated client takes tens of steps per round, so with 0.01 the global
# model's statistics lag far behind its weights and evaluation collapses to one class (seen on
# synthetic GTSRB: 50% train accuracy, 2.3% test accuracy after two epochs). 0.1 is PyTorch's default.
BATCH_NORM_MOMENTUM = 0.1


@dataclass(frozen=True)
class ModelConfig:
    """What a model is: architecture, classes, input size, and how it starts and trains."""

    architecture: str = "mobilenet_v3_small"
    num_classes: int = 43
    image_size: int = 64
    pretrained_weights: str | None = None
    fine_tune: bool = True

    def check(self) -> None:
        """Reject unknown architectures and impossible sizes, naming the field."""
        if self.architecture not in ARCHITECTURES:
            raise BadInputError(
                f"model.architecture {self.architecture!r} is unknown; use one of {', '.join(ARCHITECTURES)}"
            )
        if self.num_classes < 2:
            raise BadInputError(f"model.numClasses must be >= 2, got {self.num_classes}")
        if not 16 <= self.image_size <= 512:
            raise BadInputError(f"model.imageSize must be within 16..512, got {self.image_size}")

    def to_json(self) -> dict[str, Any]:
        """A plain dict, stored beside every global weights file."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        """Read back what `to_json` wrote."""
        return cls(**{k: data[k] for k in ("architecture", "num_classes", "image_size",
                                            "pretrained_weights", "fine_tune") if k in data})


class TinyCnn(nn.Module):
    """A two-block CNN: enough to learn synthetic GTSRB at 32 px in seconds, for tests and demos."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features, global average pool, linear head."""
        return self.classifier(self.pool(self.features(x)))


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model, load local pretrained weights if named, and freeze the backbone for head-only."""
    config.check()
    model: nn.Module
    if config.architecture == "tiny_cnn":
        model = TinyCnn(config.num_classes)
    else:
        # torchvision costs ~3 s to import: only the MobileNet paths pay for it.
        from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

        builder = mobilenet_v3_small if config.architecture == "mobilenet_v3_small" else mobilenet_v3_large
        model = builder(weights=None, num_classes=config.num_classes)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = BATCH_NORM_MOMENTUM
    if config.pretrained_weights:
        load_pretrained(model, Path(config.pretrained_weights))
    if not config.fine_tune:
        for parameter in model.get_submodule("features").parameters():
            parameter.requires_grad = False
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a torch state dict with ``weights_only=True`` (never arbitrary pickles)."""
    if not path.is_file():
        raise BadInputError(f"model.pretrainedWeights: {path} does not exist; give a local .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BadDataError(f"{path}: not a readable weights file ({error})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadDataError(f"{path}: expected a mapping of tensor names to tensors (a state dict)")
    return state


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Copy every tensor of ``path`` whose name and shape match; return the names left at their init.

    Fails when nothing matches, which means the file is for another architecture.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    matching = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if not matching:
        raise BadDataError(f"{path}: no tensor matches this architecture; is it for another model?")
    model.load_state_dict(matching, strict=False)
    return sorted(set(target) - set(matching))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
