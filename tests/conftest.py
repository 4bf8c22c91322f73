"""Shared fixtures: one small synthetic GTSRB tree per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic GTSRB tree in the official layout (43 classes, 8 training images each)."""
    from fedtrain.worker.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("gtsrb")
    generate(root, SynthConfig(per_class=8, test_per_class=2, frames_per_track=4, seed=3, max_size=64))
    return root
