"""Plots of a finished training: accuracy and loss per round, and the final confusion matrix (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in Jobs or CI

import matplotlib.pyplot as plt
import numpy as np


def plot_per_round(path: Path, rounds: Sequence[int], values: Sequence[float], label: str, title: str) -> Path:
    """A line plot of one metric over rounds."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(rounds, values, marker="o")
    axes.set_xlabel("round")
    axes.set_ylabel(label)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_confusion(path: Path, confusion: Sequence[Sequence[int]], title: str) -> Path:
    """The confusion matrix, rows normalised to recall (true class down, predicted across)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(8, 7))
    image = axes.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
