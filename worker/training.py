"""Local training and evaluation of one client's model.

The loop trains from in-memory uint8 batches (see `data.images`), normalising on the fly, with SGD
or Adam, an optional cosine-with-warm-restarts schedule and the FedProx proximal term
``mu/2 * ||w - w_global||^2`` (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedtrain.contract.errors import BadInputError
from fedtrain.worker.models import IMAGENET_MEAN, IMAGENET_STD
from fedtrain.worker.weights import Weights

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("none", "cosine")
FUSED_DEVICES = ("cpu", "cuda")  # where torch's Adam and SGD have fused kernels that fedtrain was measured on


@dataclass(frozen=True)
class TrainConfig:
    """How one client trains in one round.

    A site receives these as `fedtrain.contract.sitetask.TrainSettings`, their versioned and bounded wire form.
    """

    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    restart_epochs: int = 1  # T_0 of CosineAnnealingWarmRestarts, in epochs
    mu: float = 0.0  # FedProx proximal term; 0 is plain FedAvg local training
    augment: bool = True
    seed: int = 0

    def check(self) -> None:
        """Reject impossible settings, naming the field."""
        if self.optimizer not in OPTIMIZERS:
            raise BadInputError(f"training.optimizer {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise BadInputError(f"training.scheduler {self.scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
        for name, value in (("localEpochs", self.local_epochs), ("batchSize", self.batch_size),
                            ("restartEpochs", self.restart_epochs)):
            if value < 1:
                raise BadInputError(f"training.{name} must be >= 1, got {value}")
        if not self.learning_rate > 0:
            raise BadInputError(f"training.learningRate must be > 0, got {self.learning_rate}")
        if self.mu < 0:
            raise BadInputError(f"strategy.mu must be >= 0, got {self.mu}")


def to_tensor_batch(images: NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    batch = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (batch - mean) / std


def augment_batch(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (up to 1/8 of the size, edges replicated) and brightness/contrast jitter.

    No flips: a mirrored "turn left" sign is a "turn right" sign, another class. Random numbers come
    from the CPU ``generator`` (reproducible on any device) and move to the batch's device.
    """
    count, _, height, width = batch.shape
    pad = max(1, height // 8)
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
    shifted = torch.stack([padded[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets)])
    contrast = (1 + 0.4 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5)).to(batch.device)
    brightness = (0.4 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5)).to(batch.device)
    mean = shifted.mean(dim=(1, 2, 3), keepdim=True)
    return (shifted - mean) * contrast + mean + brightness


def state_to_numpy(model: nn.Module) -> Weights:
    """The model's full state (parameters and buffers) as numpy arrays."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_numpy_state(model: nn.Module, weights: Weights) -> None:
    """Load numpy arrays into the model, strictly (every name, every shape).

    Weights read from a file are read-only views into its bytes (see `weights.tensors_of`); torch
    warns about wrapping those, but ``load_state_dict`` only copies from them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        model.load_state_dict({name: torch.from_numpy(np.asarray(array)) for name, array in weights.items()},
                              strict=True)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over the trainable parameters, in torch's fused kernels where it has them.

    Fused: one kernel per parameter instead of about ten tensor operations. On the CPU the default
    was torch's per-tensor loop, about a tenth of a MobileNetV3-small step at 64 px; fused Adam
    makes the step 5 to 14% cheaper (docs/benchmarks.md). Both agree with the loop to float32
    rounding (tests/worker/test_training.py), so a run's numbers move within float noise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in FUSED_DEVICES for p in params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)


@dataclass
class TrainResult:
    """What a client reports about its local training."""

    num_examples: int
    loss: float
    accuracy: float
    seconds: float
    images_per_second: float

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the update's sidecar."""
        return asdict(self)


def train_local(
    model: nn.Module,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64],
    config: TrainConfig,
    device: torch.device | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.local_epochs`` on the given arrays.

    ``after_epoch(n)`` is called after each epoch n (from 1): a benchmark reads a learning curve from
    one run, with the optimiser's state kept across epochs as in any single run.
    """
    config.check()
    if len(labels) == 0:
        raise BadInputError("this client has no training examples; check the partition")
    device = device or torch.device("cpu")
    torch.manual_seed(config.seed)
    generator = np.random.default_rng(config.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    steps_per_epoch = (len(labels) + config.batch_size - 1) // config.batch_size
    scheduler = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=config.restart_epochs * steps_per_epoch)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad] if config.mu > 0 else []
    loss_fn = nn.CrossEntropyLoss()
    all_labels = torch.from_numpy(labels).to(device)
    jitter = torch.Generator().manual_seed(config.seed)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    for epoch in range(config.local_epochs):
        order = generator.permutation(len(labels))
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            batch = to_tensor_batch(images[index], device)
            if config.augment:
                batch = augment_batch(batch, jitter)
            target = all_labels[torch.from_numpy(index).to(device)]
            logits = model(batch)
            loss = loss_fn(logits, target)
            if anchor:
                trainable = (p for p in model.parameters() if p.requires_grad)
                loss = loss + config.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.detach().argmax(1) == target).sum())
            seen += len(index)
        if after_epoch is not None:
            after_epoch(epoch + 1)
            model.train()  # the callback may have evaluated the model
    seconds = time.perf_counter() - started
    return TrainResult(len(labels), total_loss / seen, correct / seen, seconds, seen / max(seconds, 1e-9))


@dataclass
class Evaluation:
    """Accuracy, loss, per-class accuracy (None where a class has no examples) and the confusion matrix."""

    num_examples: int
    accuracy: float
    loss: float
    per_class_accuracy: list[float | None]
    confusion: list[list[int]]

    def summary(self) -> dict[str, float]:
        """The scalar part, for sidecars, termination messages and MLflow."""
        return {"accuracy": self.accuracy, "loss": self.loss, "test_examples": self.num_examples}

    def to_json(self) -> dict[str, Any]:
        """Everything, as a plain dict."""
        return asdict(self)


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: NDArray[np.uint8], batch_size: int = 256, device: torch.device | None = None
) -> NDArray[np.float32]:
    """Class probabilities for uint8 NHWC images."""
    device = device or torch.device("cpu")
    model.to(device)
    with contextlib.suppress(NotImplementedError):  # models loaded from MLflow's pt2 format are exported
        model.eval()  # in eval mode already and refuse the call
    outputs = [torch.softmax(model(to_tensor_batch(images[i:i + batch_size], device)), dim=1).cpu().numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def evaluate(
    model: nn.Module, images: NDArray[np.uint8], labels: NDArray[np.int64], num_classes: int,
    batch_size: int = 256, device: torch.device | None = None,
) -> Evaluation:
    """Score ``model`` on arrays: accuracy, mean cross-entropy, per-class accuracy, confusion matrix."""
    if len(labels) == 0:
        raise BadInputError("evaluation set is empty")
    probabilities = predict_proba(model, images, batch_size, device)
    predicted = probabilities.argmax(1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    support = confusion.sum(1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    return Evaluation(len(labels), float((predicted == labels).mean()), loss, per_class, confusion.tolist())
