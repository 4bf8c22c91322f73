"""Decoding sample images into one uint8 array, once per process.

GTSRB images are small and a client's shard fits in memory many times over, so decoding every
image once (crop, resize) and training from an in-memory array beats re-decoding PPM files every
epoch through a DataLoader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from fedtrain.contract.errors import BadDataError
from fedtrain.worker.data.gtsrb import GtsrbTree, Sample


def load_image(path: Path, image_size: int, roi: tuple[int, int, int, int] | None = None) -> NDArray[np.uint8]:
    """Decode one image as RGB, crop it to its region of interest if given, resize to a square."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise BadDataError(f"{path}: unreadable image ({error}); expected a PPM/PNG/JPEG file") from error
    if roi is not None:
        x1, y1, x2, y2 = roi
        if x2 > x1 and y2 > y1:
            rgb = rgb.crop((x1, y1, x2 + 1, y2 + 1))
    resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def load_samples(
    tree: GtsrbTree, samples: Sequence[Sample], image_size: int, roi_crop: bool
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Decode samples into an ``(N, H, W, 3)`` uint8 array and an ``(N,)`` label array."""
    images = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    for index, sample in enumerate(samples):
        images[index] = load_image(tree.path_of(sample), image_size, sample.roi if roi_crop else None)
    labels = np.fromiter((s.class_id for s in samples), dtype=np.int64, count=len(samples))
    return images, labels
