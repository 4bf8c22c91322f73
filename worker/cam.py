"""Class activation maps: where in an image the model finds evidence for a class.

CAM (Zhou et al., 2016, "Learning Deep Features for Discriminative Localization") weights the last
feature map by the final classifier's weights for the class. Here the classifier head is applied to
the feature vector at each spatial position (as a 1x1 convolution), which is exactly CAM for a linear
head after global pooling (the tiny CNN) and its natural extension for MobileNetV3's two-layer head:
the per-position logit of the class, whose mean over positions is the pooled logit for a linear head.
The original road-sign script took the classifier weights of one layer against the features of
another; this uses the model's own head, per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from fedtrain.worker.training import to_tensor_batch


@torch.no_grad()
def class_activation_maps(model: nn.Module, images: NDArray[np.uint8], classes: list[int] | None = None
                          ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Per-image maps in [0, 1] at feature resolution, the class each map is for, and its probability.

    ``classes`` defaults to each image's predicted class.
    """
    model.eval()
    features = model.get_submodule("features")(to_tensor_batch(images, torch.device("cpu")))
    head = model.get_submodule("classifier")
    count, channels, height, width = features.shape
    per_position = head(features.permute(0, 2, 3, 1).reshape(-1, channels)).reshape(count, height, width, -1)
    logits = per_position.mean(dim=(1, 2)) if classes is not None else model(
        to_tensor_batch(images, torch.device("cpu")))
    probabilities = torch.softmax(logits, dim=1)
    chosen = torch.tensor(classes) if classes is not None else probabilities.argmax(1)
    maps = per_position[torch.arange(count), :, :, chosen]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    normalised = (maps - low) / (high - low).clamp_min(1e-8)
    return normalised.numpy(), chosen.numpy(), probabilities[torch.arange(count), chosen].numpy()


def overlay(image: NDArray[np.uint8], activation: NDArray[np.float32], alpha: float = 0.45) -> NDArray[np.uint8]:
    """The map, upsampled and coloured (matplotlib's jet), blended over the image."""
    from matplotlib import colormaps

    size = (image.shape[1], image.shape[0])
    upsampled = np.asarray(Image.fromarray((activation * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    coloured = colormaps["jet"](upsampled / 255.0)[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * coloured, 0, 255).astype(np.uint8)


def save_cam_sheet(path: Path, images: NDArray[np.uint8], maps: NDArray[np.float32], titles: list[str]) -> Path:
    """One PNG: each image beside its overlay, titled with prediction (and truth, if known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(images), 2, figsize=(5, 2.4 * len(images)), squeeze=False)
    for row, (image, activation, title) in enumerate(zip(images, maps, titles, strict=True)):
        axes[row][0].imshow(image)
        axes[row][1].imshow(overlay(image, activation))
        axes[row][0].set_title(title, fontsize=7, loc="left")
        for axis in axes[row]:
            axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
